"""The C++ CPU kernel of dn_self_attention and the DNMultiheadAttention drop-in, against the reference."""

import pytest
import torch
from torch.library import opcheck

import dnops
from dnops import reference
from dnops.nn import DNMultiheadAttention
from dnops.nn.dn_mha import recognise_dn_mask
from tests.conftest import requires_cpp

pytestmark = requires_cpp("dn_self_attention")
op = torch.ops.dnops.dn_self_attention


def qkv(b=2, h=3, w=11, dh=8, dtype=torch.float64):
    return [torch.randn(b, h, w, dh, dtype=dtype, requires_grad=True) for _ in range(3)]


LAYOUTS = [(6, 2, 5), (0, 0, 7), (12, 12, 3), (10, 5, 0), (15, 1, 4), (40, 8, 17), (21, 7, 1)]


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


def test_lse_output():
    q, k, v = qkv(w=9)
    _, lse = op(q, k, v, 4, 2, 8**-0.5)
    scores = (q @ k.transpose(-1, -2)) * 8**-0.5
    scores = scores.masked_fill(reference.dn_attn_mask(4, 2, 5), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1))


def test_gradcheck():
    q, k, v = qkv(b=1, h=2, w=7, dh=3)
    assert torch.autograd.gradcheck(lambda *t: dnops.dn_self_attention(*t, 4, 2), (q, k, v))


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


def test_empty_batch_and_non_contiguous():
    q, k, v = qkv(b=0, w=9)
    assert dnops.dn_self_attention(q, k, v, 4, 2).shape == (0, 3, 9, 8)
    base = torch.randn(2, 9, 3, 8, dtype=torch.float64)
    q = base.transpose(1, 2)
    assert not q.is_contiguous()
    torch.testing.assert_close(dnops.dn_self_attention(q, q, q, 4, 2), reference.dn_self_attention_dense(q, q, q, 4, 2))


def test_opcheck():
    q, k, v = qkv(w=9)
    opcheck(op.default, (q, k, v, 4, 2, 0.3))
    out, lse = op(q, k, v, 4, 2, 0.3)
    opcheck(
        torch.ops.dnops._dn_self_attention_backward.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 4, 2, 0.3),
    )


def test_compile_fullgraph():
    q, k, v = qkv(w=13, dtype=torch.float32)
    fn = torch.compile(lambda a, b, c: dnops.dn_self_attention(a, b, c, 8, 4), fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    torch.testing.assert_close(out, reference.dn_self_attention_dense(q, k, v, 8, 4), rtol=2e-5, atol=2e-5)
    out.sum().backward()
    assert q.grad is not None


def test_kernel_rejects_bad_structure():
    q, k, v = qkv(w=9)
    with pytest.raises(RuntimeError, match="multiple of group_size"):
        op(q, k, v, 5, 2, 1.0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        dnops.dn_self_attention(q, k, v, 5, 2)


# ---- DNMultiheadAttention --------------------------------------------------------------------------------------


def dn_detr_layout(m):  # 5 groups of M, 300 matching queries
    return 5 * m, m, 300


def dino_layout(m):  # CDN groups of 2M, 900 matching queries, as many groups as DINO's dn_number=100 gives
    groups = 1 if m == 0 else max(1, 200 // (2 * m))
    return groups * 2 * m, 2 * m, 900


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


def test_mha_dropout_in_training_uses_parent():
    mha = DNMultiheadAttention(16, 2, dropout=0.5).train()
    x = torch.randn(30, 2, 16)
    torch.manual_seed(3)
    a = mha(x, x, x, dn=(20, 5))[0]
    torch.manual_seed(3)
    b = torch.nn.MultiheadAttention.forward(mha, x, x, x, attn_mask=reference.dn_attn_mask(20, 5, 10))[0]
    torch.testing.assert_close(a, b)


def test_recognise_dn_mask():
    assert recognise_dn_mask(reference.dn_attn_mask(12, 4, 7)) == (12, 4)
    assert recognise_dn_mask(reference.dn_attn_mask(0, 0, 7)) == (0, 0)
    broken = reference.dn_attn_mask(12, 4, 7).clone()
    broken[3, 2] = True  # group 0 may see its own slot 2
    assert recognise_dn_mask(broken) is None
    assert recognise_dn_mask(reference.dn_attn_mask(12, 4, 7).float()) is None


# ---- the sdpa backend: two scaled_dot_product_attention calls over the visible blocks ---------------------------


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


def test_sdpa_is_the_gpu_default_and_an_override_everywhere(backend_env):
    from dnops import _backend

    assert _backend.choose("dn_self_attention", torch.device("cuda")) == "sdpa"
    backend_env("sdpa")
    assert _backend.choose("dn_self_attention", torch.device("cpu")) == "sdpa"
    assert _backend.choose("ms_deform_attn", torch.device("cpu")) == "reference"  # no sdpa formulation: warns
