"""dnops.compat.rtdetr: RT-DETR v1 / v2, D-FINE and DEIM's deformable-attention functions against transcriptions of
the originals (originals.py), float64 to 1e-12, forward and gradients."""

from __future__ import annotations

import pytest
import torch

from dnops.compat import rtdetr
from originals import deim_deformable_attention_core_func_v2, rtdetr_deformable_attention_core_func
from tests.backends import backends

SHAPES = [(6, 5), (3, 3), (1, 2)]  # rectangles both ways: the discrete clamp's case
TOL = dict(rtol=1e-12, atol=1e-12)


def inputs(points, shapes=SHAPES, n=2, lq=5, m=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, dtype=torch.float64, generator=g).requires_grad_()
    loc = (torch.rand(n, lq, m, sum(points), 2, dtype=torch.float64, generator=g) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(n, lq, m, sum(points), dtype=torch.float64, generator=g).softmax(-1).requires_grad_()
    return value, loc, weights


def grads(out, tensors, g):
    return torch.autograd.grad(out, tensors, g, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("backend", backends("ms_deform_attn"))
@pytest.mark.parametrize("as_tensor", [False, True])
def test_v1_equals_the_original(backend, backend_env, as_tensor):
    backend_env(backend)
    value, loc, weights = inputs([3, 3, 3])
    loc, weights = loc.unflatten(3, (3, 3)), weights.unflatten(3, (3, 3))
    shapes = torch.tensor(SHAPES) if as_tensor else SHAPES
    ours = rtdetr.deformable_attention_core_func(value, shapes, loc, weights)
    theirs = rtdetr_deformable_attention_core_func(value, SHAPES, loc, weights)
    torch.testing.assert_close(ours, theirs, **TOL)
    g = torch.randn_like(ours)
    for a, b in zip(grads(ours, [value, loc, weights], g), grads(theirs, [value, loc, weights], g), strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", backends("ms_deform_attn"))
@pytest.mark.parametrize("points", [[3, 6, 3], [2, 2, 2], [1, 4, 2]])
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_v2_equals_rtdetr_v2_and_deim_reshape(backend, backend_env, points, method):
    """RT-DETR v2's (N, S, M, D) value, and DEIM's value_shape="reshape"; discrete on a 6 x 5 level (taller than
    wide, x kept inside the map) and a 1 x 2 one (wider than tall: the original's x stops at column 0)."""
    backend_env(backend)
    value, loc, weights = inputs(points)
    if method == "discrete":
        loc = loc.detach().clamp(0, 0.85)  # past x = 0.9 the originals index outside the 6 x 5 level
    ours = rtdetr.deformable_attention_core_func_v2(value, SHAPES, loc, weights, points, method)
    deim = rtdetr.deformable_attention_core_func_v2(value, SHAPES, loc, weights, points, method, "reshape")
    theirs = deim_deformable_attention_core_func_v2(value, SHAPES, loc, weights, points, method, "reshape")
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(deim, theirs, **TOL)
    g = torch.randn_like(ours)
    tensors = [value, loc, weights] if method == "default" else [value, weights]
    for a, b in zip(grads(ours, tensors, g), grads(theirs, tensors, g), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def _value_op(value, shapes):
    """D-FINE's decoder value_op: (N, S, M, D) -> per-level (N, M, D, H_l * W_l) views of one permuted tensor."""
    return value.permute(0, 2, 3, 1).split([h * w for h, w in shapes], dim=-1)


@pytest.mark.parametrize("points", [[3, 6, 3], [6, 6, 6]])
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_v2_equals_dfine_and_deim_per_level_value(points, method):
    value, loc, weights = inputs(points, d=8)
    if method == "discrete":
        loc = loc.detach().clamp(0, 0.85)
    levels = _value_op(value, SHAPES)
    ours = rtdetr.deformable_attention_core_func_v2(levels, SHAPES, loc, weights, points, method)
    theirs = deim_deformable_attention_core_func_v2(levels, SHAPES, loc, weights, points, method, "default")
    torch.testing.assert_close(ours, theirs, **TOL)
    g = torch.randn_like(ours)
    for a, b in zip(grads(ours, [value, weights], g), grads(theirs, [value, weights], g), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_dfine_value_is_converted_once_per_set_of_views():
    value, _, _ = inputs([1, 1, 1])
    levels = _value_op(value, SHAPES)
    first = rtdetr.channel_major_levels_as_value(levels)
    assert rtdetr.channel_major_levels_as_value(levels) is first  # every decoder layer of one forward
    torch.testing.assert_close(first, value, **TOL)
    with torch.no_grad():
        again = rtdetr.channel_major_levels_as_value(levels)  # no graph wanted: a copy of its own
    assert again is not first and again.grad_fn is None
    plain = value.detach().clone()
    levels = _value_op(plain, SHAPES)
    before = rtdetr.channel_major_levels_as_value(levels)
    plain.add_(1.0)  # the views change with their base
    after = rtdetr.channel_major_levels_as_value(levels)
    assert after is not before and torch.equal(after, plain)


def test_discrete_on_a_wide_level_reproduces_the_square_clamp():
    """A 2 x 7 level: the originals stop x at column H - 1 = 1; dnops' own discrete sampling does not."""
    shapes = [(2, 7)]
    value, loc, weights = inputs([4], shapes=shapes)
    loc = loc.detach().clamp(0, 1)
    loc[..., 0] = torch.linspace(0.05, 0.98, loc[..., 0].numel(), dtype=torch.float64).view_as(loc[..., 0])
    ours = rtdetr.deformable_attention_core_func_v2(value, shapes, loc, weights, [4], "discrete")
    theirs = deim_deformable_attention_core_func_v2(value, shapes, loc, weights, [4], "discrete", "reshape")
    torch.testing.assert_close(ours, theirs, **TOL)
    import dnops

    own = dnops.ms_deform_attn(
        value, torch.tensor(shapes), torch.tensor([0]), loc, weights, points_per_level=[4], sampling="discrete"
    )
    assert not torch.allclose(own, theirs)


def test_bad_arguments_name_themselves():
    value, loc, weights = inputs([1, 1, 1])
    with pytest.raises(ValueError, match="method must be 'default' or 'discrete'"):
        rtdetr.deformable_attention_core_func_v2(value, SHAPES, loc, weights, [1, 1, 1], "nearest")
    with pytest.raises(ValueError, match="points_per_level has 2 counts but spatial_shapes has 3 levels"):
        rtdetr.deformable_attention_core_func_v2(value, SHAPES, loc, weights, [2, 1])
