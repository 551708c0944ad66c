import pytest
import torch

from dnops import reference


def qkv(b=2, h=3, w=11, dh=8, dtype=torch.float64, requires_grad=False):
    return [torch.randn(b, h, w, dh, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


LAYOUTS = [(6, 2, 5), (0, 0, 7), (12, 12, 3), (10, 5, 0), (15, 1, 4)]


@pytest.mark.parametrize("pad_size,group_size,nq", LAYOUTS)
def test_structured_equals_dense(pad_size, group_size, nq):
    q, k, v = qkv(w=pad_size + nq, requires_grad=True)
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


def test_gradcheck_structured():
    q, k, v = qkv(b=1, h=2, w=7, dh=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: reference.dn_self_attention(*t, 4, 2), (q, k, v))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision(dtype, tol):
    q, k, v = qkv(w=13, dh=16)
    expected = reference.dn_self_attention_dense(q, k, v, 8, 4)
    out = reference.dn_self_attention(q.to(dtype), k.to(dtype), v.to(dtype), 8, 4)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_scale_argument():
    q, k, v = qkv(w=9)
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
def test_bad_inputs(mutate, match):
    with pytest.raises(ValueError, match=match):
        reference.dn_self_attention(*mutate(*qkv()))
