"""Device syncs found on a machine without a GPU: a call runs on fake CUDA tensors (torch's FakeTensorMode: shapes,
dtypes and devices without data, so no kernel runs), under a dispatch mode that stops at the first op that would make
the host wait for the GPU, naming it and the line that called it.

What waits on a GPU: reading a value on the host (``.item()``, ``bool()``, ``int()``, ``.tolist()``: all
``aten::_local_scalar_dense`` or a copy to the CPU), ops whose output size depends on values (``nonzero``,
``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``, ``bincount``),
comparisons returning a Python bool (``equal``), and copies between host and device other than a ``non_blocking``
one from pinned memory (a blocking copy synchronizes the stream, also from host to device; from pageable memory the
driver stages it). On a lent GPU the same calls run under ``torch.cuda.set_sync_debug_mode("error")``
(tests/test_host_syncs.py's GPU test).
"""

from __future__ import annotations

import contextlib
import importlib
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parent.parent

VALUE_DEPENDENT = {
    aten._local_scalar_dense.default: "a value read on the host (.item(), bool(), int(), .tolist())",
    aten.nonzero.default: "nonzero (its output size is data-dependent)",
    aten.masked_select.default: "masked_select (its output size is data-dependent)",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
    aten.bincount.default: "bincount (its output size is data-dependent)",
    aten.equal.default: "torch.equal (a Python bool)",
    aten.is_nonzero.default: "a tensor's truth value",
}


class HostSync(AssertionError):
    """A call made the host wait for the device."""


def _device(x: object) -> str | None:
    return x.device.type if isinstance(x, torch.Tensor) else None


def _reason(func, args: tuple, kwargs: dict) -> str | None:
    if func in VALUE_DEPENDENT:
        return VALUE_DEPENDENT[func]
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size (its output size is data-dependent)"
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "indexing with a boolean mask (a nonzero inside)"
    if func is aten._to_copy.default and kwargs.get("device") is not None:
        return _copy(_device(args[0]), torch.device(kwargs["device"]).type, args[0], kwargs.get("non_blocking", False))
    if func is aten.copy_.default:
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return _copy(_device(args[1]), _device(args[0]), args[1], non_blocking)
    return None


def _copy(source: str | None, target: str | None, src: torch.Tensor, non_blocking: bool) -> str | None:
    """A copy between host and device waits for the stream unless it is non-blocking from (or to) pinned memory."""
    if source == target:
        return None
    if not non_blocking:
        return f"a blocking copy from {source} to {target}"
    if source == "cpu" and not getattr(src, "_pinned", False):
        return "a non-blocking copy from pageable host memory (the driver stages it, waiting for the stream)"
    if target == "cpu":
        return "a copy to the host (its values are read there)"
    return None


def _caller() -> str:
    """The innermost frame of this repository outside tests/: the line that asked for the sync."""
    frames = [
        f
        for f in traceback.extract_stack()
        if Path(f.filename).is_relative_to(ROOT) and not Path(f.filename).is_relative_to(ROOT / ".venv")
    ]
    ours = [f for f in frames if not Path(f.filename).is_relative_to(ROOT / "tests")] or frames
    if not ours:
        return "outside the repository"
    return f"{Path(ours[-1].filename).relative_to(ROOT)}:{ours[-1].lineno} ({ours[-1].line})"


def _python_body(func) -> Callable | None:
    """The Python function behind a dnops custom op defined in Python (torch.library.custom_op / triton_op), whose
    ops a dispatch mode would not see once it hands the call on (the mode is off while it handles one)."""
    from torch._library.custom_ops import OPDEFS

    name = func._schema.name if isinstance(func, torch._ops.OpOverload) else None
    definition = OPDEFS.get(name) if name is not None and name.startswith("dnops::") else None
    return getattr(definition, "_init_fn", None)


class _Stop(TorchDispatchMode):
    def __init__(self, copies: bool = False) -> None:
        super().__init__()
        self.copies = copies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._pin_memory.default, aten.pin_memory.default):  # no CUDA driver to pin with: marked pinned
            args[0]._pinned = True
            return args[0]
        if func is aten.is_pinned.default:
            return getattr(args[0], "_pinned", False)
        reason = _reason(func, args, kwargs)
        if reason is not None and not (self.copies and reason.startswith("a blocking copy")):
            raise HostSync(f"{reason}: {func} at {_caller()}")
        body = _python_body(func)
        if body is not None:  # dnops' Python-bodied ops (the Triton ops): their own ops are checked too
            with self:
                return body(*args, **kwargs)
        return func(*args, **kwargs)


class FakeGPU:
    """A fake CUDA device: ``gpu.to(x)`` gives a fake CUDA copy of a (real, CPU) tensor, module or container of
    tensors, and ``gpu.check(fn)`` runs ``fn`` in the fake mode and raises HostSync at its first sync. Outside those
    two, tensors made are real."""

    def __init__(self, mode: FakeTensorMode | None) -> None:
        self.mode = mode

    def to(self, x):
        if isinstance(x, torch.nn.Module):
            with self.mode:
                return x.to("cuda")
        if isinstance(x, torch.Tensor):
            with self.mode:
                fake = self.mode.from_tensor(x.detach()).to("cuda")
            return fake.requires_grad_(x.requires_grad) if x.is_floating_point() else fake
        if isinstance(x, list | tuple):
            return type(x)(self.to(v) for v in x)
        if isinstance(x, dict):
            return {k: self.to(v) for k, v in x.items()}
        return x

    def check(self, fn: Callable[[], object], copies: bool = False) -> object:
        """``copies``: let blocking copies through (a first call makes its tables), still stop at value reads."""
        with self.mode, _Stop(copies):
            return fn()

    def backward(self, outputs: list[torch.Tensor]) -> None:
        """Gradients of ones through ``outputs``' graph."""
        _backward(outputs)


class RealGPU(FakeGPU):
    """The same interface on the GPU: ``check`` runs under ``torch.cuda.set_sync_debug_mode("error")``, where torch
    raises at a synchronizing CUDA call (with ``copies``, a warm-up call, it runs unchecked)."""

    def __init__(self) -> None:
        super().__init__(None)

    def to(self, x):
        if isinstance(x, torch.nn.Module):
            return x.cuda()
        if isinstance(x, torch.Tensor):
            return x.detach().cuda().requires_grad_(x.requires_grad)
        return super().to(x)

    def check(self, fn: Callable[[], object], copies: bool = False) -> object:
        if copies:
            return fn()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def backward(self, outputs: list[torch.Tensor]) -> None:
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])


TRITON_OPS = ("ms_deform_attn", "dn_self_attention", "dn_queries")


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _no_launch(kernel) -> _NoLaunch:
    return _NoLaunch()


def _clear_caches() -> None:
    from dnops import _constants
    from dnops.compat import dn_detr, rtdetr

    masks = importlib.import_module("dnops.ops.dn_attn_mask")  # the attribute of dnops.ops is the function
    for cache in (_constants._MADE, masks._MADE, rtdetr._CONVERTED):
        cache.clear()
    dn_detr._constants.cache_clear()


@contextlib.contextmanager
def fake_gpu() -> Iterator[FakeGPU]:
    """Inside: a FakeGPU. dnops' caches of device tensors (level tables, masks, constants) keep what they make as on a
    GPU, where a steady-state call finds them made, and are emptied before and after, so no fake tensor outlives the
    block."""
    from dnops import _backend, _constants

    _clear_caches()
    patched = [
        (_constants, "detect_fake_mode", lambda *a: None),  # it leaves fake tensors uncached, for torch.compile
        (torch.cuda, "is_current_stream_capturing", lambda: False),  # asks the (absent) driver
        (torch.autograd, "grad", _grad),  # torch's engine needs a real device
    ]
    if _backend.triton_available():
        # a launch is asynchronous; the fake tensors have no memory for a kernel (or Triton's interpreter) to run on
        patched += [(importlib.import_module(f"dnops.triton.{op}"), "wrap_triton", _no_launch) for op in TRITON_OPS]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patched]
    for module, name, value in patched:
        setattr(module, name, value)
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # a module's fake parameters replace its own
    try:
        yield FakeGPU(FakeTensorMode(allow_non_fake_inputs=True))
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        for module, name, value in saved:
            setattr(module, name, value)
        _clear_caches()


def _backward(
    outputs: list[torch.Tensor], grad_outputs: list[torch.Tensor] | None = None, inputs: list[torch.Tensor] = ()
) -> list[torch.Tensor | None]:
    """Runs the graph's backward nodes in reverse topological order, as torch's engine would (which needs a real CUDA
    device to run a CUDA graph), from ``grad_outputs`` (ones by default); returns the gradients of the leaves
    ``inputs`` (their .grad stay unset)."""
    grads: dict = {}
    leaves: dict = {}

    def add(node, slot: int, grad: torch.Tensor | None) -> None:
        if node is not None and grad is not None:
            held = grads.setdefault(node, {})
            held[slot] = grad if slot not in held else held[slot] + grad

    order, seen = [], set()

    def visit(node) -> None:
        if node is not None and node not in seen:
            seen.add(node)
            for later, _ in node.next_functions:
                visit(later)
            order.append(node)

    grad_outputs = grad_outputs or [torch.ones_like(o) for o in outputs]
    for out, grad in zip(outputs, grad_outputs, strict=True):
        visit(out.grad_fn)
        add(out.grad_fn, out.output_nr, grad)
    with torch.no_grad():  # as the engine without create_graph
        for node in reversed(order):
            _run_node(node, grads, leaves, add)
    return [leaves.get(id(x)) for x in inputs]


def _run_node(node, grads: dict, leaves: dict, add: Callable) -> None:
    """One backward node: its gradients handed on along its edges (a leaf's kept in ``leaves``)."""
    if node not in grads:
        return
    held = grads.pop(node)
    if type(node).__name__ == "AccumulateGrad":
        leaves[id(node.variable)] = held[0]
        return
    grads_in = [held.get(i) for i in range(len(node._input_metadata))]
    edges = node.next_functions
    python = not callable(node)  # an autograd.Function or a custom op's autograd, not a C++ node
    results = node.apply(*grads_in) if python else node(*grads_in)
    results = (results,) if results is None or isinstance(results, torch.Tensor) else results
    if python:
        # one gradient per forward argument, tensor or not (a custom op's backward may add trailing Nones): those
        # that need one are exactly the arguments with an edge to a node
        results = [g for g, needed in zip(results, node.needs_input_grad, strict=False) if needed]
        edges = [edge for edge in edges if edge[0] is not None]
    for (later, slot), grad in zip(edges, results, strict=True):
        add(later, slot, grad)


def _grad(outputs, inputs, grad_outputs=None, **_):
    """torch.autograd.grad on fake CUDA tensors (code that differentiates inside its own backward)."""
    as_list = lambda x: [x] if isinstance(x, torch.Tensor) else list(x)  # noqa: E731
    grad_outputs = None if grad_outputs is None else as_list(grad_outputs)
    return tuple(_backward(as_list(outputs), grad_outputs, as_list(inputs)))


def steady_state(gpu: FakeGPU, call: Callable[[], object]) -> None:
    """One call to warm the caches (tables made once per shape), then a checked call, forward and backward (every
    output that requires grad, gradients of ones)."""

    def run() -> None:
        out = call()
        outs = out if isinstance(out, tuple | list) else [out]
        differentiable = [o for o in outs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
        if differentiable:
            gpu.backward(differentiable)

    gpu.check(run, copies=True)
    gpu.check(run)
