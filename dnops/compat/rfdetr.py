"""Roboflow's RF-DETR (``pip install rfdetr``, LW-DETR's code) on dnops: ``use_dnops(model)``.

Every ``MSDeformAttn`` of a model built by rfdetr (the decoder's cross-attention, and the keypoint cross-attention
where a model has one) runs its own forward with this module's ``ms_deform_attn_core_pytorch``
(``dnops.ms_deform_attn``) in place of the package's grid_sample function, in training (rank-6 locations) and in
export mode (``model.export()``: levels and points folded, rank <= 5 for CoreML) alike. Parameters and state_dict
are unchanged; a routed model pickles, deep-copies, traces (``torch.jit.trace``) and exports (``torch.export``,
ONNX).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnops.compat._levels import level_start_index, level_tensors
from dnops.compat._rebind import calls_global, is_rebound, rebound_class
from dnops.ops.ms_deform_attn import ms_deform_attn

_FUNCTION = "ms_deform_attn_core_pytorch"


def ms_deform_attn_core_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    value_spatial_shapes_hw: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """rfdetr's ``ms_deform_attn_core_pytorch`` (``rfdetr/models/ops/functions/ms_deform_attn_func.py``) on
    dnops.ms_deform_attn.

    Args:
        value: (B, M, D, S), channel-major as rfdetr's MSDeformAttn hands it; read as the op's (B, S, M, D) through
            one copy per call (each decoder layer projects its own value, so there is nothing to share between layers).
        value_spatial_shapes: (L, 2) rows (H_l, W_l).
        sampling_locations: (B, Lq, M, L, P, 2) (training) or (B, Lq, M, L * P, 2) (export mode), level-major.
        attention_weights: (B, Lq, M, L * P), softmaxed over the L * P points.
        value_spatial_shapes_hw: the same sizes as Python ints (rfdetr passes them; then no level tensor is read).

    Returns:
        (B, Lq, M * D).
    """
    if value_spatial_shapes_hw is not None:
        shapes, starts = level_tensors(value_spatial_shapes_hw, value.device)
        levels = len(value_spatial_shapes_hw)
    else:
        shapes = value_spatial_shapes.to(device=value.device, dtype=torch.int64)
        starts, levels = level_start_index(shapes), shapes.shape[0]
    value = value.permute(0, 3, 1, 2).contiguous()
    if sampling_locations.dim() == 6:
        attention_weights = attention_weights.unflatten(3, sampling_locations.shape[3:5])
        return ms_deform_attn(value, shapes, starts, sampling_locations, attention_weights)
    points = [int(sampling_locations.shape[3]) // levels] * levels  # a model constant, also while tracing
    return ms_deform_attn(value, shapes, starts, sampling_locations, attention_weights, points_per_level=points)


def _on_dnops(original: object) -> object:
    return ms_deform_attn_core_pytorch


def recognise(module: nn.Module) -> str | None:
    """ "ms_deform_attn" for an rfdetr module whose forward calls the package's core function, else None."""
    if type(module).__module__.startswith("rfdetr.") and calls_global(type(module), _FUNCTION):
        return None if is_rebound(module) else "ms_deform_attn"
    return None


def use_dnops(model: nn.Module) -> int:
    """Routes a model built by rfdetr (``build_model_from_config``, or the ``model`` inside an ``RFDETR*`` wrapper's
    ``model.model``) to dnops, in place; returns how many modules were routed (0: none, or already routed)."""
    modules = [m for m in model.modules() if recognise(m) is not None]
    for module in modules:
        module.__class__ = rebound_class(type(module), _FUNCTION, _on_dnops)
    return len(modules)
