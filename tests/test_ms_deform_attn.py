"""ms_deform_attn, every backend against the reference (dnops.reference.ms_deform_attn): the reference itself
against the loop definition, the compiled kernels, the Triton kernels (interpreter), bad inputs, properties,
autocast, and the GPU tests (``pytest -m cuda`` on a GPU, ``pytest -m emulated`` on the CUDA emulator);
the nn.MSDeformAttn module's drop-in tests. The compile matrix of every op is tests/test_compile_matrix.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import dnops
from dnops import _backend, reference
from dnops.nn import MSDeformAttn
from tests.backends import backends
from tests.conftest import check_double_backward, requires_cpp
from tests.gpu_utils import (
    DTYPES,
    as_float64,
    assert_matches_reference,
    assert_rel,
    assert_within_reference_error,
    backend_fn,
    check_against_reference,
    cuda,
    deterministic,
    msda,
    msda_args,
    needs,
    synchronize,
)
from tests.msda_utils import loop_ms_deform_attn, make_inputs
from tests.property_utils import SETTINGS, given, run, st

cpp = requires_cpp("ms_deform_attn")


# ---- the reference ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"shapes": ((3, 3),), "p": 1, "d": 1},
        {"shapes": ((5, 2), (1, 1), (2, 7)), "m": 3, "d": 3, "p": 3},
        {"n": 1, "lq": 5, "d": 7},
    ],
)
def test_matches_loop_definition(kw):
    args = make_inputs(**kw)
    torch.testing.assert_close(reference.ms_deform_attn(*args), loop_ms_deform_attn(*args), rtol=1e-12, atol=1e-12)


def test_borders_and_outside():
    value, shapes, starts, loc, weights = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=8, m=1, p=1)
    edges = torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [-0.5, 0.5], [1.5, 0.2], [0.125, 1 / 6], [-1e-9, 1.0 + 1e-9]],
        dtype=torch.float64,
    )
    loc[0, :, 0, :, 0] = edges[:, None, :]
    out = reference.ms_deform_attn(value, shapes, starts, loc, weights)
    torch.testing.assert_close(out, loop_ms_deform_attn(value, shapes, starts, loc, weights), rtol=1e-12, atol=1e-12)
    # A location a full pixel outside every map reads only zeros.
    assert out[0, 4].abs().max() == 0 and out[0, 5].abs().max() == 0


def test_reference_gradcheck():
    args = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=2, m=2, d=3, p=2, low=0.05, high=0.95, requires_grad=True)
    assert torch.autograd.gradcheck(reference.ms_deform_attn, args, eps=1e-6, atol=1e-5, nondet_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_low_precision_close_to_float64(dtype):
    args64 = make_inputs(d=8)
    expected = reference.ms_deform_attn(*args64)
    args = [t.to(dtype) if t.is_floating_point() else t for t in args64]
    out = reference.ms_deform_attn(*args)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_empty_queries_and_batch():
    for kw in ({"lq": 0}, {"n": 0}):
        args = make_inputs(**kw)
        out = reference.ms_deform_attn(*args)
        assert out.shape == (kw.get("n", 2), kw.get("lq", 3), 2 * 4)


def _replace(args, i, new):
    args = list(args)
    args[i] = new
    return args


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: _replace(a, 0, a[0][:, :-1]), "S="),
        (lambda a: _replace(a, 2, a[2] + 1), "level_start_index"),
        (lambda a: _replace(a, 1, a[1][:1]), "level_start_index has"),
        (lambda a: _replace(a, 0, a[0][0]), "value must have rank 4"),
        (lambda a: _replace(a, 3, a[3].float()), "sampling_locations has dtype"),
        (lambda a: _replace(a, 4, a[4][..., :1]), "attention_weights must be"),
        (lambda a: _replace(a, 1, a[1].int()), "spatial_shapes must be int64"),
        (lambda a: _replace(a, 3, a[3][:, :, :1]), "sampling_locations must be"),
        (lambda a: _replace(a, 0, a[0].long()), "value must be float"),
    ],
)
def test_bad_inputs_name_the_argument(mutate, match):
    with pytest.raises(ValueError, match=match):
        reference.ms_deform_attn(*mutate(make_inputs()))


def test_device_mix_raises():
    args = make_inputs()
    with pytest.raises(ValueError, match="sampling_locations is on cpu but value is on meta"):
        reference.ms_deform_attn(args[0].to("meta"), args[1].to("meta"), args[2].to("meta"), *args[3:])


# ---- the compiled kernels (C++ on the CPU) and the modules -----------------------------------------------------------


op = torch.ops.dnops.ms_deform_attn


def grads(fn, args, g):
    out = fn(*args)
    return out, torch.autograd.grad(out, [args[0], args[3], args[4]], g)


def assert_matches(args, logits=False, rtol=1e-10, atol=1e-10):
    grad_out = torch.randn(args[3].shape[0], args[3].shape[1], args[0].shape[2] * args[0].shape[3], dtype=args[0].dtype)
    out_ref, g_ref = grads(lambda *a: reference.ms_deform_attn(*a, logits), args, grad_out)
    out, g = grads(lambda *a: op(*a, logits), args, grad_out)
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    for name, x, y in zip(("value", "locations", "weights"), g, g_ref, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}")


@cpp
@pytest.mark.parametrize("d", [1, 30, 32, 71, 8, 64])
@pytest.mark.parametrize("logits", [False, True])
def test_float64_forward_and_grads(d, logits):
    assert_matches(make_inputs(d=d, requires_grad=True), logits)


@cpp
@pytest.mark.parametrize(
    "kw",
    [
        {"shapes": ((5, 7),), "p": 1},
        {"shapes": ((3, 3), (1, 1), (2, 5)), "m": 3, "p": 3},
        {"n": 3, "lq": 17, "m": 1},
    ],
)
def test_odd_layouts(kw):
    assert_matches(make_inputs(requires_grad=True, **kw))


@cpp
@pytest.mark.parametrize("d", [1, 30, 32, 71])
def test_gradcheck(d):
    args = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=2, m=2, d=d, p=2, low=0.05, high=0.95, requires_grad=True)
    assert torch.autograd.gradcheck(op, args, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda *a: op(*a, True), args, eps=1e-6, atol=1e-5)


@cpp
@pytest.mark.parametrize("d", [1025, 2048, 3096])
def test_wide_channels_forward(d):
    args = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=3, m=1, d=d, dtype=torch.float32)
    torch.testing.assert_close(op(*args), reference.ms_deform_attn(*args), rtol=1e-5, atol=1e-5)


@cpp
def test_matches_loop_definition_on_borders():
    value, shapes, starts, loc, weights = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=8, m=1, p=1)
    edges = torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [-0.5, 0.5], [1.5, 0.2], [0.125, 1 / 6], [-1 / 8, 1.0]],
        dtype=torch.float64,
    )
    loc[0, :, 0, :, 0] = edges[:, None, :]
    args = (value, shapes, starts, loc, weights)
    torch.testing.assert_close(op(*args), loop_ms_deform_attn(*args), rtol=1e-12, atol=1e-12)
    assert_matches([t.requires_grad_() if t.is_floating_point() else t for t in args])


@cpp
def test_nan_and_far_locations_read_zero():
    value, shapes, starts, loc, weights = make_inputs(n=1, lq=3, m=1, p=1)
    loc[0, 0] = float("nan")
    loc[0, 1] = 1e30
    loc[0, 2] = -1e30
    assert torch.equal(op(value, shapes, starts, loc, weights), torch.zeros(1, 3, 4, dtype=torch.float64))


# D = 16 takes the kernel's explicitly vectorized float32 rows, D = 30 its generic channel loops.
@cpp
@pytest.mark.parametrize("d", [16, 30])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision(dtype, tol, d):
    args64 = make_inputs(d=d, requires_grad=False)
    args = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in args64]
    ref_args = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in args]
    out = op(*args)
    assert out.dtype == dtype
    expected = reference.ms_deform_attn(*ref_args)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    g = torch.randn_like(expected)
    got = torch.autograd.grad(out, [args[0], args[3], args[4]], g.to(dtype))
    want = torch.autograd.grad(expected, [ref_args[0], ref_args[3], ref_args[4]], g)
    scale = {torch.float32: 1, torch.bfloat16: 10, torch.float16: 5}[dtype]
    for x, y in zip(got, want, strict=True):
        assert x.dtype == dtype
        torch.testing.assert_close(x.double(), y, rtol=tol * scale, atol=tol * scale)


@cpp
@pytest.mark.parametrize("d", [8, 16, 32, 30])
def test_bfloat16_backward_is_the_float32_backward_rounded_once(d):
    """bfloat16 widens to float32 exactly and the kernel accumulates in float32 (D = 16, 32: the vector rows read
    16 values at a time, in a permuted order that grad_output follows; D = 8: 8 at a time in order; D = 30 the
    generic loops): its gradients are the float32 kernel's on the widened inputs, each rounded to bfloat16 once (at
    most one bfloat16 ulp apart, from the float32 sums' order)."""
    args = [t.bfloat16() if t.is_floating_point() else t for t in make_inputs(d=d, lq=40, m=2, p=3)]
    wide = [t.float() if t.is_floating_point() else t for t in args]
    g = torch.randn(2, 40, 2 * d).bfloat16()
    got = torch.ops.dnops._ms_deform_attn_backward(g, *args)
    want = torch.ops.dnops._ms_deform_attn_backward(g.float(), *wide)
    for x, y in zip(got, want, strict=True):
        assert x.dtype == torch.bfloat16
        ulp = y.abs().clamp_min(1e-30) * 2.0**-7
        assert ((x.float() - y).abs() <= ulp + 1e-6).all()


@cpp
@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
@pytest.mark.parametrize("logits", [False, True])
def test_backward_writes_every_location_and_weight_gradient(sampling, logits):
    """The C++ backward leaves its location and weight gradients unfilled before the kernel writes them: every
    element must be written, the locations' with zeros when sampling is discrete. Memory the allocator hands out
    again is filled with NaN first, so an element left unwritten shows up."""
    args = [a.detach() for a in points_inputs((3, 6, 2))]
    grad = torch.randn(2, 3, 8, dtype=torch.float64)
    discrete = sampling == "discrete"
    want = torch.ops.dnops._ms_deform_attn_backward(grad, *args, logits, [3, 6, 2], discrete)
    for _ in range(3):
        dirty = [torch.full_like(t, float("nan")) for t in want for _ in range(4)]
        del dirty
        got = torch.ops.dnops._ms_deform_attn_backward(grad, *args, logits, [3, 6, 2], discrete)
        for x, y in zip(got, want, strict=True):
            assert torch.equal(x, y)
    assert torch.equal(want[1], torch.zeros_like(args[3])) == discrete
    leaves = [a.requires_grad_() if a.is_floating_point() else a for a in args]
    expected = reference.ms_deform_attn_points(*leaves, [3, 6, 2], logits, sampling)
    ref = torch.autograd.grad(expected, [args[0], args[4]], grad)
    torch.testing.assert_close(want[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(want[2], ref[1], rtol=1e-10, atol=1e-10)


@cpp
@pytest.mark.parametrize("kw", [{"lq": 0}, {"n": 0}])
def test_empty(kw):
    args = make_inputs(requires_grad=True, **kw)
    out = op(*args)
    assert out.shape == (kw.get("n", 2), kw.get("lq", 3), 8)
    out.sum().backward()
    assert torch.equal(args[0].grad, torch.zeros_like(args[0]))


@cpp
def test_non_contiguous_inputs():
    value, shapes, starts, loc, weights = make_inputs(d=6)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    weights_nc = weights.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous() and not weights_nc.is_contiguous()
    torch.testing.assert_close(
        op(value_nc, shapes, starts, loc_nc, weights_nc), op(value, shapes, starts, loc, weights)
    )
    assert_matches(
        [t.requires_grad_() if t.is_floating_point() else t for t in (value_nc, shapes, starts, loc_nc, weights_nc)]
    )


@cpp
def test_backward_is_deterministic():
    args = make_inputs(n=2, shapes=((6, 7), (3, 4)), lq=40, m=4, d=32, dtype=torch.float32, requires_grad=True)
    g = torch.randn(2, 40, 128)
    first = torch.autograd.grad(op(*args), [args[0], args[3], args[4]], g)
    for _ in range(3):
        again = torch.autograd.grad(op(*args), [args[0], args[3], args[4]], g)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@cpp
def test_many_queries_in_either_visiting_order():
    # From 256 queries on, the kernel visits an image's queries cell by cell when their samples cluster (image 0:
    # each query's samples near its own reference point, one head far off) and in their own order otherwise
    # (image 1: uniform). Either way every output row and gradient must land where the reference puts it,
    # whatever the thread count.
    args = make_inputs(n=2, shapes=((12, 14), (6, 7), (3, 4)), lq=300, m=2, d=8, p=2)
    value, shapes, starts, loc, weights = args
    centre = torch.rand(300, 1, 1, 1, 2, dtype=loc.dtype)
    loc[0] = centre + 0.02 * torch.randn_like(loc[0])
    loc[0, 17, 1] = 1.5
    args = [t.requires_grad_() if t.is_floating_point() else t for t in args]
    assert_matches(args)
    # A NaN query moves in the visiting order, reads zeros and changes no other row.
    with torch.no_grad():
        nan_loc = loc.detach().clone()
        nan_loc[0, 5] = float("nan")
        clean, with_nan = op(value, shapes, starts, loc, weights), op(value, shapes, starts, nan_loc, weights)
    assert torch.equal(with_nan[0, 5], torch.zeros_like(with_nan[0, 5]))
    with_nan[0, 5] = clean[0, 5]
    assert torch.equal(with_nan, clean)
    threads = torch.get_num_threads()
    g = torch.randn(2, 300, 16, dtype=torch.float64)
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(grads(op, args, g))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


@cpp
@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
@pytest.mark.parametrize(
    "lq, m, threads",
    [
        (40, 1, (1, 2, 3)),  # encoder-like (a query per <= 4 positions): one, two, three groups of levels
        (10, 3, (1, 4, 7)),  # decoder-like: one, two, three groups of heads
    ],
)
def test_backward_splits_items_when_there_are_more_threads(sampling, lq, m, threads):
    # The backward's work items are (image, group of heads, group of levels), each owning its part of grad_value;
    # an encoder-like call splits levels, a decoder-like one heads, only when there are more threads than items.
    # Every split must give the reference's gradients, and the same bits.
    points = [1, 3, 2]
    value, shapes, starts, _, _ = make_inputs(n=1, shapes=((9, 11), (4, 5), (3, 2)), lq=lq, m=m, d=8, p=1)
    loc = torch.rand(1, lq, m, sum(points), 2, dtype=torch.float64) * 1.3 - 0.15
    weights = torch.randn(1, lq, m, sum(points), dtype=torch.float64)
    inputs = [value.requires_grad_(), loc.requires_grad_(), weights.requires_grad_()]
    g = torch.randn(1, lq, m * 8, dtype=torch.float64)
    ref = reference.ms_deform_attn_points(value, shapes, starts, loc, weights, points, True, sampling)
    want = torch.autograd.grad(ref, inputs, g, allow_unused=True, materialize_grads=True)
    before = torch.get_num_threads()
    results = []
    try:
        for n in threads:
            torch.set_num_threads(n)
            out = op(value, shapes, starts, loc, weights, True, points, sampling == "discrete")
            results.append(torch.autograd.grad(out, inputs, g, allow_unused=True, materialize_grads=True))
    finally:
        torch.set_num_threads(before)
    for name, x, y in zip(("value", "locations", "weights"), results[0], want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@cpp
@pytest.mark.parametrize("logits", [False, True])
def test_opcheck(logits):
    args = make_inputs(n=1, lq=3, m=2, d=5, requires_grad=True)
    opcheck(torch.ops.dnops.ms_deform_attn.default, (*args, logits))
    grad_out = torch.randn(1, 3, 10, dtype=torch.float64)
    opcheck(torch.ops.dnops._ms_deform_attn_backward.default, (grad_out, *[a.detach() for a in args], logits))


@cpp
def test_compile_fullgraph():
    args = make_inputs(dtype=torch.float32, requires_grad=True)
    compiled = torch.compile(dnops.ms_deform_attn, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    want = reference.ms_deform_attn(*args)
    torch.testing.assert_close(out, want)
    grad, inputs = torch.randn_like(out), (args[0], args[3], args[4])
    for got, ref in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(want, inputs, grad), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@cpp
def test_autocast_keeps_value_dtype_and_casts_the_geometry():
    """The registered op under autocast: value stays bfloat16 (and so does the output), locations and weights are
    cast to float32; the result is the definition on those exact values."""
    args = make_inputs(dtype=torch.float32)
    mixed = (args[0].bfloat16(), args[1], args[2], args[3], args[4].bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(*mixed)
    assert out.dtype == torch.bfloat16
    want = reference.ms_deform_attn(mixed[0].double(), args[1], args[2], args[3].double(), mixed[4].double())
    low = reference.ms_deform_attn(mixed[0], args[1], args[2], args[3], mixed[4].float())
    assert_within_reference_error(out, want, low, "autocast")


@cpp
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: (a[0][:, :-1], *a[1:]), "S="),
        (lambda a: (a[0], a[1], a[2] + 1, *a[3:]), "level_start_index"),
        (lambda a: (a[0], a[1][:1], *a[2:]), "level_start_index has"),
        (lambda a: (a[0][0], *a[1:]), "value must be"),
        (lambda a: (*a[:3], a[3].float(), a[4]), "dtype"),
        (lambda a: (*a[:4], a[4][..., :1]), "attention_weights must be"),
        (lambda a: (a[0], a[1].int(), *a[2:]), "int64"),
    ],
)
def test_kernel_rejects_bad_inputs(mutate, match):
    with pytest.raises(RuntimeError, match=match):
        op(*mutate(make_inputs()))


@cpp
def test_public_function_picks_cpp_and_override(backend_env):
    args = make_inputs()
    torch.testing.assert_close(dnops.ms_deform_attn(*args), op(*args), rtol=0, atol=0)
    backend_env("reference")
    torch.testing.assert_close(dnops.ms_deform_attn(*args), reference.ms_deform_attn(*args), rtol=0, atol=0)


@cpp
@pytest.mark.cuda
def test_cuda_matches_reference():
    args = [t.cuda() for t in make_inputs(d=33)]
    args = [t.requires_grad_() if t.is_floating_point() else t for t in args]
    for logits in (False, True):
        out = op(*args, logits)
        ref = reference.ms_deform_attn(*args, logits)
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(out)
        for x, y in zip(
            torch.autograd.grad(out, [args[0], args[3], args[4]], g),
            torch.autograd.grad(ref, [args[0], args[3], args[4]], g),
            strict=True,
        ):
            torch.testing.assert_close(x, y)


class OriginalLayoutMSDeformAttn(torch.nn.Module):
    """Deformable-DETR's MSDeformAttn parameter layout and forward, re-written here on grid_sample (the oracle)."""

    def __init__(self, d_model=32, n_levels=2, n_heads=4, n_points=3):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = torch.nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = torch.nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = torch.nn.Linear(d_model, d_model)
        self.output_proj = torch.nn.Linear(d_model, d_model)

    def forward(self, query, reference_points, input_flatten, shapes, starts, padding_mask=None):
        n, lq, _ = query.shape
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, -1, self.n_heads, self.d_model // self.n_heads)
        off = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        w = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points).softmax(-1)
        w = w.view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            norm = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
            loc = reference_points[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
        else:
            loc = (
                reference_points[:, :, None, :, None, :2]
                + off / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        return self.output_proj(reference.ms_deform_attn(value, shapes, starts, loc, w))


@cpp
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_loads_original_checkpoint(ref_dim):
    torch.manual_seed(1)
    original = OriginalLayoutMSDeformAttn().double()
    for p in original.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).double()
    assert list(ours.state_dict()) == list(original.state_dict())
    ours.load_state_dict(original.state_dict())
    shapes = torch.tensor([[5, 6], [3, 3]])
    starts = torch.tensor([0, 30])
    src = torch.randn(2, 39, 32, dtype=torch.float64)
    query = torch.randn(2, 7, 32, dtype=torch.float64)
    refs = torch.rand(2, 7, 2, ref_dim, dtype=torch.float64)
    mask = torch.rand(2, 39) < 0.2
    torch.testing.assert_close(
        ours(query, refs, src, shapes, starts, mask), original(query, refs, src, shapes, starts, mask)
    )


@cpp
def test_module_init_matches_deformable_detr():
    mod = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    bias = mod.sampling_offsets.bias.view(4, 2, 2, 2)
    # head 0 points along +x, head 1 along +y, the k-th point k steps out, the same on every level.
    torch.testing.assert_close(bias[0, :, :, 0], torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    torch.testing.assert_close(bias[1, :, 1, :], torch.tensor([[0.0, 2.0], [0.0, 2.0]]), atol=1e-6, rtol=0)
    assert mod.attention_weights.weight.abs().sum() == 0 and mod.sampling_offsets.weight.abs().sum() == 0


@cpp
def test_function_and_mmcv_names():
    value, shapes, starts, loc, weights = make_inputs()
    expected = reference.ms_deform_attn(value, shapes, starts, loc, weights)
    torch.testing.assert_close(dnops.MSDeformAttnFunction.apply(value, shapes, starts, loc, weights, 64), expected)
    torch.testing.assert_close(dnops.multi_scale_deformable_attn_pytorch(value, shapes, loc, weights), expected)


@cpp
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_int32_level_tensors_are_accepted(backend_env, backend):
    """Users build spatial_shapes / level_start_index by hand, often as int32: the public op converts them once."""
    backend_env(backend)
    value, shapes, starts, loc, weights = make_inputs(requires_grad=True)
    want = dnops.ms_deform_attn(value, shapes, starts, loc, weights)
    got = dnops.ms_deform_attn(value, shapes.int(), starts.int(), loc, weights)
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    for x, y in zip(
        torch.autograd.grad(got, [value, loc, weights], g),
        torch.autograd.grad(want, [value, loc, weights], g),
        strict=True,
    ):  # noqa: E501
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="spatial_shapes must be int64"):
        dnops.ms_deform_attn(value, shapes.short(), starts, loc, weights)


# ---- the Triton kernels, in Triton's interpreter ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tri():
    from dnops.triton.ms_deform_attn import ms_deform_attn_triton

    return ms_deform_attn_triton


@pytest.mark.triton
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
def test_triton_forward_and_grads(tri, kw, logits):
    args = make_inputs(requires_grad=True, **kw)
    out = tri(*args, logits)
    ref = reference.ms_deform_attn(*args, logits)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [args[0], args[3], args[4]], g)
    want = torch.autograd.grad(ref, [args[0], args[3], args[4]], g)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_triton_low_precision(tri, dtype, tol):
    args = [t.to(dtype) if t.is_floating_point() else t for t in make_inputs(d=8)]
    out = tri(*args)
    assert out.dtype == dtype
    expected = reference.ms_deform_attn(*[t.double() if t.is_floating_point() else t for t in args])
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.triton
def test_triton_borders_and_empty(tri):
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


@pytest.mark.triton
def test_triton_backward_raises_under_deterministic_algorithms(tri):
    """Its grad_value is summed by atomics: under use_deterministic_algorithms(True) it raises as torch's own
    nondeterministic ops do (warn_only: a warning), naming the backend that is deterministic."""
    args = make_inputs(requires_grad=True)
    out = tri(*args)
    with (
        deterministic(),
        pytest.raises(
            RuntimeError,
            match=r"Triton backward sums grad_value with atomics.*CUDA backend's backward is deterministic",
        ),
    ):
        torch.autograd.grad(out.sum(), [args[0]])
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match="Triton backward"):
            torch.autograd.grad(tri(*args).sum(), [args[0]])
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.triton
@pytest.mark.parametrize("discrete", [False, True])
def test_triton_backward_writes_every_gradient_element(tri, monkeypatch, discrete):
    """grad_sampling_locations and grad_attention_weights start uninitialised (filled with NaN here): the kernel must
    write every element (discrete sampling: the locations' stay zero)."""
    from dnops.triton import ms_deform_attn as module

    monkeypatch.setattr(module.torch, "empty", lambda *a, **k: torch.full(a[0], float("nan"), **k))
    args = make_inputs(n=2, shapes=((5, 2), (1, 1)), lq=3, m=3, d=3, p=3, requires_grad=True)
    out = tri(*args, True, None, discrete)
    ref = reference.ms_deform_attn_points(*args[:3], args[3].flatten(3, 4), args[4].flatten(3), [3, 3], True, (
        "discrete" if discrete else "bilinear"))  # fmt: skip
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [args[0], args[3], args[4]], g)
    want = torch.autograd.grad(ref, [args[0], args[3], args[4]], g, allow_unused=True, materialize_grads=True)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.triton
def test_public_function_routes_to_triton(backend_env):
    backend_env("triton")
    args = make_inputs()
    torch.testing.assert_close(dnops.ms_deform_attn(*args), reference.ms_deform_attn(*args))


@pytest.mark.triton
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


# ---- a point count per level and discrete sampling (RT-DETR v2, D-FINE, DEIM) ----------------------------------------

LEVELS3 = ((4, 5), (2, 3), (3, 1))


def points_inputs(points=(1, 3, 2), shapes=LEVELS3, dtype=torch.float64, requires_grad=False):
    """(value, spatial_shapes, level_start_index, locations (N, Lq, M, sum P, 2), weights (N, Lq, M, sum P))."""
    value, spatial_shapes, starts, _, _ = make_inputs(n=2, shapes=shapes, lq=3, m=2, d=4, p=1, dtype=dtype)
    loc = torch.rand(2, 3, 2, sum(points), 2, dtype=dtype) * 1.3 - 0.15
    weights = torch.rand(2, 3, 2, sum(points), dtype=dtype)
    for t in (value, loc, weights):
        t.requires_grad_(requires_grad)
    return value, spatial_shapes, starts, loc, weights


def discrete_loop(value, spatial_shapes, starts, loc, weights, points):
    """The discrete rule written literally, one point at a time: the pixel (floor(x * W + 0.5), floor(y * H + 0.5)),
    each clamped into the map, times the point's weight (float64)."""
    n, _, m, d = value.shape
    lq = loc.shape[1]
    out = torch.zeros(n, lq, m, d, dtype=torch.float64)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                first = 0
                for level, p in enumerate(points):
                    h, w = (int(x) for x in spatial_shapes[level])
                    for j in range(first, first + p):
                        x, y = (float(c) for c in loc[b, q, head, j].detach())
                        ix = min(max(math.floor(x * w + 0.5), 0), w - 1)
                        iy = min(max(math.floor(y * h + 0.5), 0), h - 1)
                        row = int(starts[level]) + iy * w + ix
                        out[b, q, head] += (
                            float(weights[b, q, head, j].detach()) * value[b, row, head].detach().double()
                        )
                    first += p
    return out.reshape(n, lq, m * d)


def test_points_reference_with_one_count_is_the_definition():
    args = make_inputs(p=3)
    value, shapes, starts, loc, weights = args
    got = reference.ms_deform_attn_points(value, shapes, starts, loc.flatten(3, 4), weights.flatten(3, 4), [3, 3])
    torch.testing.assert_close(got, reference.ms_deform_attn(*args), rtol=1e-12, atol=1e-12)
    logits = reference.ms_deform_attn_points(
        value, shapes, starts, loc.flatten(3, 4), weights.flatten(3, 4), [3, 3], True
    )
    torch.testing.assert_close(logits, reference.ms_deform_attn(*args, True), rtol=1e-12, atol=1e-12)


def test_points_reference_with_unequal_counts_is_the_loop_on_each_level():
    value, shapes, starts, loc, weights = points_inputs()
    got = reference.ms_deform_attn_points(value, shapes, starts, loc, weights, [1, 3, 2])
    # each level alone is the definition with one count: level l's points and zero weight elsewhere
    want, first = 0, 0
    for level, p in enumerate((1, 3, 2)):
        one = torch.zeros(2, 3, 2, 3, p, 2, dtype=torch.float64)
        one[:, :, :, level] = loc[:, :, :, first : first + p]
        w = torch.zeros(2, 3, 2, 3, p, dtype=torch.float64)
        w[:, :, :, level] = weights[:, :, :, first : first + p]
        want = want + loop_ms_deform_attn(value, shapes, starts, one, w)
        first += p
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_points_reference_discrete_is_the_loop_with_no_location_gradient():
    value, shapes, starts, loc, weights = points_inputs(requires_grad=True)
    got = reference.ms_deform_attn_points(value, shapes, starts, loc, weights, [1, 3, 2], sampling="discrete")
    torch.testing.assert_close(
        got, discrete_loop(value, shapes, starts, loc, weights, (1, 3, 2)), rtol=1e-12, atol=1e-12
    )
    grad_loc = torch.autograd.grad(got.sum(), loc, allow_unused=True, materialize_grads=True)[0]
    assert torch.equal(grad_loc, torch.zeros_like(loc))
    fn = lambda v, w: reference.ms_deform_attn_points(v, shapes, starts, loc, w, [1, 3, 2], sampling="discrete")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (value, weights))


@pytest.mark.parametrize("backend", POINTS_BACKENDS := backends("ms_deform_attn"))
@pytest.mark.parametrize("points", [(1, 3, 2), (2, 2, 2), (70, 10, 1)])  # 81: more than the C++ kernel's batch
@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
def test_points_per_level_on_every_backend(backend, backend_env, points, logits, sampling):
    backend_env(backend)
    args = points_inputs(points, requires_grad=True)
    out = dnops.ms_deform_attn(*args, logits, points_per_level=list(points), sampling=sampling)
    ref = reference.ms_deform_attn_points(*args, list(points), logits, sampling)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    inputs = [args[0], args[3], args[4]]
    grads = [torch.autograd.grad(o, inputs, g, allow_unused=True, materialize_grads=True) for o in (out, ref)]
    for x, y in zip(*grads, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    if sampling == "discrete":
        assert torch.equal(grads[0][1], torch.zeros_like(args[3]))


@pytest.mark.parametrize("backend", POINTS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_points_per_level_half_types(backend, backend_env, dtype):
    backend_env(backend)
    args = points_inputs((3, 6, 3))
    out = dnops.ms_deform_attn(*[a.to(dtype) if a.is_floating_point() else a for a in args], True,
                               points_per_level=[3, 6, 3])  # fmt: skip
    assert out.dtype == dtype
    want = reference.ms_deform_attn_points(*args, [3, 6, 3], True)
    low = reference.ms_deform_attn_points(*[a.to(dtype) if a.is_floating_point() else a for a in args], [3, 6, 3], True)
    assert_matches_reference(out, want, low, dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", POINTS_BACKENDS)
def test_points_per_level_under_autocast(backend, backend_env):
    """Under autocast, as for one count: value keeps bfloat16 (so does the output), the geometry is cast to float32."""
    backend_env(backend)
    args = points_inputs((3, 6, 3))
    half = [a.to(torch.bfloat16) if a.is_floating_point() else a for a in args]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dnops.ms_deform_attn(*half, True, points_per_level=[3, 6, 3])
    assert out.dtype == torch.bfloat16
    want = reference.ms_deform_attn_points(*[a.double() if a.is_floating_point() else a for a in half], [3, 6, 3], True)
    low = reference.ms_deform_attn_points(*half[:3], half[3].float(), half[4].float(), [3, 6, 3], True)
    assert_within_reference_error(out, want, low, "points_per_level under autocast")


@cpp
def test_points_per_level_gradcheck_and_compile():
    value, shapes, starts, loc, weights = points_inputs(requires_grad=True)

    def fn(v, loc, w):
        return dnops.ms_deform_attn(v, shapes, starts, loc, w, True, points_per_level=[1, 3, 2])

    assert torch.autograd.gradcheck(fn, (value, loc, weights))
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(value, loc, weights), fn(value, loc, weights), rtol=1e-12, atol=1e-12)


def test_points_per_level_bad_inputs_name_the_argument():
    value, shapes, starts, loc, weights = points_inputs()
    cases = [
        ([1, 3], loc, weights, "points_per_level has 2 counts but spatial_shapes has 3 levels"),
        ([0, 4, 2], loc, weights, "points_per_level must hold one count >= 1 per level"),
        ([1, 3, 3], loc, weights, "sampling_locations must be \\(N, Lq, M, sum_l P_l = 7, 2\\)"),
        ([1.5, 3, 2], loc, weights, "points_per_level must be a sequence of ints"),
        (6, loc, weights, "points_per_level must be a sequence of ints"),
        ([1, 3, 2], loc.unsqueeze(3), weights, "sampling_locations must have rank 5"),
        ([1, 3, 2], loc, weights[..., :-1], "attention_weights must be \\(2, 3, 2, 6\\)"),
    ]
    for points, loc_, weights_, match in cases:
        with pytest.raises(ValueError, match=match):
            dnops.ms_deform_attn(value, shapes, starts, loc_, weights_, points_per_level=points)
    with pytest.raises(ValueError, match="sampling must be one of \\('bilinear', 'discrete'\\)"):
        dnops.ms_deform_attn(value, shapes, starts, loc, weights, points_per_level=[1, 3, 2], sampling="nearest")


@pytest.mark.parametrize("backend", POINTS_BACKENDS)
def test_discrete_rounding_ties_clamps_and_nan(backend, backend_env):
    """Locations exactly on the half-pixel where the nearest pixel changes (x * W + 0.5 an integer: exact in float64
    for these power-of-two sizes), past both borders, far outside [-1, 2] and NaN: every backend reads the
    reference's pixel."""
    backend_env(backend)
    shapes = torch.tensor([[4, 8], [2, 4]])
    starts = torch.tensor([0, 32])
    value = torch.randn(1, 40, 1, 3, dtype=torch.float64, requires_grad=True)
    xs = [0.0, 1 / 16, 3 / 16, 15 / 16, 1.0, -0.01, -0.07, 1.2, 7.0, -5.0, float("nan"), 0.5]
    loc = torch.tensor([[x, xs[-1 - i]] for i, x in enumerate(xs)], dtype=torch.float64)
    loc = loc.view(1, len(xs), 1, 1, 2).expand(1, len(xs), 1, 3, 2).clone().requires_grad_()
    weights = torch.rand(1, len(xs), 1, 3, dtype=torch.float64, requires_grad=True)
    args = (value, shapes, starts, loc, weights)
    out = dnops.ms_deform_attn(*args, points_per_level=[1, 2], sampling="discrete")
    ref = reference.ms_deform_attn_points(*args, [1, 2], sampling="discrete")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), (value, loc, weights), allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref.sum(), (value, weights))
    torch.testing.assert_close(grads[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[2], want[1], rtol=1e-12, atol=1e-12)
    assert torch.equal(grads[1], torch.zeros_like(loc))


@cpp
@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
def test_kernels_take_points_per_level_natively(sampling):
    """The registered op takes the counts and the sampling mode itself (no padding before it): opcheck of the
    schema, fake and autograd with unequal counts, and the kernel's own argument errors."""
    args = points_inputs((3, 6, 2), requires_grad=True)
    discrete = sampling == "discrete"
    for logits in (False, True):
        opcheck(torch.ops.dnops.ms_deform_attn.default, (*args, logits, [3, 6, 2], discrete))
        out = torch.ops.dnops.ms_deform_attn(*args, logits, [3, 6, 2], discrete)
        want = reference.ms_deform_attn_points(*args, [3, 6, 2], logits, sampling)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(2, 3, 8, dtype=torch.float64)
    detached = [a.detach() for a in args]
    opcheck(torch.ops.dnops._ms_deform_attn_backward.default, (grad, *detached, True, [3, 6, 2], discrete))
    value, shapes, starts, loc, weights = detached
    for counts, match in (([3, 6], "points_per_level has 2 counts"), ([3, 6, 3], "sum_l P_l = 12"),
                          ([3, 0, 8], "one count >= 1")):  # fmt: skip
        with pytest.raises(RuntimeError, match=match):
            torch.ops.dnops.ms_deform_attn(value, shapes, starts, loc, weights, False, counts, discrete)
    with pytest.raises(RuntimeError, match="sampling_locations must be \\(N, Lq, M, sum_l P_l, 2\\)"):
        torch.ops.dnops.ms_deform_attn(value, shapes, starts, loc.unsqueeze(3), weights, False, [3, 6, 2])


@cpp
def test_kernels_refuse_rows_of_2_to_the_31_points():
    """The kernels index a row's points with int32 (a GPU lane's level search is 32-bit arithmetic); expanded
    (stride 0) locations make such a row without the memory."""
    value, shapes, starts = torch.randn(1, 1, 1, 2), torch.tensor([[1, 1]]), torch.tensor([0])
    loc = torch.zeros(1, 1, 1, 1, 1, 2).expand(1, 1, 1, 1, 2**31, 2)
    weights = torch.zeros(1, 1, 1, 1, 1).expand(1, 1, 1, 1, 2**31)
    with pytest.raises(RuntimeError, match="a \\(query, head\\) row must have fewer than 2\\^31 points"):
        torch.ops.dnops.ms_deform_attn(value, shapes, starts, loc, weights)


def test_points_per_level_takes_at_most_16_levels():
    shapes = torch.tensor([[1, 1]] * 17)
    starts = torch.arange(17)
    value = torch.randn(1, 17, 1, 2)
    loc, weights = torch.rand(1, 2, 1, 17, 2), torch.rand(1, 2, 1, 17)
    with pytest.raises(ValueError, match="points_per_level takes at most 16 levels, got 17"):
        dnops.ms_deform_attn(value, shapes, starts, loc, weights, points_per_level=[1] * 17)
    if _backend.HAS_C:
        with pytest.raises(RuntimeError, match="points_per_level takes at most 16 levels"):
            torch.ops.dnops.ms_deform_attn(value, shapes, starts, loc, weights, False, [1] * 17)


# ---- hardening: bad inputs, limits, double backward ------------------------------------------------------------------


# the Triton kernels run in the interpreter here, under the conftest's rules for the triton mark
BACKENDS = backends("ms_deform_attn")


def with_shapes(rows, s=None):
    value, _, _, loc, weights = make_inputs(n=1, shapes=((2, 3), (1, 2)), lq=2, m=1, d=2, p=1)
    shapes = torch.tensor(rows, dtype=torch.int64)
    starts = torch.tensor([0, 6], dtype=torch.int64)
    if s is not None:
        value = torch.randn(1, s, 1, 2, dtype=torch.float64)
    return value, shapes, starts, loc, weights


BAD_SHAPES = [
    ([[2**32, 2**32], [1, 2]], None, "spatial_shapes"),  # H * W = 2**64 wraps to 0 in int64
    ([[2**62, 4], [1, 2]], None, "spatial_shapes"),
    ([[2, 3], [0, 2]], None, "positive"),
    ([[2, 3], [-1, -8]], None, "positive"),
    ([[2, 3], [4, 4]], None, "spatial_shapes"),  # H * W > S
    ([[2, 3], [1, 2]], 9, "S=9"),
]


@pytest.mark.parametrize("rows,s,match", BAD_SHAPES)
def test_public_op_rejects_levels_outside_value(rows, s, match):
    with pytest.raises(ValueError, match=match):
        dnops.ms_deform_attn(*with_shapes(rows, s))


@pytest.mark.parametrize("rows,s,match", BAD_SHAPES)
def test_cpu_kernel_rejects_levels_outside_value(rows, s, match):
    # the raw op, past the Python checks: its own checks must stop it before it reads
    args = with_shapes(rows, s)
    with pytest.raises(RuntimeError, match=match if match != "spatial_shapes" else "spatial_shapes|positions"):
        torch.ops.dnops.ms_deform_attn(*args)
    with pytest.raises(RuntimeError):
        torch.ops.dnops._ms_deform_attn_backward(torch.ones(1, 2, 2, dtype=torch.float64), *args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend, backend_env):
    backend_env(backend)
    args = make_inputs(requires_grad=True)
    check_double_backward("ms_deform_attn", backend, dnops.ms_deform_attn(*args), [args[0], args[3], args[4]])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_finite_and_huge_locations_read_zero(backend, backend_env):
    backend_env(backend)
    value, shapes, starts, loc, weights = make_inputs(n=1, lq=5, m=1, p=1, requires_grad=False)
    for q, x in enumerate([float("nan"), float("inf"), -float("inf"), 3e38, -3e38]):
        loc[0, q] = x
    loc.requires_grad_()
    value.requires_grad_()
    out = dnops.ms_deform_attn(value, shapes, starts, loc, weights)
    assert torch.equal(out, torch.zeros_like(out))
    g_value, g_loc = torch.autograd.grad(out.sum(), [value, loc])
    assert torch.equal(g_loc, torch.zeros_like(g_loc)) and torch.equal(g_value, torch.zeros_like(g_value))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_reference_checks_levels(dynamic):
    from dnops import reference

    torch._dynamo.reset()
    compiled = torch.compile(reference.ms_deform_attn, dynamic=dynamic)
    value, shapes, starts, loc, weights = make_inputs(dtype=torch.float32)
    torch.testing.assert_close(compiled(value, shapes, starts, loc, weights), reference.ms_deform_attn(
        value, shapes, starts, loc, weights))  # fmt: skip
    with pytest.raises(ValueError, match="level_start_index"):
        compiled(value, shapes, torch.tensor([0, 7]), loc, weights)
    with pytest.raises(ValueError, match="S=26"):
        compiled(value, torch.tensor([[4, 5], [2, 2]]), torch.tensor([0, 20]), loc, weights)


def test_msdeformattn_rejects_more_levels_than_built_for():
    from dnops.nn import MSDeformAttn

    mod = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = torch.tensor([[4, 4], [2, 2], [1, 1]])
    starts = torch.tensor([0, 16, 20])
    with pytest.raises(ValueError, match="n_levels=2"):
        mod(torch.randn(1, 3, 16), torch.rand(1, 3, 3, 2), torch.randn(1, 21, 16), shapes, starts)


# ---- properties: random valid inputs equal the reference, random invalid ones name the argument (hypothesis) ---------


KERNELS = backends("ms_deform_attn", without=("reference",))


@st.composite
def msda_inputs(draw):
    n, lq = draw(st.integers(0, 2)), draw(st.integers(0, 5))
    shapes = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3))
    m, d, p = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    spatial = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    value = torch.randn(n, int(sizes.sum()), m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.randn(n, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    return [value, spatial, starts, loc, weights], draw(st.booleans())


@pytest.mark.parametrize("backend", KERNELS)
@SETTINGS
@given(case=msda_inputs())
def test_ms_deform_attn_equals_reference(backend, case):
    args, logits = case
    args = [t.requires_grad_() if t.is_floating_point() else t for t in args]
    out = run(backend, dnops.ms_deform_attn, *args, attention_logits=logits)
    ref = reference.ms_deform_attn(*args, logits)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    if out.numel():
        g = torch.randn_like(out)
        inputs = [args[0], args[3], args[4]]
        for x, y in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-8)


def _msda_corruptions(args):
    value, shapes, starts, loc, weights = args
    big = torch.tensor([[2**31, 2**33]] + [[1, 1]] * (shapes.shape[0] - 1))
    return [
        ("value", [value.flatten(0, 1), shapes, starts, loc, weights]),
        ("value", [value.long(), shapes, starts, loc, weights]),
        ("spatial_shapes", [value, shapes.double(), starts, loc, weights]),
        ("spatial_shapes", [value, shapes * 0, starts, loc, weights]),
        ("spatial_shapes", [value, -shapes, starts, loc, weights]),
        ("spatial_shapes", [value, big, starts, loc, weights]),
        ("spatial_shapes", [value, shapes[:, :1], starts, loc, weights]),
        ("level_start_index", [value, shapes, starts + 1, loc, weights]),
        ("level_start_index", [value, shapes, starts.short(), loc, weights]),  # int32 is accepted, int16 not
        ("sampling_locations", [value, shapes, starts, loc[..., :1], weights]),
        ("sampling_locations", [value, shapes, starts, loc.float(), weights]),
        ("attention_weights", [value, shapes, starts, loc, weights[..., :0]]),
        ("attention_weights", [value, shapes, starts, loc, weights.float()]),
    ]


@pytest.mark.parametrize("backend", backends("ms_deform_attn"))
@SETTINGS
@given(case=msda_inputs(), pick=st.integers(0, 12))
def test_ms_deform_attn_invalid_inputs_name_the_argument(backend, case, pick):
    name, bad = _msda_corruptions(case[0])[pick]
    with pytest.raises(ValueError, match=name):
        run(backend, dnops.ms_deform_attn, *bad)


# ---- mixed precision: a half value with float32 geometry ------------------------------------------------------------


MIXED_CASES = [
    {"d": 16},
    {"d": 30},
    {"points": (1, 3, 2), "logits": True},
    {"points": (2, 1, 3), "sampling": "discrete"},
]


def mixed_inputs(value_dtype, points=None):
    """A half value with float32 locations and weights (requires_grad), and the float64 copies of exactly those
    values the reference computes with."""
    if points is None:
        value, shapes, starts, loc, weights = make_inputs(d=16, dtype=torch.float32)
    else:
        value, shapes, starts, loc, weights = (t.float() if t.is_floating_point() else t for t in points_inputs(points))
    args = [value.to(value_dtype), shapes, starts, loc, weights]
    args = [t.requires_grad_() if t.is_floating_point() else t for t in args]
    ref = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in args]
    return args, ref


@pytest.mark.parametrize("backend", POINTS_BACKENDS)
@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MIXED_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_mixed_pair_on_every_backend(backend, backend_env, value_dtype, case):
    """value in float16 / bfloat16, locations and weights in float32: the output in value's dtype, each gradient in
    its input's dtype, all equal to the definition in float64 on the same values (the value's rounding only)."""
    backend_env(backend)
    points, logits, sampling = case.get("points"), case.get("logits", False), case.get("sampling", "bilinear")
    args, ref_args = mixed_inputs(value_dtype, points)
    if points is None and case["d"] != 16:
        value = torch.randn(*args[0].shape[:3], case["d"]).to(value_dtype).requires_grad_()
        args[0], ref_args[0] = value, value.detach().double().requires_grad_()
    kw = {"points_per_level": list(points), "sampling": sampling} if points else {}
    if sampling == "discrete":
        args[3] = args[3].detach()  # no gradient: the reference's autograd has none to compare with

    def ref(*a):
        if points:
            return reference.ms_deform_attn_points(*a, list(points), logits, sampling)
        return reference.ms_deform_attn(*a, logits)

    # every element of the output and of each gradient (in its input's dtype) within twice the reference's own
    # error in the same dtypes: the geometry's float32 gradients carry the half value's and grad_output's rounding
    fn = lambda *a: dnops.ms_deform_attn(*a, logits, **kw)  # noqa: E731
    check_against_reference(fn, ref, args, value_dtype, f"mixed {backend}")


@pytest.mark.parametrize("backend", backends("ms_deform_attn"))
def test_other_dtype_mixes_raise_naming_the_argument(backend, backend_env):
    backend_env(backend)
    value, shapes, starts, loc, weights = make_inputs(dtype=torch.float32)
    for args, match in (
        ((value, shapes, starts, loc.bfloat16(), weights.bfloat16()), "sampling_locations has dtype torch.bfloat16"),
        ((value.double(), shapes, starts, loc, weights), "sampling_locations has dtype torch.float32"),
        ((value.half(), shapes, starts, loc, weights.half()), "attention_weights has dtype torch.float16"),
        ((value.half(), shapes, starts, loc.double(), weights.double()), "sampling_locations has dtype torch.float64"),
    ):
        with pytest.raises(ValueError, match=match):
            dnops.ms_deform_attn(*args)
    if _backend.HAS_C:
        match = "sampling_locations and attention_weights must have value's dtype Half or float32, got Float and Half"
        with pytest.raises(RuntimeError, match=match):
            torch.ops.dnops.ms_deform_attn(value.half(), shapes, starts, loc, weights.half())


# ---- autocast --------------------------------------------------------------------------------------------------------


AMP_BACKENDS = backends("ms_deform_attn", without=("triton",))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def msda_module_inputs():
    torch.manual_seed(0)
    mod = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2)
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.2)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    src = torch.randn(2, 60, 64, requires_grad=True)
    query = torch.randn(2, 11, 64, requires_grad=True)
    refs = torch.rand(2, 11, 2, 2)
    return mod, (query, refs, src, shapes, starts)


@pytest.mark.parametrize("backend", AMP_BACKENDS)
def test_msdeformattn_module_under_autocast(backend, backend_env):
    backend_env(backend)
    mod, args = msda_module_inputs()
    want = mod(*args)
    want_grads = torch.autograd.grad(want.sum(), [args[0], args[2], *mod.parameters()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mod(*args)
    assert got.dtype == torch.bfloat16  # output_proj runs in the autocast dtype
    got_grads = torch.autograd.grad(got.float().sum(), [args[0], args[2], *mod.parameters()])
    assert rel_err(got, want) < 2e-2
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == torch.float32 and rel_err(g, w) < 3e-2


@pytest.mark.parametrize("backend", AMP_BACKENDS)
def test_autocast_keeps_a_half_value_and_casts_only_the_geometry(backend, backend_env):
    """Under autocast: bfloat16 value kept (the gathers move half the bytes), bfloat16 weights cast to float32, the
    output bfloat16; outside autocast the AMP pair (bfloat16 value, float32 geometry) is taken as it is."""
    backend_env(backend)
    value, shapes, starts, loc, weights = make_inputs(dtype=torch.float32)
    want = reference.ms_deform_attn(value.bfloat16().double(), shapes, starts, loc.double(), weights.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dnops.ms_deform_attn(value.bfloat16(), shapes, starts, loc, weights.bfloat16())
        raw = torch.ops.dnops.ms_deform_attn(value.bfloat16(), shapes, starts, loc, weights.bfloat16())
    assert got.dtype == raw.dtype == torch.bfloat16
    assert rel_err(got, want) < 1e-2 and rel_err(raw, want) < 1e-2
    pair = dnops.ms_deform_attn(value.bfloat16(), shapes, starts, loc, weights)
    assert pair.dtype == torch.bfloat16 and rel_err(pair, want) < 1e-2


# ---- on the GPU (pytest -m cuda) and the CUDA emulator (pytest -m emulated) ------------------------------------------


MSDA_BACKENDS = backends("ms_deform_attn", "cuda")


MSDA_SHAPES = [
    {"d": 32},
    {"d": 1},
    {"d": 30},
    {"d": 71},
    {"d": 130, "lq": 2},  # the third channel pass of a 32-lane group has one active lane
    {"d": 257, "lq": 2, "m": 1},
    {"d": 8, "shapes": ((5, 7),)},
    {"d": 16, "p": 1},
    {"d": 4, "shapes": ((5, 2), (1, 1), (2, 7)), "m": 3, "p": 3},
    {"d": 64, "lq": 0},
    {"d": 32, "n": 0},
]


@pytest.mark.parametrize("backend", MSDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", MSDA_SHAPES, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("logits", [False, True])
def test_gpu_backends_equal_reference(arch_dev, backend, dtype, kw, logits):
    fn = msda(backend, logits, arch_dev)
    ref = lambda *a: reference.ms_deform_attn(*a, logits)  # noqa: E731
    check_against_reference(fn, ref, msda_args(dtype, arch_dev, **kw), dtype, f"ms_deform_attn[{backend}]")


@pytest.mark.parametrize("backend", MSDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_non_contiguous_and_borders(arch_dev, backend, dtype):
    fn = msda(backend, device=arch_dev)
    value, shapes, starts, loc, weights = make_inputs(
        n=2, shapes=((3, 4), (2, 2)), lq=9, m=2, d=8, p=2, device=arch_dev
    )
    edges = torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [-0.5, 0.5], [1.5, 0.2], [0.125, 1 / 6], [-1 / 8, 1.0], [2, 2]]
    )
    loc[:, :, :, :, 0] = edges.to(loc)[None, :, None, None, :]
    # value as a (N, M, S, D) tensor seen through a transpose, locations and weights as slices of wider tensors
    value_t = value.transpose(1, 2).contiguous().transpose(1, 2)
    loc_wide = torch.cat([loc, loc], -1)[..., :2]
    weights_wide = torch.cat([weights, weights], -1)[..., : weights.shape[-1]]
    args = [value_t, shapes, starts, loc_wide, weights_wide]
    assert not all(t.is_contiguous() for t in args)
    args = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in args]
    check_against_reference(fn, reference.ms_deform_attn, args, dtype, f"ms_deform_attn[{backend}] borders")


@pytest.mark.parametrize("backend", MSDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
@pytest.mark.parametrize("deterministic_kernel", [False, True], ids=["atomic", "deterministic"])
def test_gpu_points_per_level(arch_dev, backend, dtype, logits, sampling, deterministic_kernel):
    """D-FINE's counts [3, 6, 3] (the softmax of logits over all 12 points of a row) and either sampling: the kernels
    against the level-by-level definition; discrete leaves the locations' gradient zero."""
    if deterministic_kernel and backend != "cuda":
        pytest.skip("the deterministic grad_value gather is the CUDA kernel's")
    name = needs("ms_deform_attn", backend, arch_dev)
    kw = {"points_per_level": [3, 6, 3], "sampling": sampling}
    fn = backend_fn(name, lambda *a: dnops.ms_deform_attn(*a, logits, **kw))
    ref = lambda *a: reference.ms_deform_attn_points(*a, [3, 6, 3], logits, sampling)  # noqa: E731
    args = [t.to(arch_dev) for t in points_inputs((3, 6, 3))]
    args = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in args]
    if sampling == "discrete":
        args[3] = args[3].detach()  # no gradient: the reference's autograd has none to compare with
    what = f"ms_deform_attn[{backend}] points_per_level {sampling}"
    check_against_reference(fn, ref, args, dtype, what, deterministic_kernel=deterministic_kernel)
    if sampling == "discrete":
        loc = args[3].clone().requires_grad_()
        out = fn(args[0], args[1], args[2], loc, args[4])
        (grad_loc,) = torch.autograd.grad(out.sum(), [loc], allow_unused=True, materialize_grads=True)
        assert torch.equal(grad_loc, torch.zeros_like(loc))


@pytest.mark.parametrize("backend", MSDA_BACKENDS)
@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "kw",
    [{"d": 32}, {"d": 30}, {"d": 8, "p": 3}, {"d": 32, "misaligned": True}, {"d": 16, "deterministic": True}],
    ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()),
)
@pytest.mark.parametrize("logits", [False, True])
def test_gpu_mixed_pair(arch_dev, backend, value_dtype, kw, logits):
    """The AMP pair on the GPU kernels: a half value with float32 locations and weights, read as they are (the
    vector loads of value, misaligned storage's narrower ones, the deterministic backward), against the definition
    on the same values in float64."""
    kw = dict(kw)
    misaligned, det = kw.pop("misaligned", False), kw.pop("deterministic", False)
    if det and backend != "cuda":
        pytest.skip("the deterministic grad_value gather is the CUDA kernel's")
    fn = msda(backend, logits, arch_dev)
    args = msda_args(torch.float32, arch_dev, **kw)
    value = args[0].detach().to(value_dtype)
    if misaligned:
        value = torch.empty(value.numel() + 1, dtype=value_dtype, device=arch_dev)[1:].view(value.shape).copy_(value)
        assert value.data_ptr() % 16 != 0
    args[0] = value.requires_grad_()
    ref = lambda *a: reference.ms_deform_attn(*a, logits)  # noqa: E731
    check_against_reference(fn, ref, args, value_dtype, f"mixed {backend}", deterministic_kernel=det)


@pytest.mark.parametrize("logits", [False, True])
def test_ms_deform_attn_deterministic_backward_is_bitwise_repeatable(arch_dev, logits):
    fn = msda("cuda", logits, arch_dev)
    lq = 500 if arch_dev == "cuda" else 12  # the emulator runs one fiber per CUDA thread
    args = msda_args(torch.float32, arch_dev, n=2, shapes=((20, 30), (10, 15)), lq=lq, m=4, d=32, p=4)
    g = torch.randn(2, lq, 128, device=arch_dev)
    grads = []
    try:
        torch.use_deterministic_algorithms(True)
        for _ in range(3):
            grads.append(torch.autograd.grad(fn(*args), [args[0], args[3], args[4]], g))
    finally:
        torch.use_deterministic_algorithms(False)
    for again in grads[1:]:
        for x, y in zip(grads[0], again, strict=True):
            assert torch.equal(x, y)
    atomic = torch.autograd.grad(fn(*args), [args[0], args[3], args[4]], g)
    for x, y in zip(grads[0], atomic, strict=True):
        assert_rel(x, y, torch.float32, "deterministic vs atomic backward")


@pytest.mark.parametrize("backend", MSDA_BACKENDS)
def test_gpu_forward_is_the_same_bits_run_after_run(dev, backend):
    """Each output element is summed by one program in a fixed order: no atomics in either forward."""
    fn = msda(backend, True, dev)
    args = msda_args(torch.float32, dev)
    first = fn(*args)
    assert all(torch.equal(first, fn(*args)) for _ in range(3))


def test_ms_deform_attn_deterministic_matches_reference(dev):
    fn = msda("cuda", device=dev)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        args = msda_args(dtype, dev, d=30)
        check_against_reference(fn, reference.ms_deform_attn, args, dtype, "deterministic", deterministic_kernel=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("d", [8, 32])
def test_ms_deform_attn_misaligned_storage(arch_dev, dtype, d):
    """value and grad_output starting one element into their storage: the kernels fall back to narrower vectors
    (a 16-byte load or atomic on a misaligned address faults on the GPU)."""
    fn = msda("cuda", device=arch_dev)
    args = msda_args(dtype, arch_dev, d=d)

    def shifted(t):
        return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)

    args[0] = shifted(args[0].detach()).requires_grad_()
    assert args[0].is_contiguous() and args[0].data_ptr() % 16 != 0
    ref_args = as_float64(args)
    low_args = [t.detach().requires_grad_(t.requires_grad) for t in args]
    out, ref, low = fn(*args), reference.ms_deform_attn(*ref_args), reference.ms_deform_attn(*low_args)
    assert_matches_reference(out, ref, low, dtype, "misaligned forward")
    g = torch.randn_like(ref)
    g_shifted = shifted(g.to(dtype))
    assert g_shifted.data_ptr() % 16 != 0
    got = torch.autograd.grad(out, [args[0], args[3], args[4]], g_shifted)
    want = torch.autograd.grad(ref, [ref_args[0], ref_args[3], ref_args[4]], g)
    lows = torch.autograd.grad(low, [low_args[0], low_args[3], low_args[4]], g.to(dtype))
    for i, (x, y, z) in enumerate(zip(got, want, lows, strict=True)):
        assert_matches_reference(x, y, z, dtype, f"misaligned grad {i}")


def test_ms_deform_attn_non_finite_locations_read_zero(arch_dev):
    fn = msda("cuda", device=arch_dev)
    value, shapes, starts, loc, weights = make_inputs(n=1, lq=5, m=1, p=1, d=32, dtype=torch.float32, device=arch_dev)
    for q, x in enumerate([float("nan"), float("inf"), -float("inf"), 3e38, -3e38]):
        loc[0, q] = x
    loc.requires_grad_()
    value.requires_grad_()
    out = fn(value, shapes, starts, loc, weights)
    assert torch.equal(out, torch.zeros_like(out))
    g_value, g_loc = torch.autograd.grad(out.sum(), [value, loc])
    assert torch.equal(g_loc, torch.zeros_like(g_loc)) and torch.equal(g_value, torch.zeros_like(g_value))


@pytest.mark.cuda
def test_sanitizer_ms_deform_attn():
    for backend in MSDA_BACKENDS:
        for dtype in (torch.float32, torch.bfloat16):
            for kw in ({"d": 32}, {"d": 7, "p": 1}):
                check_against_reference(msda(backend), reference.ms_deform_attn, msda_args(dtype, **kw), dtype, "san")
    args = msda_args(torch.float32)
    fn = msda("cuda")
    check_against_reference(fn, reference.ms_deform_attn, args, torch.float32, "det", deterministic_kernel=True)


@pytest.mark.parametrize("backend", MSDA_BACKENDS)
def test_levels_outside_value_raise_or_read_nothing(arch_dev, backend):
    fn = msda(backend, device=arch_dev)
    value, _, _, loc, weights = make_inputs(n=1, shapes=((2, 3), (1, 2)), lq=2, m=1, d=2, p=1, device=arch_dev)
    for rows in ([[2**32, 2**32], [1, 2]], [[2**62, 4], [1, 2]], [[2, 3], [4, 4]]):
        shapes = torch.tensor(rows, device=arch_dev)
        starts = torch.tensor([0, 6], device=arch_dev)
        with pytest.raises(ValueError, match="spatial_shapes"):
            fn(value, shapes, starts, loc, weights)
        if backend == "cuda":  # the raw kernel, past the checks: the bad levels read as zeros, nothing out of range
            out = torch.ops.dnops.ms_deform_attn(value, shapes, starts, loc, weights)
            synchronize(arch_dev)
            assert torch.isfinite(out).all()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_msdeformattn_under_cuda_autocast(dtype):
    from dnops.nn import MSDeformAttn

    torch.manual_seed(0)
    mod = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2).cuda()
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.2)
    shapes, starts = torch.tensor([[6, 8], [3, 4]], device="cuda"), torch.tensor([0, 48], device="cuda")
    src = torch.randn(2, 60, 64, device="cuda", requires_grad=True)
    query, refs = torch.randn(2, 11, 64, device="cuda"), torch.rand(2, 11, 2, 2, device="cuda")
    want = mod(query, refs, src, shapes, starts)
    (want_g,) = torch.autograd.grad(want.sum(), [src])
    with torch.autocast("cuda", dtype=dtype):
        got = mod(query, refs, src, shapes, starts)
    (got_g,) = torch.autograd.grad(got.float().sum(), [src])
    assert got.dtype == dtype
    assert (got.float() - want).norm() / want.norm() < 2e-2
    assert (got_g - want_g).norm() / want_g.norm() < 3e-2
