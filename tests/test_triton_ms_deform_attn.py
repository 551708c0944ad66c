"""The Triton kernels against the reference, in Triton's interpreter (TRITON_INTERPRET=1, set by conftest)."""

import pytest
import torch

import dnops
from dnops import reference
from tests.msda_utils import make_inputs

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def tri():
    from dnops.triton.ms_deform_attn import ms_deform_attn_triton

    return ms_deform_attn_triton


@pytest.mark.parametrize(
    "kw",
    [
        {"d": 4},
        {"d": 1, "p": 1, "shapes": ((3, 3),)},
        {"d": 30, "m": 1, "lq": 2},
        {"d": 71, "m": 1, "lq": 2, "p": 1},
        {"shapes": ((5, 2), (1, 1), (2, 7)), "m": 3, "d": 3, "p": 3},
    ],
)
@pytest.mark.parametrize("logits", [False, True])
def test_forward_and_grads(tri, kw, logits):
    args = make_inputs(requires_grad=True, **kw)
    out = tri(*args, logits)
    ref = reference.ms_deform_attn(*args, logits)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [args[0], args[3], args[4]], g)
    want = torch.autograd.grad(ref, [args[0], args[3], args[4]], g)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision(tri, dtype, tol):
    args = [t.to(dtype) if t.is_floating_point() else t for t in make_inputs(d=8)]
    out = tri(*args)
    assert out.dtype == dtype
    expected = reference.ms_deform_attn(*[t.double() if t.is_floating_point() else t for t in args])
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_borders_and_empty(tri):
    value, shapes, starts, loc, weights = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=6, m=1, p=1)
    loc[0, :, 0, :, 0] = torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [-0.5, 0.5], [1.5, 0.2], [-1 / 8, 1.0], [float("nan"), 0.5]], dtype=torch.float64
    )[:, None, :]
    torch.testing.assert_close(
        tri(value, shapes, starts, loc, weights),
        reference.ms_deform_attn(value, shapes, starts, loc.nan_to_num(nan=-10.0), weights),
    )
    empty = make_inputs(lq=0)
    assert tri(*empty).shape == (2, 0, 8)


def test_public_function_routes_to_triton(backend_env):
    backend_env("triton")
    args = make_inputs()
    torch.testing.assert_close(dnops.ms_deform_attn(*args), reference.ms_deform_attn(*args))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kw", [{"d": 32, "lq": 70}, {"d": 1, "lq": 200}, {"d": 4, "lq": 150}, {"d": 71, "lq": 9}])
def test_gpu_tiles(tri, monkeypatch, dtype, kw):
    """The tiles a GPU gets (the interpreter runs 16 rows), checked here where the kernel can run."""
    from dnops.triton import ms_deform_attn as module

    monkeypatch.setattr(module, "interpreted", lambda: False)
    assert module._tiles(kw["d"], dtype)[0] > module.BLOCK_R or kw["d"] % 16
    args = [t.to(dtype) if t.is_floating_point() else t for t in make_inputs(**kw)]
    want = reference.ms_deform_attn(*args)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(tri(*args), want, rtol=tol, atol=tol)
