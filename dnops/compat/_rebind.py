"""Routing a module whose forward calls a module-level function by its global name (transformers' RT-DETR v2
attention, ultralytics' and rfdetr's ``MSDeformAttn``): a subclass whose forward is the parent's own code object run
over a copy of its globals where that one name is dnops'. Nothing of the parent's forward is rewritten, the routing
holds per module (an unrouted twin keeps the original), and a routed module pickles as its original class and state,
routed again when loaded (the subclass is made at run time, so pickle could not find it by name)."""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn

# (parent class, global name) -> routed subclass; every routed subclass -> (global name, replacement maker)
_CLASSES: dict[tuple[type, str], type] = {}
_ROUTES: dict[type, tuple[str, Callable[[object], object]]] = {}


def rebound_class(cls: type, name: str, make: Callable[[object], object]) -> type:
    """The subclass of ``cls`` whose forward reads ``make(original)`` where the parent's forward reads the global
    ``name``. ``make`` must be a module-level function (it is pickled by name with a routed module)."""
    key = (cls, name)
    if key not in _CLASSES:
        parent = cls.forward
        scope = dict(parent.__globals__)
        scope[name] = make(parent.__globals__[name])
        forward = types.FunctionType(parent.__code__, scope, parent.__name__, parent.__defaults__, parent.__closure__)
        forward.__kwdefaults__ = parent.__kwdefaults__
        forward.__doc__ = parent.__doc__
        attrs = {"forward": forward, "__module__": cls.__module__, "__reduce_ex__": _reduce_routed}
        routed = type(cls.__name__, (cls,), attrs)
        _CLASSES[key] = routed
        _ROUTES[routed] = (name, make)
    return _CLASSES[key]


def is_rebound(module: nn.Module) -> bool:
    return type(module) in _ROUTES


def calls_global(cls: type, name: str) -> bool:
    """Whether ``cls.forward``'s own code reads the global ``name``."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return code is not None and name in code.co_names


def _reduce_routed(module: nn.Module, protocol: int):
    name, make = _ROUTES[type(module)]
    return _load_routed, (type(module).__mro__[1], name, make, module.__getstate__())


def _load_routed(cls: type, name: str, make: Callable[[object], object], state: dict) -> nn.Module:
    module = cls.__new__(cls)
    module.__setstate__(state)
    module.__class__ = rebound_class(cls, name, make)
    return module
