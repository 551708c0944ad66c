"""The Triton DN self-attention kernels against the reference, in Triton's interpreter."""

import pytest
import torch

import dnops
from dnops import reference

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def tri():
    from dnops.triton.dn_self_attention import dn_self_attention_triton

    return dn_self_attention_triton


# group sizes that are and are not multiples of the 16-wide blocks, one group, no DN part, no matching part
LAYOUTS = [(21, 7, 11), (32, 16, 9), (10, 10, 20), (0, 0, 19), (24, 6, 0), (40, 20, 1)]


@pytest.mark.parametrize("pad_size,group_size,nq", LAYOUTS)
@pytest.mark.parametrize("dh", [8, 30])
def test_forward_and_grads(tri, pad_size, group_size, nq, dh):
    q, k, v = [torch.randn(1, 2, pad_size + nq, dh, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    out, lse = tri(q, k, v, pad_size, group_size, dh**-0.5)
    ref = reference.dn_self_attention_dense(q, k, v, pad_size, group_size)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    scores = ((q @ k.transpose(-1, -2)) * dh**-0.5).masked_fill(
        reference.dn_attn_mask(pad_size, group_size, nq), float("-inf")
    )
    torch.testing.assert_close(lse, scores.logsumexp(-1))
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision(tri, dtype, tol):
    q, k, v = [torch.randn(1, 2, 29, 16, dtype=torch.float64) for _ in range(3)]
    expected = reference.dn_self_attention_dense(q, k, v, 18, 6)
    out, _ = tri(q.to(dtype), k.to(dtype), v.to(dtype), 18, 6, 0.25)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.double(), reference.dn_self_attention_dense(q, k, v, 18, 6, 0.25), rtol=tol, atol=tol
    )
    assert expected.shape == out.shape


def test_public_function_routes_to_triton(backend_env):
    backend_env("triton")
    q, k, v = [torch.randn(1, 2, 13, 8, dtype=torch.float64) for _ in range(3)]
    torch.testing.assert_close(dnops.dn_self_attention(q, k, v, 8, 4), reference.dn_self_attention_dense(q, k, v, 8, 4))


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("pad_size,group_size,nq,dh", [(15, 5, 70, 16), (80, 40, 30, 32), (0, 0, 90, 64)])
def test_gpu_block_sizes(tri, monkeypatch, block, pad_size, group_size, nq, dh):
    """The block edges a GPU gets (the interpreter runs 16), checked here where the kernels can run."""
    from dnops.triton import dn_self_attention as module

    monkeypatch.setattr(module, "_block", lambda block_d, dh, dtype: block)
    q, k, v = [torch.randn(2, 2, pad_size + nq, dh, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    out = tri(q, k, v, pad_size, group_size, dh**-0.5)[0]
    ref = reference.dn_self_attention(q, k, v, pad_size, group_size)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(ref, [q, k, v], g), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("dh", [32, 30, 128])
def test_gpu_tiles_per_dtype(tri, monkeypatch, dtype, dh):
    """The tiles and warps a GPU gets per dtype (tests/gpu_compile.py holds them to no spills), run here."""
    from dnops.triton import dn_self_attention as module

    monkeypatch.setattr(module, "interpreted", lambda: False)
    q, k, v = [torch.randn(1, 2, 40 + 33, dh, dtype=dtype, requires_grad=True) for _ in range(3)]
    out = tri(q, k, v, 40, 8, dh**-0.5)[0]
    ref = reference.dn_self_attention(*(t.double() for t in (q, k, v)), 40, 8)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
