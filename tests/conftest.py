import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; with one they run compiled there (the
# GPU tests in each op's test file). The choice must be made before triton is first imported, which importing torch
# does not do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch._inductor.config  # noqa: E402

from dnops import _backend  # noqa: E402
from tests import gpu_utils  # noqa: E402

# Inductor compiles in the test process: with its pool of compile workers, torch 2.11 once left pytest waiting at
# exit for workers that never stopped (gpu-check's test shards run under a time limit).
torch._inductor.config.compile_threads = 1


def _round_bfloat16_to_nearest_in_the_interpreter() -> None:
    """Triton's interpreter casts float32 to bfloat16 by truncation; a GPU (like torch) rounds to nearest even. The
    interpreter tests get the GPU's rounding, so that a half-precision bound measures the kernel, not the emulation."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1" and _backend.triton_available():
    _round_bfloat16_to_nearest_in_the_interpreter()


def _interpreter_skip_reason() -> str | None:
    """Why the Triton interpreter tests (CPU tensors) cannot run here, or None when they can."""
    if not _backend.triton_available():
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is not set: the Triton kernels run compiled on the GPU (the GPU tests)"
    from dnops.triton.ms_deform_attn import ms_deform_attn_triton
    from tests.msda_utils import make_inputs

    try:
        ms_deform_attn_triton(*make_inputs(n=1, lq=1, m=1, d=1, p=1))
    except Exception as exc:  # only this known incompatibility skips; any other failure is left to the tests
        if "wrap_triton" not in str(exc):
            return None
        return f"torch {torch.__version__}'s wrap_triton rejects kernels run by the interpreter ({str(exc)[:120]})"
    return None


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_emulated = pytest.mark.skip(reason="DNOPS_CUDA_EMULATOR is not set (make test-cuda-emulated sets it)")
    emulator = bool(os.environ.get("DNOPS_CUDA_EMULATOR"))
    triton_reason = None
    if any(item.get_closest_marker("triton") for item in items):
        triton_reason = _interpreter_skip_reason()
        if triton_reason:
            print(f"\nTriton interpreter tests skipped: {triton_reason}")
    for item in items:
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if item.get_closest_marker("emulated") and not emulator:
            item.add_marker(skip_emulated)
        if item.get_closest_marker("triton") and triton_reason:
            item.add_marker(pytest.mark.skip(reason=triton_reason))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _block_sparse_at_every_size(monkeypatch):
    """DNMultiheadAttention runs the parent's math path for small problems on the CPU: the tests' small shapes
    would never reach the block-sparse path, so it is taken at every size here (the rule's own test sets it back)."""
    from dnops.nn import dn_mha

    monkeypatch.setattr(dn_mha, "CPU_MATH_PATH_MAX", -1)


@pytest.fixture
def backend_env(monkeypatch):
    """Force DNOPS_BACKEND for one test: ``backend_env("cpu")``."""

    def force(name: str) -> None:
        monkeypatch.setenv("DNOPS_BACKEND", name)

    return force


def _grid_sample_differentiates_twice() -> bool:
    """Whether this torch differentiates grid_sample's backward (torch 2.11 does not; 2.14 does): the deformable
    attention reference samples with it."""
    x = torch.rand(1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    grid = torch.rand(1, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(
        torch.nn.functional.grid_sample(x, grid, align_corners=False).sum(), x, create_graph=True
    )
    try:
        torch.autograd.grad(g.square().sum(), grid)
    except RuntimeError as exc:
        if "derivative for aten::grid_sampler_2d_backward is not implemented" in str(exc):
            return False
        raise
    return True


def check_double_backward(op: str, backend: str, out: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    """What differentiating ``op``'s gradient does on ``backend``, asserted: the reference is plain PyTorch and
    differentiates twice (finite second-order gradients for every input) where torch differentiates its ops' backward
    (grid_sample's, for deformable attention, not in torch 2.11: there torch names it); sdpa's kernels have no
    derivative of their backward, and torch says so; dnops' kernels raise an error naming the op."""
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    second = sum(g.square().sum() for g in grads)
    if backend == "reference" and op == "ms_deform_attn" and not _grid_sample_differentiates_twice():
        with pytest.raises(RuntimeError, match="derivative for aten::grid_sampler_2d_backward is not implemented"):
            torch.autograd.grad(second, inputs)
        return
    if backend == "reference":
        for x, g in zip(inputs, torch.autograd.grad(second, inputs), strict=True):
            assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
        return
    if backend == "sdpa":
        with pytest.raises(RuntimeError, match="derivative for aten::_scaled_dot_product_.* is not implemented"):
            torch.autograd.grad(second, inputs)
        return
    with pytest.raises(RuntimeError, match=f"double backward is not supported by dnops.{op}"):
        torch.autograd.grad(second, inputs)


def requires_cpp(op: str):
    return pytest.mark.skipif(not _backend.has_kernel(op, "cpu"), reason=f"dnops._C has no CPU kernel for {op}")


# The GPU tests' devices (tests/gpu_utils.py): each test that takes one of these runs on the GPU and on the CUDA
# emulator (and, for arch_dev, its sm_80 build too).
@pytest.fixture(params=gpu_utils.DEVICES)
def dev(request):
    with gpu_utils.on_device(request.param) as device:
        yield device


@pytest.fixture(params=gpu_utils.ARCH_DEVICES)
def arch_dev(request):
    with gpu_utils.on_device(request.param) as device:
        yield device
