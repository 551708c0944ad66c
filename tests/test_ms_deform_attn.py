"""The C++ CPU kernel (and the CUDA kernel where a GPU exists) against the reference."""

import pytest
import torch
from torch.library import opcheck

import dnops
from dnops import reference
from dnops.nn import MSDeformAttn
from tests.conftest import requires_cpp
from tests.msda_utils import loop_ms_deform_attn, make_inputs

pytestmark = requires_cpp("ms_deform_attn")
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


@pytest.mark.parametrize("d", [1, 30, 32, 71, 8, 64])
@pytest.mark.parametrize("logits", [False, True])
def test_float64_forward_and_grads(d, logits):
    assert_matches(make_inputs(d=d, requires_grad=True), logits)


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


@pytest.mark.parametrize("d", [1, 30, 32, 71])
def test_gradcheck(d):
    args = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=2, m=2, d=d, p=2, low=0.05, high=0.95, requires_grad=True)
    assert torch.autograd.gradcheck(op, args, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda *a: op(*a, True), args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("d", [1025, 2048, 3096])
def test_wide_channels_forward(d):
    args = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=3, m=1, d=d, dtype=torch.float32)
    torch.testing.assert_close(op(*args), reference.ms_deform_attn(*args), rtol=1e-5, atol=1e-5)


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


def test_nan_and_far_locations_read_zero():
    value, shapes, starts, loc, weights = make_inputs(n=1, lq=3, m=1, p=1)
    loc[0, 0] = float("nan")
    loc[0, 1] = 1e30
    loc[0, 2] = -1e30
    assert torch.equal(op(value, shapes, starts, loc, weights), torch.zeros(1, 3, 4, dtype=torch.float64))


# D = 16 takes the kernel's explicitly vectorized float32 rows, D = 30 its generic channel loops.
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


@pytest.mark.parametrize("kw", [{"lq": 0}, {"n": 0}])
def test_empty(kw):
    args = make_inputs(requires_grad=True, **kw)
    out = op(*args)
    assert out.shape == (kw.get("n", 2), kw.get("lq", 3), 8)
    out.sum().backward()
    assert torch.equal(args[0].grad, torch.zeros_like(args[0]))


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


def test_backward_is_deterministic():
    args = make_inputs(n=2, shapes=((6, 7), (3, 4)), lq=40, m=4, d=32, dtype=torch.float32, requires_grad=True)
    g = torch.randn(2, 40, 128)
    first = torch.autograd.grad(op(*args), [args[0], args[3], args[4]], g)
    for _ in range(3):
        again = torch.autograd.grad(op(*args), [args[0], args[3], args[4]], g)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


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


@pytest.mark.parametrize("logits", [False, True])
def test_opcheck(logits):
    args = make_inputs(n=1, lq=3, m=2, d=5, requires_grad=True)
    opcheck(torch.ops.dnops.ms_deform_attn.default, (*args, logits))
    grad_out = torch.randn(1, 3, 10, dtype=torch.float64)
    opcheck(torch.ops.dnops._ms_deform_attn_backward.default, (grad_out, *[a.detach() for a in args], logits))


def test_compile_fullgraph():
    args = make_inputs(dtype=torch.float32, requires_grad=True)
    compiled = torch.compile(dnops.ms_deform_attn, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    torch.testing.assert_close(out, reference.ms_deform_attn(*args))
    out.sum().backward()
    assert args[0].grad is not None and args[3].grad is not None


def test_autocast_runs_in_float32():
    args = make_inputs(dtype=torch.float32)
    mixed = (args[0].bfloat16(), args[1], args[2], args[3], args[4].bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(*mixed)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, reference.ms_deform_attn(*[a.float() if a.is_floating_point() else a for a in mixed])
    )


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


def test_public_function_picks_cpp_and_override(backend_env):
    args = make_inputs()
    torch.testing.assert_close(dnops.ms_deform_attn(*args), op(*args), rtol=0, atol=0)
    backend_env("reference")
    torch.testing.assert_close(dnops.ms_deform_attn(*args), reference.ms_deform_attn(*args), rtol=0, atol=0)


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


# ---- drop-ins --------------------------------------------------------------------------------------------------


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


def test_module_init_matches_deformable_detr():
    mod = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    bias = mod.sampling_offsets.bias.view(4, 2, 2, 2)
    # head 0 points along +x, head 1 along +y, the k-th point k steps out, the same on every level.
    torch.testing.assert_close(bias[0, :, :, 0], torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    torch.testing.assert_close(bias[1, :, 1, :], torch.tensor([[0.0, 2.0], [0.0, 2.0]]), atol=1e-6, rtol=0)
    assert mod.attention_weights.weight.abs().sum() == 0 and mod.sampling_offsets.weight.abs().sum() == 0


def test_function_and_mmcv_names():
    value, shapes, starts, loc, weights = make_inputs()
    expected = reference.ms_deform_attn(value, shapes, starts, loc, weights)
    torch.testing.assert_close(dnops.MSDeformAttnFunction.apply(value, shapes, starts, loc, weights, 64), expected)
    torch.testing.assert_close(dnops.multi_scale_deformable_attn_pytorch(value, shapes, loc, weights), expected)


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
