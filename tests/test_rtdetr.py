"""dnops.compat.rtdetr: RT-DETR v1 / v2, D-FINE and DEIM's deformable-attention functions against transcriptions of
the originals (originals/), float64 to 1e-12, forward and gradients; RT-DETR v2's contrastive denoising group
against its transcription, exactly where the original draws no noise and by the noise law where it does."""

from __future__ import annotations

import functools

import pytest
import torch

from dnops.compat import dfine, rtdetr
from originals import (
    deim_deformable_attention_core_func_v2,
    dfine_get_contrastive_denoising_training_group,
    rtdetr_deformable_attention_core_func,
    rtdetr_get_contrastive_denoising_training_group,
)
from tests.backends import backends
from tests.dn_utils import make_gt
from tests.routing import front_door

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


# ---- RT-DETR v2's get_contrastive_denoising_training_group -----------------------------------------------------------

CLASSES, HIDDEN, QUERIES = 7, 8, 6


def cdn_targets(counts, seed=0):
    labels, boxes, counts = make_gt(counts, num_classes=CLASSES, seed=seed, centered=True)
    return [{"labels": lb, "boxes": bx} for lb, bx in zip(labels.split(counts), boxes.split(counts), strict=True)]


def corner_moves(unact, gt):
    """|corner shift| / (half side * 1.0) of noised boxes (given unactivated) against their GT, per slot (B, T)."""

    def xyxy(b):
        return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)

    half = torch.cat([gt[..., 2:], gt[..., 2:]], -1) / 2
    return ((xyxy(unact.sigmoid()) - xyxy(gt)).abs() / half.clamp(min=1e-9)).amax(-1)


def slot_gt(targets, groups, max_gt):
    """(B, T, 4) the GT box of each slot of the CDN layout (zeros in padding), (B, T) bool valid, (B, T) bool
    negative."""
    b = len(targets)
    gt = torch.zeros(b, 2 * max_gt * groups, 4)
    valid = torch.zeros(b, 2 * max_gt * groups, dtype=torch.bool)
    negative = torch.zeros_like(valid)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        for g in range(groups):
            for half in range(2):
                first = (2 * g + half) * max_gt
                gt[i, first : first + n] = t["boxes"]
                valid[i, first : first + n] = True
                negative[i, first : first + n] = half == 1
    return gt, valid, negative


VARIANTS = {
    "rtdetr": (rtdetr.get_contrastive_denoising_training_group, rtdetr_get_contrastive_denoising_training_group),
    "dfine": (dfine.get_contrastive_denoising_training_group, dfine_get_contrastive_denoising_training_group),
}


@pytest.mark.parametrize("backend", backends("dn_queries"))
@pytest.mark.parametrize("counts", [[3, 1], [2, 0, 4], [5]])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cdn_group_equals_the_original_without_label_noise(backend, backend_env, counts, variant):
    """Labels, mask, dn_meta and padding exactly; the boxes by the noise law: every positive corner within its
    half-size times the scale, every negative one beyond it (centered boxes: nothing clipped; scale 0.5: no
    corners cross)."""
    backend_env(backend)
    targets = cdn_targets(counts)
    embed = torch.nn.Embedding(CLASSES + 1, HIDDEN, padding_idx=CLASSES)
    fn, original = VARIANTS[variant]
    ours = fn(targets, CLASSES, QUERIES, embed, 20, 0.0, 0.5)
    theirs = original(targets, CLASSES, QUERIES, embed, 20, 0.0, 0.5)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    assert torch.equal(ours[2], theirs[2])
    assert ours[3]["dn_num_group"] == theirs[3]["dn_num_group"] and ours[3]["dn_num_split"] == theirs[3]["dn_num_split"]
    assert [t.tolist() for t in ours[3]["dn_positive_idx"]] == [t.tolist() for t in theirs[3]["dn_positive_idx"]]
    assert ours[1].shape == theirs[1].shape and ours[1].dtype == theirs[1].dtype
    gt, valid, negative = slot_gt(targets, ours[3]["dn_num_group"], max(counts))
    for unact in (ours[1], theirs[1]):
        assert torch.equal(unact[~valid], torch.full_like(unact[~valid], torch.log(torch.tensor(1e-5)).item()))
        moves = corner_moves(unact, gt) / 0.5
        assert (moves[valid & ~negative] < 1 + 1e-3).all() and (moves[valid & negative] > 1 - 1e-3).all()
    # gradients reach the label embedding as in the original
    grads = [torch.autograd.grad(out[0].sum(), embed.weight)[0] for out in (ours, theirs)]
    torch.testing.assert_close(grads[0], grads[1])


def test_cdn_group_noise_law_equals_the_original():
    """Over 300 groups: the share of flipped labels (label_noise_ratio / 2) and the mean largest corner shift of
    positive and negative slots agree with the original's."""
    targets = cdn_targets([3, 2], seed=1)
    embed = torch.nn.Embedding(CLASSES + 1, 1)
    with torch.no_grad():
        embed.weight.copy_(torch.arange(CLASSES + 1, dtype=torch.float32)[:, None])  # the embedding is the label

    def stats(fn):
        torch.manual_seed(0)
        label, unact, _, meta = fn(targets, CLASSES, QUERIES, embed, 900, 0.6, 0.5)
        gt, valid, negative = slot_gt(targets, meta["dn_num_group"], 3)
        moves = corner_moves(unact, gt) / 0.5
        flipped = (label[..., 0][valid] != _slot_labels(targets, meta["dn_num_group"], 3)[valid]).float().mean()
        return flipped, moves[valid & ~negative].mean(), moves[valid & negative].mean()

    ours, theirs = (
        stats(rtdetr.get_contrastive_denoising_training_group),
        stats(rtdetr_get_contrastive_denoising_training_group),
    )
    # a flip draws a uniform class, which may be the GT's: 0.3 * 6 / 7 of the labels change
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=0.03, rtol=0)
    torch.testing.assert_close(ours[0], torch.tensor(0.3 * 6 / 7), atol=0.03, rtol=0)


def _slot_labels(targets, groups, max_gt):
    out = torch.full((len(targets), 2 * max_gt * groups), float(CLASSES))
    for i, t in enumerate(targets):
        n = len(t["labels"])
        for half in range(2 * groups):
            out[i, half * max_gt : half * max_gt + n] = t["labels"].float()
    return out


@pytest.mark.parametrize("backend", backends("dn_queries"))
def test_cdn_group_without_gt_is_one_noised_dummy_group(backend, backend_env):
    backend_env(backend)
    targets = cdn_targets([0, 0])
    embed = torch.nn.Embedding(CLASSES + 1, HIDDEN, padding_idx=CLASSES)
    ours = rtdetr.get_contrastive_denoising_training_group(targets, CLASSES, QUERIES, embed, 100, 0.5, 1.0)
    theirs = rtdetr_get_contrastive_denoising_training_group(targets, CLASSES, QUERIES, embed, 100, 0.5, 1.0)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)  # label num_classes: no noise on the dummy
    assert ours[1].shape == (2, 2, 4) and torch.equal(ours[2], theirs[2]) and ours[2].shape == (2 + QUERIES,) * 2
    assert ours[3]["dn_num_split"] == [2, QUERIES] and [t.numel() for t in ours[3]["dn_positive_idx"]] == [0, 0]
    dummy = torch.tensor([0.5, 0.5, 0.1, 0.1]).expand(2, 2, 4)
    for unact in (ours[1], theirs[1]):
        moves = corner_moves(unact, dummy)
        assert (moves[:, 0] < 1 + 1e-3).all() and (moves[:, 1] > 1 - 1e-3).all()
    assert rtdetr.get_contrastive_denoising_training_group(targets, CLASSES, QUERIES, embed, 0) == (None,) * 4


def test_cdn_group_without_box_noise_returns_the_gt():
    """The original fails there (UnboundLocalError); the drop-in returns the GT boxes, inverse-sigmoided."""
    targets = cdn_targets([2, 1])
    embed = torch.nn.Embedding(CLASSES + 1, HIDDEN)
    with pytest.raises(UnboundLocalError):
        rtdetr_get_contrastive_denoising_training_group(targets, CLASSES, QUERIES, embed, 10, 0.0, 0.0)
    _, unact, _, meta = rtdetr.get_contrastive_denoising_training_group(targets, CLASSES, QUERIES, embed, 10, 0.0, 0.0)
    gt, valid, _ = slot_gt(targets, meta["dn_num_group"], 2)
    torch.testing.assert_close(unact[valid].sigmoid(), gt[valid])


# ---- use_dnops on a model built by the repositories' own code --------------------------------------------------------
# Stand-ins with what use_dnops reads of the repositories' modules (checked against RT-DETR v2's rtdetrv2_decoder.py,
# D-FINE's dfine_decoder.py and DEIM's engine/deim/*_decoder.py): the deformable attention keeps its core function in
# ms_deformable_attn_core (a partial of deformable_attention_core_func_v2, or RT-DETR v1's function) and calls it
# (value, value_spatial_shapes, sampling_locations, attention_weights[, num_points_list]); a decoder layer holds
# self_attn (nn.MultiheadAttention, batch_first) beside cross_attn and calls self_attn(q, k, value=, attn_mask=).


def deformable_attention_core_func_v2(*args, **kwargs):  # the original's name, on its transcription
    return deim_deformable_attention_core_func_v2(*args, **kwargs)


class CrossAttention(torch.nn.Module):
    def __init__(self, dim, heads, points, method="default", value_shape="reshape"):
        super().__init__()
        self.heads, self.points = heads, points
        self.num_points_list = list(points)
        self.sampling_offsets = torch.nn.Linear(dim, heads * sum(points) * 2)
        self.attention_weights = torch.nn.Linear(dim, heads * sum(points))
        self.value_proj = torch.nn.Linear(dim, dim)
        self.ms_deformable_attn_core = functools.partial(
            deformable_attention_core_func_v2, method=method, value_shape=value_shape
        )

    def forward(self, query, reference_points, value, shapes):
        b, q = query.shape[:2]
        value = self.value_proj(value).reshape(b, value.shape[1], self.heads, -1)
        offsets = self.sampling_offsets(query).reshape(b, q, self.heads, sum(self.points), 2)
        weights = self.attention_weights(query).reshape(b, q, self.heads, sum(self.points)).softmax(-1)
        loc = reference_points[:, :, None, None, :] + offsets * 0.05
        if self.ms_deformable_attn_core.keywords.get("value_shape") == "default":
            value = value.permute(0, 2, 3, 1).split([h * w for h, w in shapes], dim=-1)
        return self.ms_deformable_attn_core(value, shapes, loc, weights, self.num_points_list)


class DecoderLayer(torch.nn.Module):
    def __init__(self, dim=16, heads=2, points=(3, 6, 3), **kw):
        super().__init__()
        self.self_attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = CrossAttention(dim, heads, points, **kw)

    def forward(self, target, reference_points, memory, shapes, attn_mask):
        target = target + self.self_attn(target, target, value=target, attn_mask=attn_mask, need_weights=False)[0]
        return target + self.cross_attn(target, reference_points, memory, shapes)


@pytest.mark.parametrize("kw", [{}, {"value_shape": "default"}, {"method": "discrete"}], ids=str)
@pytest.mark.parametrize("route", [rtdetr.use_dnops, front_door], ids=["rtdetr.use_dnops", "compat.use_dnops"])
def test_use_dnops_routes_a_repository_decoder_layer(kw, route, monkeypatch):
    import copy

    import dnops.nn.dn_mha as dn_mha

    torch.manual_seed(0)
    theirs = DecoderLayer(**kw).double()
    ours = copy.deepcopy(theirs)
    assert route(ours) == 2 and route(ours) == 0
    assert list(ours.state_dict()) == list(theirs.state_dict())
    targets = cdn_targets([3, 2])
    _, _, mask, meta = rtdetr.get_contrastive_denoising_training_group(
        targets, CLASSES, QUERIES, torch.nn.Embedding(CLASSES + 1, 16), 12, 0.5, 1.0
    )
    width = meta["dn_num_split"][0] + QUERIES
    target = torch.randn(2, width, 16, dtype=torch.float64, requires_grad=True)
    shapes = [(4, 4), (2, 2), (1, 1)]  # square, as the repositories' 640 x 640 inputs give (see the discrete clamp)
    memory = torch.randn(2, sum(h * w for h, w in shapes), 16, dtype=torch.float64)
    reference = torch.rand(2, width, 2, dtype=torch.float64) * 0.8 + 0.1
    calls = []
    monkeypatch.setattr(dn_mha, "dn_self_attention", lambda *a: calls.append(1) or rtdetr_dn_self_attention(*a))
    outs = [m(target, reference, memory, shapes, mask) for m in (theirs, ours)]
    assert calls, "the DN mask takes the block-sparse path"
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    g = torch.randn_like(outs[0])
    params = [[target, *m.parameters()] for m in (theirs, ours)]
    grads = [grads_of(o, p, g) for o, p in zip(outs, params, strict=True)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def rtdetr_dn_self_attention(*args):
    import dnops

    return dnops.dn_self_attention(*args)


def grads_of(out, tensors, g):
    wanted = [t for t in tensors if t.requires_grad]
    return torch.autograd.grad(out, wanted, g, allow_unused=True, materialize_grads=True)


def deformable_attention_core_func(*args):  # RT-DETR v1's name, on its transcription
    return rtdetr_deformable_attention_core_func(*args)


@pytest.mark.parametrize("route", [rtdetr.use_dnops, front_door], ids=["rtdetr.use_dnops", "compat.use_dnops"])
def test_use_dnops_routes_rtdetr_v1_attention(route):
    module = torch.nn.Module()
    module.ms_deformable_attn_core = deformable_attention_core_func
    assert route(module) == 1 and module.ms_deformable_attn_core is rtdetr.deformable_attention_core_func
    value, loc, weights = inputs([2, 2, 2])
    args = (value, SHAPES, loc.unflatten(3, (3, 2)), weights.unflatten(3, (3, 2)))
    torch.testing.assert_close(module.ms_deformable_attn_core(*args), deformable_attention_core_func(*args), **TOL)


def test_dfine_cdn_group_turns_crossed_sizes_positive_as_the_original():
    """With box_noise_scale 1 a negative's corners often cross (sign -1 on the right corner, +1 on the left): RT-DETR
    v2's size is then 0 (its inverse_sigmoid clips), D-FINE's the corners' distance. Over 300 groups the share of
    zero sizes and the mean size of negatives agree with each original's."""
    targets = cdn_targets([3, 2], seed=2)
    embed = torch.nn.Embedding(CLASSES + 1, 1)

    def stats(fn):
        torch.manual_seed(0)
        _, unact, _, meta = fn(targets, CLASSES, QUERIES, embed, 900, 0.0, 1.0)
        _, valid, negative = slot_gt(targets, meta["dn_num_group"], 3)
        sizes = unact.sigmoid()[..., 2:][valid & negative]
        return (sizes < 1e-4).float().mean(), sizes.mean()

    got = {name: (stats(fn), stats(original)) for name, (fn, original) in VARIANTS.items()}
    for ours, theirs in got.values():
        torch.testing.assert_close(ours[0], theirs[0], atol=0.03, rtol=0)
        torch.testing.assert_close(ours[1], theirs[1], atol=0.004, rtol=0)
    assert got["rtdetr"][0][0] > 0.1 and got["dfine"][0][0] < 0.01


def test_dfine_cdn_group_without_gt_returns_its_meta():
    embed = torch.nn.Embedding(CLASSES + 1, HIDDEN)
    targets = cdn_targets([0, 0])
    ours = dfine.get_contrastive_denoising_training_group(targets, CLASSES, QUERIES, embed)
    theirs = dfine_get_contrastive_denoising_training_group(targets, CLASSES, QUERIES, embed)
    assert ours == theirs == (None, None, None, {"dn_positive_idx": None, "dn_num_group": 0, "dn_num_split": [0, 6]})
