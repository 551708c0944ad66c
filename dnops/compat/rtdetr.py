"""The real-time DETRs' deformable-attention functions on dnops.ms_deform_attn: RT-DETR's
``deformable_attention_core_func`` (v1, Deformable-DETR's layout) and ``deformable_attention_core_func_v2`` in the
three forms its descendants call (RT-DETR v2's ``src/zoo/rtdetr/utils.py``, D-FINE's ``src/zoo/dfine/utils.py``,
DEIM's ``engine/deim/utils.py``): a point count per level and ``method="discrete"``; and RT-DETR v2's contrastive
denoising group, ``get_contrastive_denoising_training_group``, on dnops.dn_queries.

Same names, argument order, shapes and values (float64 to 1e-12 against transcriptions in ``originals/``); the
output is contiguous where the originals return a transposed view.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence

import torch

from dnops._cache import LRU
from dnops._constants import host_to_device
from dnops.compat._levels import level_tensors
from dnops.compat.deformable_detr import ms_deform_attn_core_pytorch
from dnops.dn import inverse_sigmoid
from dnops.nn.dn_mha import DNMultiheadAttention
from dnops.ops.dn_attn_mask import dn_attn_mask
from dnops.ops.dn_queries import generate
from dnops.ops.ms_deform_attn import ms_deform_attn

deformable_attention_core_func = ms_deform_attn_core_pytorch
"""RT-DETR v1's ``deformable_attention_core_func(value, value_spatial_shapes, sampling_locations,
attention_weights)``: value (N, S, M, D), value_spatial_shapes (L, 2) as a list or tensor, sampling_locations
(N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D)."""


def deformable_attention_core_func_v2(
    value: torch.Tensor | Sequence[torch.Tensor],
    value_spatial_shapes: Sequence[Sequence[int]] | torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list: Sequence[int],
    method: str = "default",
    value_shape: str | None = None,
) -> torch.Tensor:
    """RT-DETR v2 / D-FINE / DEIM's ``deformable_attention_core_func_v2``.

    Args:
        value: (N, S, M, D) (RT-DETR v2; DEIM with ``value_shape="reshape"``), or one (N, M, D, H_l * W_l) tensor
            per level (D-FINE; DEIM's default ``value_shape="default"``: its decoder's ``value_op`` splits one
            (N, M, D, S) tensor). Either is accepted whatever value_shape says.
        value_spatial_shapes: (L, 2) rows (H_l, W_l), a list or a tensor (read on the host, as the originals read it
            for their split sizes: a device sync when it lives on a GPU).
        sampling_locations: (N, Lq, M, sum_l P_l, 2), level-major.
        attention_weights: (N, Lq, M, sum_l P_l), already softmaxed over the sum_l P_l points.
        num_points_list: (P_0, ..., P_{L-1}).
        method: "default" (bilinear, grid_sample's) or "discrete" (the nearest pixel: (loc * (W, H) + 0.5)
            truncated, clamped).
        value_shape: DEIM's argument, accepted for its signature.

    Returns:
        (N, Lq, M * D).

    The originals' "discrete" clamps both coordinates to [0, H_l - 1] ("FIX ME? for rectangle input"): on a level
    wider than tall, x stops at column H_l - 1, and that is reproduced here. On a level taller than wide, an x past
    the last column indexes outside the map in the originals, which then fail; here it reads the last column.
    dnops.ms_deform_attn's own sampling="discrete" clamps each axis to its own size.
    """
    if method not in ("default", "discrete"):
        raise ValueError(f"deformable_attention_core_func_v2: method must be 'default' or 'discrete', got {method!r}")
    if value_shape not in (None, "default", "reshape"):
        raise ValueError(
            f"deformable_attention_core_func_v2: value_shape must be 'default' or 'reshape', got {value_shape!r}"
        )
    if isinstance(value_spatial_shapes, torch.Tensor):
        value_spatial_shapes = value_spatial_shapes.tolist()
    shapes_list = [(int(h), int(w)) for h, w in value_spatial_shapes]
    if not isinstance(value, torch.Tensor):
        value = channel_major_levels_as_value(value)
    shapes, starts = level_tensors(shapes_list, value.device)
    sampling = "bilinear"
    if method == "discrete":
        sampling = "discrete"
        sampling_locations = _square_clamp(sampling_locations, shapes_list, list(num_points_list))
    return ms_deform_attn(
        value,
        shapes,
        starts,
        sampling_locations,
        attention_weights,
        points_per_level=list(num_points_list),
        sampling=sampling,
    )


def _square_clamp(locations: torch.Tensor, shapes: list[tuple[int, int]], points: list[int]) -> torch.Tensor:
    """x of each level wider than tall capped at (H_l - 1) / W_l, where floor(x * W_l + 0.5) reaches H_l - 1: the
    originals' clamp of x to [0, H_l - 1]. Levels whose width is at most their height are left alone."""
    if all(w <= h for h, w in shapes):
        return locations
    x = locations[..., 0].split(points, dim=-1)
    x = [xl.clamp(max=(h - 1) / w) if w > h else xl for xl, (h, w) in zip(x, shapes, strict=True)]
    return torch.stack([torch.cat(x, -1), locations[..., 1]], -1)


# D-FINE's decoder makes its per-level value views once per forward and hands the same ones to every layer: the
# (N, S, M, D) copy made for the first layer is reused by the others while those views live and are unchanged.
_CONVERTED: LRU[int, tuple[weakref.ref, tuple[int, bool], torch.Tensor]] = LRU(8)


def channel_major_levels_as_value(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level (N, M, D, H_l * W_l) tensors (D-FINE / DEIM's value) as the (N, S, M, D) value of the op.

    One copy of value (N * S * M * D elements, read and written once) per distinct set of views, made on the first
    call and reused by later calls with the same views (every decoder layer of one forward), unless one of them was
    modified in place since. The copy is part of the autograd graph: gradients reach the views.
    """
    first = levels[0]
    key = id(first)
    state = (sum(t._version for t in levels), torch.is_grad_enabled())  # an in-place change, or a graph to build
    seen = _CONVERTED.get(key)
    if seen is not None and seen[0]() is first and seen[1] == state and not torch.compiler.is_compiling():
        return seen[2]
    n, m, d, _ = first.shape
    value = torch.cat([t.reshape(n, m, d, -1) for t in levels], -1).permute(0, 3, 1, 2).contiguous()
    if not torch.compiler.is_compiling():
        alive = weakref.ref(first, lambda _, key=key: _CONVERTED.pop(key, None))
        _CONVERTED[key] = (alive, state, value)
    return value


def get_contrastive_denoising_training_group(
    targets: Sequence[dict],
    num_classes: int,
    num_queries: int,
    class_embed: torch.nn.Module,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict | None]:
    """RT-DETR v2's ``get_contrastive_denoising_training_group`` (``src/zoo/rtdetr/denoising.py``) on
    dnops.dn_queries and dnops.dn_attn_mask.

    Args:
        targets: per image {"labels": (n,), "boxes": (n, 4) cxcywh}.
        class_embed: the label embedding (nn.Embedding(num_classes + 1, hidden), padding label num_classes).
        num_denoising: DN queries wanted; num_denoising // max_gt groups (at least one) of [positives | negatives].

    Returns:
        (input_query_logits (B, T, hidden), input_query_bbox_unact (B, T, 4), attn_mask (T + num_queries,) * 2,
        dn_meta {"dn_positive_idx": one (n_b * groups,) tensor per image, "dn_num_group", "dn_num_split":
        [T, num_queries]}) with T = 2 * max_gt * groups; four Nones when num_denoising <= 0.

    As the original: labels flip with label_noise_ratio / 2 to a class in [0, num_classes) (positives and
    negatives alike), corners move by sign * r * half-size * box_noise_scale with r in [0, 1) for positives and
    [1, 2) for negatives and are clipped to [0, 1] (a size whose corners crossed comes out 0), boxes come back
    through inverse_sigmoid with eps 1e-5; padding slots hold label num_classes and box 0. A batch without GT gets
    one dummy group (box (0.5, 0.5, 0.1, 0.1), noised, label num_classes, no positive), T = 2, so every DDP rank
    runs the same graph. The noise comes from dnops.dn_queries (counter-based Philox: other numbers than
    torch.rand's, the same law), the positive indices from the host counts (the original's nonzero is a device
    sync). With box_noise_scale <= 0 the original fails (its unactivated boxes exist only inside the noise branch);
    here they are the GT boxes', inverse-sigmoided.
    """
    return contrastive_group(
        targets, num_classes, num_queries, class_embed, num_denoising, label_noise_ratio, box_noise_scale, False
    )


def contrastive_group(
    targets: Sequence[dict],
    num_classes: int,
    num_queries: int,
    class_embed: torch.nn.Module,
    num_denoising: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    dfine: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict | None]:
    """The contrastive denoising group of RT-DETR v2 (``dfine=False``) or of D-FINE / DEIM (``dfine=True``: a size
    whose corners crossed is their distance, and a batch without GT returns (None, None, None, dn_meta) with
    dn_num_group 0)."""
    if num_denoising <= 0:
        return None, None, None, None
    if not isinstance(targets, list | tuple) or not targets:
        raise ValueError("get_contrastive_denoising_training_group: need one target dict per image, got none")
    counts = [len(t["labels"]) for t in targets]
    device = targets[0]["labels"].device
    dtype = torch.get_default_dtype()  # the original's box tensor: torch.zeros without a dtype
    empty = max(counts) == 0
    if empty and dfine:
        return None, None, None, {"dn_positive_idx": None, "dn_num_group": 0, "dn_num_split": [0, num_queries]}
    if empty:
        labels = torch.zeros(len(counts), dtype=torch.int64, device=device)
        boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1]], dtype=dtype, device=device).repeat(len(counts), 1)
        counts, max_gt, groups = [1] * len(counts), 1, 1
    else:
        labels = torch.cat([t["labels"] for t in targets]).long()
        boxes = torch.cat([t["boxes"] for t in targets]).to(dtype)
        max_gt = max(counts)
        groups = max(num_denoising // max_gt, 1)
    flip = 0.0 if empty else max(float(label_noise_ratio), 0.0) * 0.5
    scale = max(float(box_noise_scale), 0.0)
    out_labels, out_boxes, gt_index, _ = generate(
        labels, boxes, counts, groups, max_gt, True, num_classes, flip, scale, None, abs_size=dfine
    )
    valid = gt_index >= 0
    if empty:
        out_labels = torch.full_like(out_labels, num_classes)
    noised = out_boxes if scale > 0 else boxes[gt_index.clamp(min=0)]  # no noise: the GT exactly, no round trip
    # RT-DETR's inverse_sigmoid has eps 1e-5 (DETR's 1e-3)
    unact = inverse_sigmoid(torch.where(valid[..., None], noised, torch.zeros_like(noised)), 1e-5)
    pad_size = 2 * max_gt * groups
    attn_mask = dn_attn_mask(pad_size, 2 * max_gt, num_queries, device=device)
    # each image's positive slots, group by group: made from the host counts, one copy to the device
    real = [0] * len(counts) if empty else counts
    slots = [[g * 2 * max_gt + j for g in range(groups) for j in range(n)] for n in real]
    flat = torch.tensor([s for per_image in slots for s in per_image], dtype=torch.int64)
    flat = host_to_device(flat, device, "compat.rtdetr.get_contrastive_denoising_training_group")
    dn_meta = {
        "dn_positive_idx": flat.split([len(s) for s in slots]),
        "dn_num_group": groups,
        "dn_num_split": [pad_size, num_queries],
    }
    return class_embed(out_labels.int()), unact, attn_mask, dn_meta


def use_dnops(model: torch.nn.Module, self_attention: bool = True) -> int:
    """Routes a model built by RT-DETR's, RT-DETR v2's, D-FINE's or DEIM's own code to dnops, in place.

    Each deformable-attention module holds its core function in ``ms_deformable_attn_core``: RT-DETR v1's
    ``deformable_attention_core_func``, or the others' ``functools.partial(deformable_attention_core_func_v2,
    method=..., [value_shape=...])``; it becomes this module's function with the same arguments. With
    ``self_attention``, the decoder layers' ``self_attn`` (an nn.MultiheadAttention beside a ``cross_attn``) becomes
    a DNMultiheadAttention: same parameters and state_dict, block-sparse when handed the DN mask these decoders
    build (``attn_mask`` from get_contrastive_denoising_training_group), nn.MultiheadAttention's own path otherwise.
    Nothing else changes; returns how many modules were routed (0: none, or already routed).
    """
    routed = 0
    for module in model.modules():
        core = getattr(module, "ms_deformable_attn_core", None)
        if getattr(core, "__name__", None) == "deformable_attention_core_func" and core is not (
            deformable_attention_core_func
        ):
            module.ms_deformable_attn_core = deformable_attention_core_func
            routed += 1
        elif isinstance(core, functools.partial) and core.func is not deformable_attention_core_func_v2:
            if getattr(core.func, "__name__", None) == "deformable_attention_core_func_v2":
                module.ms_deformable_attn_core = functools.partial(
                    deformable_attention_core_func_v2, *core.args, **core.keywords
                )
                routed += 1
    return routed + (route_decoder_self_attention(model) if self_attention else 0)


def is_decoder_layer(module: torch.nn.Module) -> bool:
    """A decoder layer whose self-attention may run under a DN mask: an nn.MultiheadAttention ``self_attn`` beside a
    ``cross_attn`` (the layers of DN-DETR, DINO, RT-DETR, D-FINE, DEIM, ultralytics, ...)."""
    return type(getattr(module, "self_attn", None)) is torch.nn.MultiheadAttention and hasattr(module, "cross_attn")


def route_decoder_self_attention(model: torch.nn.Module, skip: Callable[[torch.nn.Module], bool] | None = None) -> int:
    """Every decoder layer's ``self_attn`` (``is_decoder_layer``; not those of layers ``skip`` names) becomes a
    DNMultiheadAttention, in place; returns how many."""
    layers = [m for m in model.modules() if is_decoder_layer(m) and not (skip and skip(m))]
    for layer in layers:
        layer.self_attn.__class__ = DNMultiheadAttention
    return len(layers)
