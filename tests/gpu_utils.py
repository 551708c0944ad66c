"""What the GPU tests of each op's test file share: their devices, tolerances and the comparison with the reference.

The GPU suite is ``pytest -m cuda`` (run by ``make gpu-check``; skipped without a CUDA device) and its emulated half
``pytest -m emulated`` (run by ``make test-cuda-emulated``): the tests that take the ``dev`` fixture (tests/conftest.py)
run once on the GPU and once on the CUDA emulator (tests/cuda_emulator), where the same .cu kernels run on CPU
tensors. They check every op on every GPU backend against its reference run in float64 on the same inputs, forward
and every gradient, in every dtype the backend takes; odd shapes, empty batches, non-contiguous inputs, locations on
and outside the borders; bitwise-repeatable deterministic backward. Tests whose name holds "sanitizer" are the small
cases that gpu-check also runs under compute-sanitizer.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import dnops
from dnops import _backend
from tests.msda_utils import make_inputs

DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("emulated", marks=pytest.mark.emulated)]


# ms_deform_attn's CUDA code differs per arch (sm_90's vector atomics, sm_80's scalar ones): both are emulated
ARCH_DEVICES = [*DEVICES, pytest.param("emulated-sm80", marks=pytest.mark.emulated)]


@contextlib.contextmanager
def on_device(name: str):
    """The tensors' device for a run on ``name``: the GPU, or CPU tensors routed to the emulated CUDA kernels."""
    if name == "cuda":
        yield "cuda"
        return
    from tests import cuda_emulator

    cuda_emulator.configure(*cuda_emulator.default_order())
    with cuda_emulator.routed(80 if name.endswith("sm80") else 90):
        yield "cpu"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ||got - want|| / ||want|| allowed per dtype: the reference runs in float64 on the same (rounded) inputs, so
# this is the kernel's own error (accumulation order, half-type outputs rounded once).
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def assert_rel(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    got, want = got.double(), want.double()
    scale = want.norm().item()
    err = (got - want).norm().item() / (scale if scale > 0 else 1.0)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:.0e} ({dtype})"


def as_float64(args):
    return [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in args]


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


# FlashAttention's rule for half-precision kernels: every element's error against the float64 reference within K
# times the worst error the reference itself makes in that dtype (run on the same rounded inputs), plus EPS times the
# largest magnitude (where the low-precision reference happens to be exact).
HALF_K, HALF_EPS = 2.0, 1e-3


def assert_within_reference_error(got: torch.Tensor, want: torch.Tensor, low: torch.Tensor, what: str) -> None:
    """max|got - want| <= HALF_K * max|low - want| + HALF_EPS * max|want|: ``want`` the float64 reference, ``low`` the
    reference run in got's dtype."""
    assert got.shape == want.shape == low.shape, f"{what}: shapes {tuple(got.shape)}, {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if want.numel() == 0:
        return
    want = want.double()
    err = (got.double() - want).abs().max().item()
    ref_err = (low.double() - want).abs().max().item()
    bound = HALF_K * ref_err + HALF_EPS * want.abs().max().item()
    assert err <= bound, f"{what}: worst element off by {err:.3g} > {HALF_K} x the reference's own {ref_err:.3g} + eps"


def assert_matches_reference(got: torch.Tensor, want: torch.Tensor, low: torch.Tensor, dtype, what: str) -> None:
    """float16 / bfloat16 (``dtype``): every element within the reference's own error in that dtype (``low``, the
    reference run on the same inputs); other dtypes: the norm-wise REL_TOL against ``want`` (float64)."""
    if dtype in (torch.float16, torch.bfloat16):
        assert_within_reference_error(got, want, low, what)
    else:
        assert_rel(got, want, dtype, what)


def check_against_reference(fn, ref_fn, args, dtype, what, deterministic_kernel: bool = False):
    """fn(*args) and every gradient against ref_fn on the same inputs in float64; with ``deterministic_kernel``,
    fn's forward and backward run under torch.use_deterministic_algorithms(True) and the reference outside it (on
    CUDA, grid_sample's backward raises there). float16 / bfloat16: every element within HALF_K times the error of
    the reference run in that dtype (assert_within_reference_error), not a norm that a few wrong elements pass."""
    ref_args = as_float64(args)
    with deterministic(deterministic_kernel):
        out = fn(*args)
    assert not torch.are_deterministic_algorithms_enabled(), "the reference runs outside deterministic mode"
    ref = ref_fn(*ref_args)
    assert out.dtype == dtype
    half = dtype in (torch.float16, torch.bfloat16)
    low_args = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in args]
    low = ref_fn(*low_args) if half else None
    if half:
        assert_within_reference_error(out, ref, low, f"{what} forward")
    else:
        assert_rel(out, ref, dtype, f"{what} forward")
    grad_in = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not grad_in or out.numel() == 0:
        return
    g = torch.randn_like(ref)
    with deterministic(deterministic_kernel):
        got = torch.autograd.grad(out, grad_in, g.to(dtype))
    want = torch.autograd.grad(ref, [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad], g)
    if half:
        lows = torch.autograd.grad(
            low, [a for a in low_args if isinstance(a, torch.Tensor) and a.requires_grad], g.to(dtype)
        )
        for i, (x, y, z) in enumerate(zip(got, want, lows, strict=True)):
            assert x.dtype == grad_in[i].dtype, f"{what}: grad of input {i} in {x.dtype}, not its input's dtype"
            assert_within_reference_error(x, y, z, f"{what} grad of input {i}")
        return
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        assert x.dtype == grad_in[i].dtype, f"{what}: grad of input {i} in {x.dtype}, not its input's dtype"
        assert_rel(x, y, dtype, f"{what} grad of input {i}")


def backend_fn(backend: str, fn):
    def run(*args, **kw):
        with _backend.use_backend(backend):
            return fn(*args, **kw)

    return run


def needs(op: str, backend: str, device: str = "cuda") -> str:
    """Skips what this device cannot run; returns the backend name that runs ``backend`` there: the emulator's CUDA
    kernels are dnops' compiled ops on CPU tensors (tests/cuda_emulator routes them), the "cpu" backend."""
    if device != "cuda" and backend != "cuda":
        pytest.skip("the emulator runs the CUDA kernels; the Triton kernels run in their interpreter tests")
    name = "cpu" if device != "cuda" else backend
    if not _backend.available(op, device)[name]:
        pytest.skip(f"no {backend} kernel of {op} for {device} in this build")
    return name


def msda_args(dtype, device="cuda", **kw):
    args = make_inputs(device=device, **kw)
    return [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in args]


def msda(backend: str, logits: bool = False, device: str = "cuda"):
    name = needs("ms_deform_attn", backend, device)
    return backend_fn(name, lambda *a: dnops.ms_deform_attn(*a, attention_logits=logits))


cuda = pytest.mark.cuda
