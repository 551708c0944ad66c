"""mmcv's multi-scale deformable attention (``mmcv/ops/multi_scale_deform_attn.py``, mmcv 2.x) on dnops: its
pure-PyTorch function's name, its compiled ``_ext`` interface, and its ``MultiScaleDeformableAttention`` module.

An mmcv without a compiled ``_ext`` (mmcv-lite, a failed build: "No module named 'mmcv._ext'"), or with one that
lacks the op for the device ("ms_deform_attn_impl_forward: implementation for device cuda:0 not found"), runs its
own module and Function on dnops after ``dnops.compat.provide("mmcv._ext")`` (before ``mmcv.ops`` is imported, or
after: the imported module is pointed at dnops), or after ``python -m dnops.compat.multi_scale_deformable_attention
install --name mmcv._ext`` when there is no compiled ``_ext`` at all.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from dnops.compat import multi_scale_deformable_attention as _ddetr
from dnops.compat._levels import level_start_index as _level_start_index
from dnops.compat.deformable_detr import ms_deform_attn_core_pytorch
from dnops.ops.ms_deform_attn import ms_deform_attn


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


def ms_deform_attn_forward(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    value_level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    im2col_step: int = 64,
) -> torch.Tensor:
    """``ext_module.ms_deform_attn_forward`` as mmcv's Function calls it (im2col_step by keyword; locations and
    weights already cast to value's dtype): (bs, num_queries, embed_dims), no autograd graph."""
    return _ddetr.ms_deform_attn_forward(
        value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights, im2col_step
    )


def ms_deform_attn_backward(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    value_level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
    grad_value: torch.Tensor,
    grad_sampling_loc: torch.Tensor,
    grad_attn_weight: torch.Tensor,
    im2col_step: int = 64,
) -> None:
    """``ext_module.ms_deform_attn_backward``: adds the gradients into the buffers the caller passes (mmcv's Function
    passes zeros shaped as value, sampling_locations and attention_weights), as the compiled kernel accumulates."""
    grads = _ddetr.ms_deform_attn_backward(
        value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights, grad_output, 0
    )
    for buffer, grad in zip((grad_value, grad_sampling_loc, grad_attn_weight), grads, strict=True):
        buffer.add_(grad)


class MultiScaleDeformableAttention(nn.Module):
    """mmcv's ``MultiScaleDeformableAttention``: the same constructor, attributes, state_dict keys, initialisation and
    ``forward``, on dnops' op on every device (mmcv's takes its compiled op on CUDA and grid_sample elsewhere), and
    without the original's host read (its assert that the levels add up to ``num_value``; dnops checks the levels on
    the device). A plain ``nn.Module``: ``init_cfg`` and ``norm_cfg`` are kept as attributes, unused as in mmcv.

    query (num_query, bs, embed_dims), or (bs, num_query, embed_dims) with ``batch_first``; value likewise with
    num_value = sum of the levels' H * W; reference_points (bs, num_query, num_levels, 2 or 4); spatial_shapes
    (num_levels, 2) as (H, W); level_start_index (num_levels,) -> query's layout."""

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
        norm_cfg: dict | None = None,
        init_cfg: dict | None = None,
        value_proj_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f"embed_dims must be divisible by num_heads, but got {embed_dims} and {num_heads}")
        self.init_cfg = init_cfg
        self.norm_cfg = norm_cfg
        self.dropout = nn.Dropout(dropout)
        self.batch_first = batch_first
        self.im2col_step = im2col_step
        self.embed_dims = embed_dims
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        value_proj_size = int(embed_dims * value_proj_ratio)
        self.value_proj = nn.Linear(embed_dims, value_proj_size)
        self.output_proj = nn.Linear(value_proj_size, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's initialisation: zero offsets whose biases point each head along its own direction (scaled by the
        point's index), zero attention logits, Xavier-uniform projections with zero biases."""
        nn.init.zeros_(self.sampling_offsets.weight)
        device = self.sampling_offsets.weight.device
        thetas = torch.arange(self.num_heads, dtype=torch.float32, device=device) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32, device=device).view(1, 1, -1, 1)
        self.sampling_offsets.bias.data = grid.view(-1)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        self._is_init = True

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        identity: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        reference_points: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        level_start_index: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """mmcv's forward: ``dropout(output_proj(attention)) + identity`` (identity defaults to query; ``residual``
        is its deprecated name, as in mmcv); key is unused. key_padding_mask (bs, num_value), True = padding."""
        if "residual" in kwargs:
            warnings.warn(
                "method MultiScaleDeformableAttention.forward: the argument residual is deprecated, use identity",
                DeprecationWarning,
                stacklevel=2,
            )
            identity = kwargs.pop("residual")
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        num_value = value.shape[1]
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, self.num_heads, -1)
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(bs, num_query, heads, levels, points, 2)
        weights = self.attention_weights(query).view(bs, num_query, heads, levels * points).softmax(-1)
        weights = weights.view(bs, num_query, heads, levels, points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            boxes = reference_points[:, :, None, :, None]
            locations = boxes[..., :2] + offsets / points * boxes[..., 2:] * 0.5
        else:
            raise ValueError(
                f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} instead."
            )
        if level_start_index is None:
            level_start_index = _level_start_index(spatial_shapes)
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity
