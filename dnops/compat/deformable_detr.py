"""Deformable-DETR's ``models/ops/functions/ms_deform_attn_func.py`` names."""

from __future__ import annotations

import torch

from dnops.compat._levels import level_start_index
from dnops.ops.ms_deform_attn import ms_deform_attn


class MSDeformAttnFunction:
    """``MSDeformAttnFunction.apply(value, value_spatial_shapes, value_level_start_index, sampling_locations,
    attention_weights, im2col_step)``: shapes as ``dnops.ms_deform_attn``; im2col_step is accepted and ignored
    (the kernels have no batch-chunking limit)."""

    @staticmethod
    def apply(
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int = 64,
    ) -> torch.Tensor:
        return ms_deform_attn(
            value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights
        )


def ms_deform_attn_core_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable-DETR's pure-PyTorch function signature (no level_start_index), on the dnops op.

    value (N, S, M, D), value_spatial_shapes (L, 2), sampling_locations (N, Lq, M, L, P, 2),
    attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D).
    """
    shapes = torch.as_tensor(value_spatial_shapes, dtype=torch.int64, device=value.device)
    return ms_deform_attn(value, shapes, level_start_index(shapes), sampling_locations, attention_weights)
