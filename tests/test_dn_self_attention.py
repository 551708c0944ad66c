"""dn_self_attention, every backend against the reference (dnops.reference.dn_self_attention): the reference
against dense attention under the DN mask, the compiled kernel, the SDPA backend, the Triton kernels
(interpreter), bad inputs, properties, autocast, the GPU tests (``pytest -m cuda`` / ``-m emulated``), and
the DNMultiheadAttention drop-in."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import dnops
from dnops import _backend, reference
from dnops.nn import DNMultiheadAttention
from dnops.nn.dn_mha import recognise_dn_mask
from tests.backends import backends
from tests.conftest import check_double_backward, requires_cpp
from tests.gpu_utils import (
    DTYPES,
    backend_fn,
    check_against_reference,
    cuda,
    needs,
)
from tests.property_utils import SETTINGS, given, run, st

cpp = requires_cpp("dn_self_attention")


# ---- the reference ---------------------------------------------------------------------------------------------------


def reference_qkv(b=2, h=3, w=11, dh=8, dtype=torch.float64, requires_grad=False):
    return [torch.randn(b, h, w, dh, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


REFERENCE_LAYOUTS = [(6, 2, 5), (0, 0, 7), (12, 12, 3), (10, 5, 0), (15, 1, 4)]


@pytest.mark.parametrize("pad_size,group_size,nq", REFERENCE_LAYOUTS)
def test_structured_equals_dense(pad_size, group_size, nq):
    q, k, v = reference_qkv(w=pad_size + nq, requires_grad=True)
    a = reference.dn_self_attention(q, k, v, pad_size, group_size)
    b = reference.dn_self_attention_dense(q, k, v, pad_size, group_size)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, (q, k, v), g)
    gb = torch.autograd.grad(b, (q, k, v), g)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad_size,group_size,nq", [(10, 5, 30), (0, 0, 12), (18, 6, 9)])
def test_equals_multihead_attention_with_dn_mask(pad_size, group_size, nq):
    e, heads, b = 16, 4, 2
    w = pad_size + nq
    mha = torch.nn.MultiheadAttention(e, heads, batch_first=True, dtype=torch.float64)
    x = torch.randn(b, w, e, dtype=torch.float64, requires_grad=True)
    mask = reference.dn_attn_mask(pad_size, group_size, nq)
    expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False)

    def structured(inp):
        qp, kp, vp = torch.nn.functional.linear(inp, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
        heads_first = [t.view(b, w, heads, e // heads).transpose(1, 2) for t in (qp, kp, vp)]
        out = reference.dn_self_attention(*heads_first, pad_size, group_size)
        return mha.out_proj(out.transpose(1, 2).reshape(b, w, e))

    out = structured(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    params = [x, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight]
    for a, c in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(expected, params, g), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_reference_gradcheck():
    q, k, v = reference_qkv(b=1, h=2, w=7, dh=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: reference.dn_self_attention(*t, 4, 2), (q, k, v))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_reference_low_precision(dtype, tol):
    q, k, v = reference_qkv(w=13, dh=16)
    expected = reference.dn_self_attention_dense(q, k, v, 8, 4)
    out = reference.dn_self_attention(q.to(dtype), k.to(dtype), v.to(dtype), 8, 4)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_reference_scale_argument():
    q, k, v = reference_qkv(w=9)
    a = reference.dn_self_attention(q, k, v, 4, 2, scale=0.3)
    b = reference.dn_self_attention_dense(q, k, v, 4, 2, scale=0.3)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, reference.dn_self_attention(q, k, v, 4, 2))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v: (q[0], k[0], v[0], 4, 2), "must be \\(B, H, W, Dh\\)"),
        (lambda q, k, v: (q, k[:, :, :-1], v, 4, 2), "must share"),
        (lambda q, k, v: (q, k.float(), v, 4, 2), "share dtype"),
        (lambda q, k, v: (q, k, v, 5, 2), "multiple of group_size"),
        (lambda q, k, v: (q, k, v, 40, 2), "exceeds"),
        (lambda q, k, v: (q.long(), k.long(), v.long(), 4, 2), "floating"),
    ],
)
def test_reference_bad_inputs(mutate, match):
    with pytest.raises(ValueError, match=match):
        reference.dn_self_attention(*mutate(*reference_qkv()))


# ---- the compiled kernel (C++), the SDPA backend and DNMultiheadAttention --------------------------------------------


op = torch.ops.dnops.dn_self_attention


def qkv(b=2, h=3, w=11, dh=8, dtype=torch.float64):
    return [torch.randn(b, h, w, dh, dtype=dtype, requires_grad=True) for _ in range(3)]


LAYOUTS = [(6, 2, 5), (0, 0, 7), (12, 12, 3), (10, 5, 0), (15, 1, 4), (40, 8, 17), (21, 7, 1)]


@cpp
@pytest.mark.parametrize("pad_size,group_size,nq", LAYOUTS)
@pytest.mark.parametrize("dh", [1, 8, 30, 71])
def test_matches_dense_definition(pad_size, group_size, nq, dh):
    q, k, v = qkv(w=pad_size + nq, dh=dh)
    out = dnops.dn_self_attention(q, k, v, pad_size, group_size)
    ref = reference.dn_self_attention_dense(q, k, v, pad_size, group_size)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@cpp
def test_lse_output():
    q, k, v = qkv(w=9)
    _, lse = op(q, k, v, 4, 2, 8**-0.5)
    scores = (q @ k.transpose(-1, -2)) * 8**-0.5
    scores = scores.masked_fill(reference.dn_attn_mask(4, 2, 5), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1))


@cpp
def test_gradcheck():
    q, k, v = qkv(b=1, h=2, w=7, dh=3)
    assert torch.autograd.gradcheck(lambda *t: dnops.dn_self_attention(*t, 4, 2), (q, k, v))


@cpp
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_low_precision(dtype, tol):
    q, k, v = (t.detach() for t in qkv(w=29, dh=16))
    expected = reference.dn_self_attention_dense(q, k, v, 24, 6)
    args = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = dnops.dn_self_attention(*args, 24, 6)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    out.float().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == dtype and torch.isfinite(a.grad).all() for a in args)


@cpp
def test_empty_batch_and_non_contiguous():
    q, k, v = qkv(b=0, w=9)
    assert dnops.dn_self_attention(q, k, v, 4, 2).shape == (0, 3, 9, 8)
    base = torch.randn(2, 9, 3, 8, dtype=torch.float64)
    q = base.transpose(1, 2)
    assert not q.is_contiguous()
    torch.testing.assert_close(dnops.dn_self_attention(q, q, q, 4, 2), reference.dn_self_attention_dense(q, q, q, 4, 2))


@cpp
def test_opcheck():
    q, k, v = qkv(w=9)
    opcheck(op.default, (q, k, v, 4, 2, 0.3))
    out, lse = op(q, k, v, 4, 2, 0.3)
    opcheck(
        torch.ops.dnops._dn_self_attention_backward.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 4, 2, 0.3),
    )


@cpp
def test_compile_fullgraph():
    q, k, v = qkv(w=13, dtype=torch.float32)
    fn = torch.compile(lambda a, b, c: dnops.dn_self_attention(a, b, c, 8, 4), fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    want = reference.dn_self_attention_dense(q, k, v, 8, 4)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    grad = torch.randn_like(out)
    for got, ref in zip(
        torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad), strict=True
    ):
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5)


@cpp
def test_kernel_rejects_bad_structure():
    q, k, v = qkv(w=9)
    with pytest.raises(RuntimeError, match="multiple of group_size"):
        op(q, k, v, 5, 2, 1.0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        dnops.dn_self_attention(q, k, v, 5, 2)


def dn_detr_layout(m):  # 5 groups of M, 300 matching queries
    return 5 * m, m, 300


def dino_layout(m):  # CDN groups of 2M, 900 matching queries, as many groups as DINO's dn_number=100 gives
    groups = 1 if m == 0 else max(1, 200 // (2 * m))
    return groups * 2 * m, 2 * m, 900


@cpp
@pytest.mark.parametrize("layout", [dn_detr_layout, dino_layout])
@pytest.mark.parametrize("m", [0, 1, 7, 30])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_equals_parent_with_dense_mask(layout, m, batch_first):
    pad, group, nq = layout(m)
    width, embed, heads, batch = pad + nq, 32, 4, 2
    torch.manual_seed(m)
    parent = torch.nn.MultiheadAttention(embed, heads, batch_first=batch_first, dtype=torch.float64)
    ours = DNMultiheadAttention(embed, heads, batch_first=batch_first, dtype=torch.float64)
    assert list(ours.state_dict()) == list(parent.state_dict())
    ours.load_state_dict(parent.state_dict())
    shape = (batch, width, embed) if batch_first else (width, batch, embed)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    v = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = reference.dn_attn_mask(pad, group, nq)
    expected, _ = parent(x, x, v, attn_mask=mask, need_weights=False)
    got, weights = ours(x, x, v, attn_mask=mask)
    assert weights is None
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    got2, _ = ours(x, x, v, dn=(pad, group))
    torch.testing.assert_close(got2, expected, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(got)
    want = torch.autograd.grad(expected, [x, v, *parent.parameters()], g)
    have = torch.autograd.grad(got, [x, v, *ours.parameters()], g)
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@cpp
@pytest.mark.parametrize("sharing", ["q=k=v", "q=k", "distinct"])
@pytest.mark.parametrize(("bias", "kdim"), [(True, None), (False, None), (True, 24)])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_projections_match_parent(sharing, bias, kdim, batch_first):
    # The fast path shares one matrix product among inputs that are the same tensor, and projects separately
    # with kdim / vdim; each way must give the parent's output and gradients.
    pad, group, nq, embed, heads, batch = 12, 4, 10, 16, 2, 3
    torch.manual_seed(1)
    kw = dict(bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first, dtype=torch.float64)
    parent = torch.nn.MultiheadAttention(embed, heads, **kw)
    ours = DNMultiheadAttention(embed, heads, **kw)
    ours.load_state_dict(parent.state_dict())

    def make(dim):
        shape = (batch, pad + nq, dim) if batch_first else (pad + nq, batch, dim)
        return torch.randn(shape, dtype=torch.float64, requires_grad=True)

    q = make(embed)
    if kdim is not None:
        k, v = make(kdim), make(kdim)
    else:
        k = q if sharing != "distinct" else make(embed)
        v = q if sharing == "q=k=v" else make(embed)
    mask = reference.dn_attn_mask(pad, group, nq)
    expected = parent(q, k, v, attn_mask=mask, need_weights=False)[0]
    got = ours(q, k, v, dn=(pad, group))[0]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    leaves = list({id(t): t for t in (q, k, v)}.values())
    g = torch.randn_like(got)
    want = torch.autograd.grad(expected, [*leaves, *parent.parameters()], g)
    have = torch.autograd.grad(got, [*leaves, *ours.parameters()], g)
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@cpp
def test_mha_takes_the_fast_path(monkeypatch):
    calls = []
    import dnops.nn.dn_mha as mod

    real = mod.dn_self_attention
    monkeypatch.setattr(mod, "dn_self_attention", lambda *a, **k: calls.append(a[3:5]) or real(*a, **k))
    mha = DNMultiheadAttention(16, 2).eval()
    x = torch.randn(30, 2, 16)
    mha(x, x, x, attn_mask=reference.dn_attn_mask(20, 5, 10))
    mha(x, x, x, attn_mask=reference.dn_attn_mask(20, 5, 10))
    assert calls == [(20, 5), (20, 5)]
    mha(x, x, x, attn_mask=torch.rand(30, 30) < 0.5)  # not a DN mask: parent path
    mha(x, x, x, attn_mask=reference.dn_attn_mask(20, 5, 10), need_weights=True)
    assert len(calls) == 2


@cpp
def test_mha_fallbacks_match_parent():
    torch.manual_seed(0)
    parent = torch.nn.MultiheadAttention(16, 2, dropout=0.0)
    ours = DNMultiheadAttention(16, 2)
    ours.load_state_dict(parent.state_dict())
    x = torch.randn(30, 2, 16)
    mask = reference.dn_attn_mask(20, 5, 10)
    kpm = torch.zeros(2, 30, dtype=torch.bool)
    kpm[1, -3:] = True
    for kw in ({"key_padding_mask": kpm}, {"need_weights": True}):
        want = parent(x, x, x, attn_mask=mask, **kw)
        have = ours(x, x, x, attn_mask=mask, **kw)
        torch.testing.assert_close(have[0], want[0])
    # dn= without a mask still means the DN mask on the fallback path
    torch.testing.assert_close(
        ours(x, x, x, key_padding_mask=kpm, dn=(20, 5))[0], parent(x, x, x, attn_mask=mask, key_padding_mask=kpm)[0]
    )


@cpp
def test_mha_dropout_in_training_uses_parent():
    mha = DNMultiheadAttention(16, 2, dropout=0.5).train()
    x = torch.randn(30, 2, 16)
    torch.manual_seed(3)
    a = mha(x, x, x, dn=(20, 5))[0]
    torch.manual_seed(3)
    b = torch.nn.MultiheadAttention.forward(mha, x, x, x, attn_mask=reference.dn_attn_mask(20, 5, 10))[0]
    torch.testing.assert_close(a, b)


@cpp
def test_recognise_dn_mask():
    assert recognise_dn_mask(reference.dn_attn_mask(12, 4, 7)) == (12, 4)
    assert recognise_dn_mask(reference.dn_attn_mask(0, 0, 7)) == (0, 0)
    broken = reference.dn_attn_mask(12, 4, 7).clone()
    broken[3, 2] = True  # group 0 may see its own slot 2
    assert recognise_dn_mask(broken) is None
    assert recognise_dn_mask(reference.dn_attn_mask(12, 4, 7).float()) is None


@cpp
@pytest.mark.parametrize("pad_size,group_size,nq", LAYOUTS)
@pytest.mark.parametrize("dh", [1, 8, 30])
def test_sdpa_backend_matches_dense_definition(backend_env, pad_size, group_size, nq, dh):
    backend_env("sdpa")
    q, k, v = [torch.randn(2, 3, pad_size + nq, dh, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    out = dnops.dn_self_attention(q, k, v, pad_size, group_size, scale=0.3)
    want = reference.dn_self_attention_dense(q, k, v, pad_size, group_size, scale=0.3)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(want, [q, k, v], g), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-11)


@cpp
def test_sdpa_backend_gradcheck_and_low_precision(backend_env):
    backend_env("sdpa")
    qkv = [torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda q, k, v: dnops.dn_self_attention(q, k, v, 6, 3), qkv)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
        q, k, v = [torch.randn(2, 4, 60, 32).to(dtype) for _ in range(3)]
        out = dnops.dn_self_attention(q, k, v, 40, 10)
        assert out.dtype == dtype
        want = reference.dn_self_attention_dense(q.double(), k.double(), v.double(), 40, 10)
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


@cpp
def test_sdpa_is_the_gpu_default_and_an_override_everywhere(backend_env):

    assert _backend.choose("dn_self_attention", torch.device("cuda")) == "sdpa"
    backend_env("sdpa")
    assert _backend.choose("dn_self_attention", torch.device("cpu")) == "sdpa"
    # deformable attention has no sdpa formulation: the request does not concern it, it runs its default
    assert _backend.choose("ms_deform_attn", torch.device("cpu")) == "cpu"


# ---- the Triton kernels, in Triton's interpreter ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tri():
    from dnops.triton.dn_self_attention import dn_self_attention_triton

    return dn_self_attention_triton


# group sizes that are and are not multiples of the 16-wide blocks, one group, no DN part, no matching part
TRITON_LAYOUTS = [(21, 7, 11), (32, 16, 9), (10, 10, 20), (0, 0, 19), (24, 6, 0), (40, 20, 1)]


@pytest.mark.triton
@pytest.mark.parametrize("pad_size,group_size,nq", TRITON_LAYOUTS)
@pytest.mark.parametrize("dh", [8, 30])
def test_triton_forward_and_grads(tri, pad_size, group_size, nq, dh):
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


@pytest.mark.triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_triton_low_precision(tri, dtype, tol):
    q, k, v = [torch.randn(1, 2, 29, 16, dtype=torch.float64) for _ in range(3)]
    expected = reference.dn_self_attention_dense(q, k, v, 18, 6)
    out, _ = tri(q.to(dtype), k.to(dtype), v.to(dtype), 18, 6, 0.25)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.double(), reference.dn_self_attention_dense(q, k, v, 18, 6, 0.25), rtol=tol, atol=tol
    )
    assert expected.shape == out.shape


@pytest.mark.triton
def test_public_function_routes_to_triton(backend_env):
    backend_env("triton")
    q, k, v = [torch.randn(1, 2, 13, 8, dtype=torch.float64) for _ in range(3)]
    torch.testing.assert_close(dnops.dn_self_attention(q, k, v, 8, 4), reference.dn_self_attention_dense(q, k, v, 8, 4))


@pytest.mark.triton
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


@pytest.mark.triton
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


# ---- hardening: bad inputs, limits, double backward ------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends("dn_self_attention"))
def test_double_backward_raises(backend, backend_env):
    backend_env(backend)
    inputs = [torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    check_double_backward("dn_self_attention", backend, dnops.dn_self_attention(*inputs, 6, 3), inputs)


def test_double_backward_check_fails_on_a_planted_error():
    """The check asserts what it names: a backend claimed to raise that differentiates twice (the reference's output
    handed over as the cpu kernel's) fails it, and so does a reference claimed to differentiate twice that cannot
    (sdpa's output handed over as the reference's)."""
    inputs = [torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    with dnops.use_backend("reference"):
        twice = dnops.dn_self_attention(*inputs, 6, 3)
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        check_double_backward("dn_self_attention", "cpu", twice, inputs)
    with dnops.use_backend("sdpa"):
        once = dnops.dn_self_attention(*inputs, 6, 3)
    with pytest.raises(RuntimeError, match="is not implemented"):
        check_double_backward("dn_self_attention", "reference", once, inputs)


@pytest.mark.parametrize("backend", backends("dn_self_attention"))
def test_structure_sizes_as_any_integer_the_same_on_every_backend(backend, backend_env):
    """pad_size / group_size as a numpy integer, an integral float or a 0-dim tensor run as the int would; a
    fractional or non-numeric one raises naming the argument, before any backend sees it."""
    import numpy as np

    backend_env(backend)
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64) for _ in range(3))
    want = reference.dn_self_attention_dense(q, k, v, 6, 3)
    for pad, group in ((np.int64(6), np.int32(3)), (6.0, 3.0), (torch.tensor(6), torch.tensor(3, dtype=torch.int32))):
        torch.testing.assert_close(dnops.dn_self_attention(q, k, v, pad, group), want, rtol=1e-10, atol=1e-10)
    for pad, group, name in ((6.5, 3, "pad_size"), (6, "3", "group_size"), (6, torch.tensor([3]), "group_size")):
        with pytest.raises(ValueError, match=f"dn_self_attention: {name} must be an integer"):
            dnops.dn_self_attention(q, k, v, pad, group)
    torch.testing.assert_close(dnops.dn_attn_mask(np.int64(6), 3.0, torch.tensor(6)), dnops.dn_attn_mask(6, 3, 6))
    with pytest.raises(ValueError, match="dn_attn_mask: num_queries must be an integer"):
        dnops.dn_attn_mask(6, 3, 6.5)


def test_dn_self_attention_rejects_zero_head_dim():
    q = torch.randn(1, 2, 10, 0)
    with pytest.raises(ValueError, match="Dh >= 1"):
        dnops.dn_self_attention(q, q, q, 4, 2)


def _mha_and_input():
    from dnops.nn import DNMultiheadAttention

    torch.manual_seed(0)
    mha = DNMultiheadAttention(16, 2).double().eval()
    parent = torch.nn.MultiheadAttention(16, 2).double().eval()
    parent.load_state_dict(mha.state_dict())
    return mha, parent, torch.randn(27, 2, 16, dtype=torch.float64)


@pytest.mark.parametrize("batch", [2, 40])
def test_dn_mha_takes_the_math_path_for_small_problems_on_the_cpu(batch, monkeypatch):
    """B * H * W * W at or below CPU_MATH_PATH_MAX: the parent's path (no dn_self_attention call), the same result;
    above it the block-sparse path."""
    from dnops.nn import dn_mha

    monkeypatch.setattr(dn_mha, "CPU_MATH_PATH_MAX", 2 * 2 * 27 * 27)
    calls = []
    monkeypatch.setattr(dn_mha, "dn_self_attention", lambda *a: calls.append(a) or dnops.dn_self_attention(*a))
    mha, parent, _ = _mha_and_input()
    x = torch.randn(27, batch, 16, dtype=torch.float64)
    mask = dnops.dn_attn_mask(12, 4, 15)
    torch.testing.assert_close(mha(x, x, x, attn_mask=mask)[0], parent(x, x, x, attn_mask=mask)[0])
    assert len(calls) == (0 if batch == 2 else 1)


def test_dn_mha_pickles_after_a_masked_call(tmp_path):
    mha, _, x = _mha_and_input()
    mask = dnops.dn_attn_mask(12, 4, 15)
    before = mha(x, x, x, attn_mask=mask)[0]
    torch.save(mha, tmp_path / "mha.pt")
    loaded = torch.load(tmp_path / "mha.pt", weights_only=False)
    torch.testing.assert_close(loaded(x, x, x, attn_mask=mask)[0], before)


def test_dn_mha_honours_a_mask_that_is_not_the_dn_mask():
    mha, parent, x = _mha_and_input()
    other = torch.rand(27, 27) < 0.3
    other.fill_diagonal_(False)
    got = mha(x, x, x, attn_mask=other, dn=(12, 4))[0]
    torch.testing.assert_close(got, parent(x, x, x, attn_mask=other)[0])
    dn_mask = dnops.dn_attn_mask(12, 4, 15)
    torch.testing.assert_close(mha(x, x, x, attn_mask=dn_mask, dn=(12, 4))[0], parent(x, x, x, attn_mask=dn_mask)[0])


def test_dn_mha_takes_the_mask_dict_of_the_dn_detr_adapter():
    from dnops.compat import dn_detr

    targets = [{"labels": torch.tensor([1, 2, 3]), "boxes": torch.rand(3, 4) * 0.5 + 0.2}, {"labels": torch.tensor([4]),
               "boxes": torch.rand(1, 4) * 0.5 + 0.2}]  # fmt: skip
    enc = torch.nn.Embedding(11, 15)
    _, _, mask, mask_dict = dn_detr.prepare_for_dn(
        (targets, 4, 0.2, 0.4, 1), torch.rand(15, 4), 2, True, 15, 10, 16, enc
    )
    mha, parent, _ = _mha_and_input()
    x = torch.randn(mask.shape[0], 2, 16, dtype=torch.float64)
    torch.testing.assert_close(mha(x, x, x, dn=mask_dict)[0], parent(x, x, x, attn_mask=mask)[0])


def test_dn_mha_compiles_fullgraph_with_a_mask():
    mha, parent, x = _mha_and_input()
    mask = dnops.dn_attn_mask(12, 4, 15)
    torch._dynamo.reset()
    got = torch.compile(lambda x: mha(x, x, x, attn_mask=mask)[0], fullgraph=True)(x)
    torch.testing.assert_close(got, parent(x, x, x, attn_mask=mask)[0])


# ---- properties: random valid inputs equal the reference, random invalid ones name the argument (hypothesis) ---------


KERNELS = backends("dn_self_attention", without=("reference",))


@st.composite
def dsa_inputs(draw):
    groups, group_size = draw(st.integers(0, 3)), draw(st.integers(1, 5))
    nq, dh, b, h = draw(st.integers(0, 9)), draw(st.integers(1, 12)), draw(st.integers(0, 2)), draw(st.integers(1, 3))
    pad = groups * group_size
    if pad + nq == 0:
        nq = 1
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    qkv = [torch.randn(b, h, pad + nq, dh, generator=g, dtype=torch.float64) for _ in range(3)]
    return qkv, pad, group_size if pad else 0


@pytest.mark.parametrize("backend", KERNELS)
@SETTINGS
@given(case=dsa_inputs())
def test_dn_self_attention_equals_reference(backend, case):
    qkv, pad, group = case
    qkv = [t.requires_grad_() for t in qkv]
    out = run(backend, dnops.dn_self_attention, *qkv, pad, group)
    ref = reference.dn_self_attention(*qkv, pad, group)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    if out.numel():
        g = torch.randn_like(out)
        for x, y in zip(torch.autograd.grad(out, qkv, g), torch.autograd.grad(ref, qkv, g), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("backend", backends("dn_self_attention"))
@SETTINGS
@given(case=dsa_inputs(), pick=st.integers(0, 5))
def test_dn_self_attention_invalid_inputs_name_the_argument(backend, case, pick):
    (q, k, v), pad, group = case
    width = q.shape[2]
    bad = [
        ("pad_size", (q, k, v, width + 1, 1)),
        ("pad_size", (q, k, v, -1, 1)),
        ("q", (q.flatten(0, 1), k, v, pad, group)),
        ("q", (q.long(), k, v, pad, group)),
        ("q", (q, k[..., :0], v, pad, group)),
        ("group_size", (q, k, v, width, 0) if width else (q, k, v, 0, 0)),
    ][pick]
    name, args = bad
    if name == "group_size" and not width:
        return
    with pytest.raises(ValueError, match=name):
        run(backend, dnops.dn_self_attention, *args)


# ---- autocast --------------------------------------------------------------------------------------------------------


AMP_BACKENDS = backends("dn_self_attention", without=("triton", "sdpa"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("backend", AMP_BACKENDS)
def test_dn_self_attention_and_dn_mha_under_autocast(backend, backend_env):
    backend_env(backend)
    torch.manual_seed(0)
    mha = DNMultiheadAttention(64, 4)
    x = torch.randn(50, 2, 64, requires_grad=True)
    want = mha(x, x, x, dn=(20, 5))[0]
    (want_gx,) = torch.autograd.grad(want.sum(), [x])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mha(x, x, x, dn=(20, 5))[0]
    assert got.dtype == torch.bfloat16
    (got_gx,) = torch.autograd.grad(got.float().sum(), [x])
    assert rel_err(got, want) < 5e-2 and rel_err(got_gx, want_gx) < 5e-2

    q, k, v = (torch.randn(2, 4, 50, 16) for _ in range(3))
    want = reference.dn_self_attention(q, k, v, 20, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dnops.dn_self_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 20, 5)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 5e-2


# ---- on the GPU (pytest -m cuda) and the CUDA emulator (pytest -m emulated) ------------------------------------------


DSA_SHAPES = [(2, 3, 5, 16), (2, 4, 0, 8), (3, 5, 7, 30), (1, 8, 10, 64), (0, 1, 9, 71), (5, 1, 1, 32)]


def dsa(backend: str):
    needs("dn_self_attention", backend)
    return backend_fn(backend, dnops.dn_self_attention)


@cuda
@pytest.mark.parametrize("backend", backends("dn_self_attention", "cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups,group_size,num_queries,dh", DSA_SHAPES)
def test_gpu_backends_equal_reference(backend, dtype, groups, group_size, num_queries, dh):
    fn = dsa(backend)
    pad = groups * group_size
    width = pad + num_queries
    qkv = [torch.randn(2, 3, width, dh, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]

    def call(f):
        return lambda q, k, v: f(q, k, v, pad, group_size if pad else 0)

    check_against_reference(call(fn), call(reference.dn_self_attention), qkv, dtype, f"dn_self_attention[{backend}]")


@cuda
@pytest.mark.parametrize("backend", backends("dn_self_attention", "cuda"))
def test_gpu_non_contiguous(backend):
    fn = dsa(backend)
    x = torch.randn(2, 40, 3, 32, device="cuda")  # (B, W, H, Dh) seen as (B, H, W, Dh)
    qkv = [x.transpose(1, 2).clone().transpose(1, 2).transpose(1, 2).requires_grad_() for _ in range(3)]
    assert not qkv[0].is_contiguous()

    def call(f):
        return lambda q, k, v: f(q, k, v, 20, 5)

    check_against_reference(call(fn), call(reference.dn_self_attention), qkv, torch.float32, "non-contiguous")


# ---- reproducibility (docs/kernels.md's contract) --------------------------------------------------------------------


def _grads_at(threads: int, fn, q, k, v, g, pad_size, group_size):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = fn(q, k, v, pad_size, group_size)
        return (out, *torch.autograd.grad(out, [q, k, v], g))
    finally:
        torch.set_num_threads(before)


@cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [(2, 4, 250, 32, 150, 30), (1, 3, 37, 7, 12, 4)], ids=["dn-detr", "odd"])
def test_cpu_results_are_the_same_bits_at_any_thread_count(dtype, layout):
    """Forward and dq / dk / dv: every (image, head, group) item owns its rows, and ATen's CPU flash attention
    (the matching part) splits by (image, head): 1, 2 and 4 threads give the same bits."""
    b, h, w, dh, pad_size, group_size = layout
    q, k, v = (torch.randn(b, h, w, dh, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(b, h, w, dh, dtype=dtype)
    cpu = backend_fn("cpu", dnops.dn_self_attention)
    first = _grads_at(1, cpu, q, k, v, g, pad_size, group_size)
    for threads in (2, 4):
        again = _grads_at(threads, cpu, q, k, v, g, pad_size, group_size)
        for name, x, y in zip(("out", "dq", "dk", "dv"), first, again, strict=True):
            assert torch.equal(x, y), f"{name} at {threads} threads"


@cuda
def test_gpu_triton_results_are_the_same_bits_run_after_run():
    """No atomics in the Triton backward (dq and dk / dv by separate programs that own their rows). The sdpa backend
    is torch's scaled_dot_product_attention, under torch's own determinism rules."""
    fn = dsa("triton")
    q, k, v = (torch.randn(2, 4, 250, 32, device="cuda", requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)

    def run():
        out = fn(q, k, v, 150, 30)
        return (out, *torch.autograd.grad(out, [q, k, v], g))

    first = run()
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(first, run(), strict=True))
