"""mmcv's ``mmcv.ops.multi_scale_deform_attn`` function name."""

from __future__ import annotations

import torch

from dnops.compat.deformable_detr import ms_deform_attn_core_pytorch


def multi_scale_deformable_attn_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """mmcv's signature: value (bs, num_keys, num_heads, embed_dims // num_heads), value_spatial_shapes
    (num_levels, 2), sampling_locations (bs, num_queries, num_heads, num_levels, num_points, 2),
    attention_weights (bs, num_queries, num_heads, num_levels, num_points) -> (bs, num_queries, embed_dims)."""
    return ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights)
