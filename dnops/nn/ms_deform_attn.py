from __future__ import annotations

import math

import torch
from torch import nn

from dnops.ops.ms_deform_attn import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Deformable-DETR's multi-scale deformable attention module on dnops kernels.

    Same constructor, parameter names (sampling_offsets, attention_weights, value_proj, output_proj),
    initialisation and forward signature as Deformable-DETR's ``MSDeformAttn``, so its checkpoints load
    unchanged. The softmax over the L * P attention weights runs inside the kernel (``attention_logits``).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        self.im2col_step = 64  # kept for code that reads it; the kernels need no im2col batching
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start on a ring of directions, one per head, the k-th point k steps out (Deformable-DETR).
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([angle.cos(), angle.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        ring = direction.view(self.n_heads, 1, 1, 2).expand(-1, self.n_levels, self.n_points, -1) * steps
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) normalized points, or (N, Lq, L, 4) boxes (cx, cy, w, h).
            input_flatten: (N, S, C), all levels flattened.
            input_spatial_shapes: (L, 2) int64 (H_l, W_l).
            input_level_start_index: (L,) int64.
            input_padding_mask: (N, S) bool, True on padding positions (their value is zeroed).

        Returns:
            (N, Lq, C).
        """
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        levels = input_spatial_shapes.shape[0]
        if levels != self.n_levels or reference_points.shape[2] != self.n_levels:
            raise ValueError(
                f"MSDeformAttn: built for n_levels={self.n_levels}, got input_spatial_shapes with {levels} levels and "
                f"reference_points of shape {tuple(reference_points.shape)} (N, Lq, n_levels, 2 or 4)"
            )
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        logits = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            wh = input_spatial_shapes.flip(-1).to(offsets.dtype)  # offsets are in pixels of each level
            locations = reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            scale = reference_points[:, :, None, :, None, 2:] * (0.5 / self.n_points)
            locations = reference_points[:, :, None, :, None, :2] + offsets * scale
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        out = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, locations, logits, attention_logits=True
        )
        return self.output_proj(out)
