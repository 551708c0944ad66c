"""HuggingFace transformers' deformable-attention models on dnops: ``use_dnops(model)``.

Deformable DETR, RT-DETR, Grounding DINO (and the other transformers models built the same way: MM Grounding
DINO, OmDet-Turbo, LW-DETR, ...) compute their deformable attention in a ``MultiScaleDeformableAttention``
submodule (grid_sample in PyTorch, or a kernel from the hub). ``use_dnops`` replaces each of them in a loaded
model with one that calls ``dnops.ms_deform_attn``: same inputs, same outputs, no parameters (so state_dicts are
unchanged). RT-DETR v2 computes its attention in a function instead (``multi_scale_deformable_attention_v2``,
with a point count per level and an optional "discrete" sampling): its modules keep their own path.
"""

from __future__ import annotations

import torch
from torch import nn

from dnops.ops.ms_deform_attn import ms_deform_attn


class MultiScaleDeformableAttention(nn.Module):
    """transformers' MultiScaleDeformableAttention interface on dnops kernels (any device, dtype and backend)."""

    def forward(
        self,
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int,
    ) -> torch.Tensor:
        """value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P) ->
        (N, Lq, M * D); value_spatial_shapes_list and im2col_step are accepted and not needed."""
        return ms_deform_attn(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)


def use_dnops(model: nn.Module) -> int:
    """Routes every transformers ``MultiScaleDeformableAttention`` submodule of ``model`` to dnops, in place;
    returns how many were replaced (0: the model has none, e.g. RT-DETR v2)."""
    swaps = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child).__name__ == "MultiScaleDeformableAttention"
        and type(child).__module__.startswith("transformers.")
        and not isinstance(child, MultiScaleDeformableAttention)
    ]
    for parent, name in swaps:
        setattr(parent, name, MultiScaleDeformableAttention())
    return len(swaps)
