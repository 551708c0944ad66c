"""Routing a module by giving it a subclass made at run time whose forward is dnops': transformers' RT-DETR v2
attention and ultralytics' and rfdetr's ``MSDeformAttn`` (the parent's own forward code run over a copy of its
globals where the one function name it calls is dnops'), and ultralytics' decoder (a forward that marks the decoder
before running the parent's). The routing holds per module (an unrouted twin keeps the original), and a routed module
pickles as its original class and state, routed again when loaded (pickle could not find a run-time class by name)."""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

# The forward of a routed subclass, made from its parent class; it is pickled with each routed module, so it is a
# module-level function or an object of a module-level class, equal to itself after a round trip.
ForwardOf = Callable[[type], Callable]

_CLASSES: dict[tuple[type, ForwardOf], type] = {}
_ROUTES: dict[type, ForwardOf] = {}


def routed_class(cls: type, forward_of: ForwardOf) -> type:
    """The subclass of ``cls`` whose forward is ``forward_of(cls)``, made once per (cls, forward_of)."""
    key = (cls, forward_of)
    if key not in _CLASSES:
        attrs = {"forward": forward_of(cls), "__module__": cls.__module__, "__reduce_ex__": _reduce_routed}
        routed = type(cls.__name__, (cls,), attrs)
        _CLASSES[key] = routed
        _ROUTES[routed] = forward_of
    return _CLASSES[key]


@dataclass(frozen=True)
class _Rebound:
    """The parent's forward code object over its globals, with ``name`` read as ``make(original)``."""

    name: str
    make: Callable[[object], object]

    def __call__(self, cls: type) -> Callable:
        parent = cls.forward
        scope = dict(parent.__globals__)
        scope[self.name] = self.make(parent.__globals__[self.name])
        forward = types.FunctionType(parent.__code__, scope, parent.__name__, parent.__defaults__, parent.__closure__)
        forward.__kwdefaults__ = parent.__kwdefaults__
        forward.__doc__ = parent.__doc__
        return forward


def rebound_class(cls: type, name: str, make: Callable[[object], object]) -> type:
    """The subclass of ``cls`` whose forward reads ``make(original)`` where the parent's forward reads the global
    ``name``. ``make`` must be a module-level function (it is pickled by name with a routed module)."""
    return routed_class(cls, _Rebound(name, make))


def is_rebound(module: nn.Module) -> bool:
    """Whether ``module``'s class is a routed subclass."""
    return type(module) in _ROUTES


def calls_global(cls: type, name: str) -> bool:
    """Whether ``cls.forward``'s own code reads the global ``name``."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return code is not None and name in code.co_names


def _reduce_routed(module: nn.Module, protocol: int):
    return _load_routed, (type(module).__mro__[1], _ROUTES[type(module)], module.__getstate__())


def _load_routed(cls: type, forward_of: ForwardOf, state: dict) -> nn.Module:
    module = cls.__new__(cls)
    module.__setstate__(state)
    module.__class__ = routed_class(cls, forward_of)
    return module
