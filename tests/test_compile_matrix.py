"""One torch.compile matrix: every public op and module x every backend the CPU has (the GPU half, with the CUDA
and Triton backends, is tests/test_gpu.py's compile tests) x fullgraph=True x dynamic False / True, forward and
backward against eager. aot_eager (Dynamo and AOTAutograd, what a graph break or a data-dependent size would stop)
for the matrix, inductor for one case per op."""

from __future__ import annotations

import pytest
import torch

import dnops
from dnops import _backend
from tests.msda_utils import make_inputs

CPU_BACKENDS = {
    "ms_deform_attn": ["reference", "cpp"],
    "ms_deform_attn_logits": ["reference", "cpp"],
    "dn_self_attention": ["reference", "cpp", "sdpa"],
    "dn_queries_dn": ["reference", "cpp"],
    "dn_queries_cdn": ["reference", "cpp"],
    "dn_attn_mask": ["reference", "cpp"],
    "MSDeformAttn": ["reference", "cpp"],
    "DNMultiheadAttention": ["reference", "cpp", "sdpa"],
}


def _msda(logits: bool):
    def make(scale: int):
        # scale 1 and 2 differ in N, Lq, S and the level count: the dynamic graph must serve both
        shapes = ((4, 5), (2, 3)) if scale == 1 else ((3, 4), (2, 2), (1, 1))
        args = make_inputs(n=scale + 1, lq=2 + scale, shapes=shapes, requires_grad=True)
        return (lambda *a: dnops.ms_deform_attn(*a, attention_logits=logits)), args, [args[0], args[3], args[4]]

    return make


def _dsa(scale: int):
    pad, group = (6, 3) if scale == 1 else (8, 4)
    qkv = [torch.randn(2, 2, pad + 3 + scale, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    return (lambda q, k, v: dnops.dn_self_attention(q, k, v, pad, group)), qkv, qkv


def _dnq(mode: str):
    def make(scale: int):
        counts = [2, 0, 3] if scale == 1 else [4, 1]
        k = sum(counts)
        labels, boxes = torch.randint(0, 9, (k,)), torch.rand(k, 4, dtype=torch.float64) * 0.4 + 0.3

        def fn(labels, boxes):
            out = dnops.dn_queries(labels, boxes, counts, num_classes=9, mode=mode, seed=5)
            return out.boxes * 1.0 + out.labels.unsqueeze(-1)

        return fn, [labels, boxes], []

    return make


def _mask(scale: int):
    pad, group, queries = (6, 3, 5) if scale == 1 else (12, 4, 7)
    return (lambda: dnops.dn_attn_mask(pad, group, queries).double()), [], []


def _msda_module(scale: int):
    from dnops.nn import MSDeformAttn

    torch.manual_seed(0)
    mod = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2).double()
    shapes = torch.tensor([[4, 5], [2, 3]] if scale == 1 else [[3, 3], [2, 2]])
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    s = int(shapes.prod(1).sum())
    query = torch.randn(2, 3 + scale, 16, dtype=torch.float64)
    refs = torch.rand(2, 3 + scale, 2, 2, dtype=torch.float64)
    src = torch.randn(2, s, 16, dtype=torch.float64, requires_grad=True)
    return (lambda q, r, x: mod(q, r, x, shapes, starts)), [query, refs, src], [src, *mod.parameters()]


def _mha(scale: int):
    from dnops.nn import DNMultiheadAttention

    torch.manual_seed(0)
    mha = DNMultiheadAttention(16, 2).double()
    pad, group = (6, 3) if scale == 1 else (8, 4)
    x = torch.randn(pad + 4 + scale, 2, 16, dtype=torch.float64, requires_grad=True)
    return (lambda x: mha(x, x, x, dn=(pad, group))[0]), [x], [x, *mha.parameters()]


CASES = {
    "ms_deform_attn": _msda(False),
    "ms_deform_attn_logits": _msda(True),
    "dn_self_attention": _dsa,
    "dn_queries_dn": _dnq("dn"),
    "dn_queries_cdn": _dnq("cdn"),
    "dn_attn_mask": _mask,
    "MSDeformAttn": _msda_module,
    "DNMultiheadAttention": _mha,
}
MATRIX = [(case, backend) for case, backends in CPU_BACKENDS.items() for backend in backends]


def _compare(fn, compiled, args, grad_inputs) -> None:
    want = fn(*args)
    got = compiled(*args)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if grad_inputs:
        g = torch.randn_like(want)
        got_grads = torch.autograd.grad(got, grad_inputs, g, allow_unused=True)
        want_grads = torch.autograd.grad(want, grad_inputs, g, allow_unused=True)
        for x, y in zip(got_grads, want_grads, strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("case,backend", MATRIX, ids=[f"{c}-{b}" for c, b in MATRIX])
def test_fullgraph_compile_equals_eager(case, backend, dynamic):
    if backend == "cpp" and not _backend.HAS_C:
        pytest.skip("dnops._C is not built")
    torch._dynamo.reset()
    with _backend.forced_backend(backend):
        for scale in (1, 2):  # a second shape: recompiled when static, the same graph when dynamic
            fn, args, grad_inputs = CASES[case](scale)
            compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
            _compare(fn, compiled, args, grad_inputs)


@pytest.mark.parametrize(
    # (sdpa under inductor in float64 fails on torch 2.11's CPU: "expected scalar type Double but found Float")
    "case,backend",
    [("ms_deform_attn", "reference"), ("dn_self_attention", "cpp"), ("dn_queries_cdn", "cpp")],
)
def test_inductor_compile_equals_eager(case, backend):
    if backend == "cpp" and not _backend.HAS_C:
        pytest.skip("dnops._C is not built")
    torch._dynamo.reset()
    with _backend.forced_backend(backend):
        fn, args, grad_inputs = CASES[case](1)
        _compare(fn, torch.compile(fn, fullgraph=True, backend="inductor"), args, grad_inputs)


def test_compiled_reference_level_checks_name_the_argument():
    """Under torch.compile the reference backend checks the levels inside the graph: a bad input raises when the
    compiled code runs, naming the argument."""
    torch._dynamo.reset()
    value, shapes, starts, loc, weights = make_inputs()
    with _backend.forced_backend("reference"):
        compiled = torch.compile(dnops.ms_deform_attn, fullgraph=True, dynamic=True, backend="aot_eager")
        compiled(value, shapes, starts, loc, weights)
        with pytest.raises(RuntimeError, match="level_start_index != exclusive cumsum"):
            compiled(value, shapes, starts + 1, loc, weights)
        with pytest.raises(RuntimeError, match="spatial_shapes do not cover the S positions"):
            compiled(value, shapes + torch.tensor([[1, 0], [0, 0]]), torch.tensor([0, 25]), loc, weights)
