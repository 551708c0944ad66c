"""Loading dnops._C and choosing an implementation per op and device.

Default per device: CPU -> the C++ kernel; CUDA -> the CUDA kernel if one is compiled (CI executes it in the CUDA
emulator), else torch's own SDPA kernels where the op has that formulation, else Triton; anything missing -> the
pure-PyTorch reference. ``DNOPS_BACKEND=reference|cpu|cuda|triton|sdpa`` overrides the default (``cpp``, the
earlier name of the compiled kernels, still means the one of the tensors' device); an override that an op cannot
honour raises, naming what is missing: only the default choice falls back (a benchmark that asked for a kernel
never times the reference unnoticed). An op without any implementation of the requested kind (sdpa for
deformable attention, Triton for the dense mask) is not concerned by the request and runs its default.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

from dnops._registry import ALIASES, BACKENDS, COMPILED, DEFAULT_ORDER, OPS

try:
    # loading it registers the C++/CUDA kernels. By its full name: a missing extension then reads "No module named
    # 'dnops._C'" (``from dnops import _C`` would say "partially initialized module ... circular import")
    _C = importlib.import_module("dnops._C")

    C_ERROR: str | None = None
except (ImportError, OSError) as exc:
    _C = None
    C_ERROR = f"{type(exc).__name__}: {exc}"
    try:
        from dnops._build_info import BUILD as _BUILD

        _built_for = f"built for torch {_BUILD.get('torch', '?')}"
    except ImportError:
        _built_for = "no build found"
    warnings.warn(
        f"dnops._C could not be loaded ({C_ERROR}; {_built_for}, this is torch {torch.__version__}); every dnops "
        "op falls back to its pure-PyTorch reference. Rebuild the kernels against this torch: "
        "`pip install --no-build-isolation .` (or `-e .` in a checkout).",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_C = _C is not None
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@functools.cache
def has_kernel(op: str, device_type: str) -> bool:
    """Whether dnops._C registered a kernel of ``dnops::op`` for this device type ("cpu" or "cuda").

    Cached: every registration happens when dnops._C is imported, before any op runs.
    """
    key = _DISPATCH_KEYS.get(device_type)
    if not HAS_C or key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dnops::{op}", key)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_runs_on(device_type: str) -> bool:
    if not triton_available():
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# dnops.use_backend's setting: per thread and per asyncio task (a new thread starts without one), over the process
# default DNOPS_BACKEND. None: no block is active in this context.
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("dnops_backend", default=None)


def _check_name(value: str, source: str) -> str:
    value = value.strip().lower()
    if value and value not in BACKENDS and value not in ALIASES:
        raise ValueError(f"{source} must be one of {BACKENDS} (or the earlier {ALIASES}), got {value!r}")
    return value


def requested_backend() -> str | None:
    """The backend asked for in this thread / task: the innermost dnops.use_backend block's, else DNOPS_BACKEND
    (the process default); one of BACKENDS or ALIASES, or None."""
    value = _OVERRIDE.get()
    if value is None:
        value = _check_name(os.environ.get("DNOPS_BACKEND", ""), "DNOPS_BACKEND")
    return value or None


def _resolve(name: str, device_type: str) -> str:
    """A backend name for a device kind, aliases replaced: "cpp" is the compiled kernel of the device."""
    if name in ALIASES:
        return device_type if device_type in COMPILED else "cpu"
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """``with dnops.use_backend("reference"):`` runs every op called inside on that backend (DNOPS_BACKEND's
    values) in this thread or asyncio task only; None leaves the choice as it is. Other threads keep theirs (the
    process default, DNOPS_BACKEND, in a thread that entered no block), and the setting is restored on exit
    whatever other threads do. A graph torch.compile traced inside keeps the backend it was traced with."""
    if name is None:
        yield
        return
    if not isinstance(name, str) or not _check_name(name, "use_backend: name"):
        raise ValueError(f"use_backend: name must be one of {BACKENDS} (or the earlier {ALIASES}), got {name!r}")
    token = _OVERRIDE.set(name.strip().lower())
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def available(op: str, device_type: str) -> dict[str, bool]:
    """Which backends can run ``op`` (a name in dnops._registry.OPS) on ``device_type``, in this installation."""
    info = OPS[op]
    return {
        "reference": True,
        "cpu": device_type == "cpu" and has_kernel(op, "cpu"),
        "cuda": device_type == "cuda" and has_kernel(op, "cuda"),
        "triton": info.triton and _triton_runs_on(device_type),
        "sdpa": info.sdpa,
    }


def is_compiled(backend: str) -> bool:
    """Whether ``backend`` (what choose returned) is a kernel of dnops._C."""
    return backend in COMPILED


@torch.compiler.assume_constant_result
def choose(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device``: the DNOPS_BACKEND override if it can, else the default
    (dnops._registry.DEFAULT_ORDER).

    torch.compile evaluates this once while tracing (kernel registration and the environment are fixed).
    """
    can = available(op, device.type)
    wanted = requested_backend()
    if wanted is not None and formulates(op, _resolve(wanted, device.type)):
        wanted = _resolve(wanted, device.type)
        if can[wanted]:
            return wanted
        raise RuntimeError(f"dnops.{op}: backend {wanted!r} was asked for, but {missing(op, wanted, device.type)}")
    return next((b for b in DEFAULT_ORDER.get(device.type, ()) if can[b]), "reference")


def formulates(op: str, backend: str) -> bool:
    """Whether ``op`` has a ``backend`` implementation at all (in some build, on some device). A request for one it
    has none of by design (sdpa for deformable attention, Triton for the mask) does not concern it: it runs its
    default choice, which ``python -m dnops.info`` shows."""
    info = OPS[op]
    if backend in COMPILED:
        return backend in info.compiled
    return {"reference": True, "triton": info.triton, "sdpa": info.sdpa}[backend]


def missing(op: str, backend: str, device_type: str) -> str:
    """Why ``backend``, an implementation ``op`` has (formulates), cannot run it on ``device_type`` tensors here."""
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        return f"Triton runs on CUDA tensors (on the CPU only with TRITON_INTERPRET=1), and these are {device_type}"
    if backend != device_type:
        return f"the {backend} kernels take {backend} tensors, and these are {device_type} tensors"
    if not HAS_C:
        return f"dnops._C is not loaded ({C_ERROR})"
    if backend == "cuda" and not _C.built_with_cuda():
        return "dnops was built without CUDA kernels (rebuild with nvcc found, or DNOPS_CUDA=1 to require it)"
    return f"dnops._C has no {backend} kernel of {op}"


# torch.compiler.is_exporting() is also True under plain torch.compile before torch 2.14 (seen on 2.11); there only
# the non-strict export (the ONNX exporter's first strategy), which Dynamo does not trace, can be told apart.
_EXPORT_FLAG_EXACT = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)


def exporting() -> bool:
    """Whether torch.onnx.export (either exporter) or torch.export is tracing the caller."""
    if torch.compiler.is_exporting():
        return _EXPORT_FLAG_EXACT or not torch.compiler.is_dynamo_compiling()
    return torch.onnx.is_in_onnx_export()


def draw_seed() -> int:
    """A non-negative seed from torch's default CPU generator (so torch.manual_seed reproduces a run)."""
    if HAS_C:
        return int(_C.draw_seed())
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))
