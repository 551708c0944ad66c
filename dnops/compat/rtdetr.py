"""The real-time DETRs' deformable-attention functions on dnops.ms_deform_attn: RT-DETR's
``deformable_attention_core_func`` (v1, Deformable-DETR's layout) and ``deformable_attention_core_func_v2`` in the
three forms its descendants call (RT-DETR v2's ``src/zoo/rtdetr/utils.py``, D-FINE's ``src/zoo/dfine/utils.py``,
DEIM's ``engine/deim/utils.py``): a point count per level and ``method="discrete"``.

Same names, argument order, shapes and values (float64 to 1e-12 against transcriptions in ``originals.py``); the
output is contiguous where the originals return a transposed view.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from dnops.compat.deformable_detr import ms_deform_attn_core_pytorch
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
        value_spatial_shapes: (L, 2) rows (H_l, W_l), a list or a tensor.
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
    device = value.device
    shapes = torch.tensor(shapes_list, dtype=torch.int64, device=device)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
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
    caps = [(h - 1) / w if w > h else float("inf") for h, w in shapes]
    if all(c == float("inf") for c in caps):
        return locations
    cap = torch.tensor([c for c, p in zip(caps, points, strict=True) for _ in range(p)], dtype=locations.dtype)
    x = torch.minimum(locations[..., 0], cap.to(locations.device))
    return torch.stack([x, locations[..., 1]], -1)


# D-FINE's decoder makes its per-level value views once per forward and hands the same ones to every layer: the
# (N, S, M, D) copy made for the first layer is reused by the others while those views live and are unchanged.
_CONVERTED: dict[int, tuple[weakref.ref, tuple[int, bool], torch.Tensor]] = {}


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
