from __future__ import annotations

import torch

from dnops import _backend, reference
from dnops.validation import check_ms_deform_attn_args

# Ops of this module that have a Triton kernel (the GPU path when no CUDA kernel is compiled).
TRITON_OPS: frozenset[str] = frozenset()


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable-DETR), differentiable in value, locations and weights.

    Args:
        value: (N, S, M, D) with S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) int64 rows (H_l, W_l).
        level_start_index: (L,) int64, exclusive cumsum of H_l * W_l.
        sampling_locations: (N, Lq, M, L, P, 2) normalized (x, y); corners outside the map read 0.
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D) in value's dtype (float16 / bfloat16 accumulate in float32).
    """
    check_ms_deform_attn_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    backend = _backend.choose("ms_deform_attn", value.device, TRITON_OPS)
    if backend == "cpp":
        return torch.ops.dnops.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return reference.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
