"""The interface of the compiled ``MultiScaleDeformableAttention`` extension that Deformable-DETR, DINO, DN-DETR
and their descendants build and import (``import MultiScaleDeformableAttention as MSDA``), on dnops kernels:
every device and dtype dnops runs, no CUDA build of the original.

Use it with no edit to a model file: ``python -m dnops.compat.multi_scale_deformable_attention install`` puts a
small ``MultiScaleDeformableAttention`` module into site-packages that gives these functions (``uninstall`` removes
it; ``--target DIR`` writes it elsewhere; ``--name groundingdino._C`` and the other names codebases import:
dnops.compat.extensions). Or, in code: ``dnops.compat.provide("MultiScaleDeformableAttention")`` before the model
is imported.
"""

from __future__ import annotations

import sys

import torch

from dnops import _backend
from dnops.ops.ms_deform_attn import as_int64_levels, ms_deform_attn
from dnops.validation import geometry_fits


def ms_deform_attn_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_loc: torch.Tensor,
    attn_weight: torch.Tensor,
    im2col_step: int,
) -> torch.Tensor:
    """(N, Lq, M * D) from value (N, S, M, D), sampling_loc (N, Lq, M, L, P, 2), attn_weight (N, Lq, M, L, P);
    im2col_step is accepted and ignored (the kernels have no batch-chunking limit). No autograd graph: the
    caller's autograd Function calls ms_deform_attn_backward, as with the original.

    As dnops' op: a float16 / bfloat16 value with float32 locations and weights (the AMP pair) runs as it is, and
    under autocast only the locations and weights are cast to float32; the output has value's dtype. Other mixes of
    floating dtypes (DINO's half-precision branch passes float32 value and locations with float16 weights) compute
    in float32 (float64 if one is float64) and return value's dtype."""
    mixed = _common_dtype(value, sampling_loc, attn_weight)
    with torch.no_grad():
        if mixed is None or torch.is_autocast_enabled(value.device.type):
            return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_loc, attn_weight)
        args = (value.to(mixed), spatial_shapes, level_start_index, sampling_loc.to(mixed), attn_weight.to(mixed))
        return ms_deform_attn(*args).to(value.dtype)


def _common_dtype(value: torch.Tensor, *geometry: torch.Tensor) -> torch.dtype | None:
    """The dtype mixed floating inputs compute in (None when the kernels take them as they are: one dtype, or a half
    value with float32 locations and weights): float64 if one is, else float32."""
    kinds = {t.dtype for t in geometry}
    if len(kinds) == 1 and geometry_fits(value.dtype, geometry[0].dtype):
        return None
    return torch.float64 if torch.float64 in kinds | {value.dtype} else torch.float32


def ms_deform_attn_backward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_loc: torch.Tensor,
    attn_weight: torch.Tensor,
    grad_output: torch.Tensor,
    im2col_step: int,
) -> list[torch.Tensor]:
    """[grad_value, grad_sampling_loc, grad_attn_weight], shaped as value, sampling_loc and attn_weight and in their
    dtypes. Autograd runs it outside autocast, where a forward under autocast leaves the AMP pair (value from a
    half-precision projection, locations and weights in float32), which the kernels take as it is; other mixes
    compute in float32, as the forward did."""
    mixed = _common_dtype(value, sampling_loc, attn_weight)
    if mixed is not None:
        cast = [t.to(mixed) for t in (value, sampling_loc, attn_weight)]
        grads = ms_deform_attn_backward(cast[0], spatial_shapes, level_start_index, *cast[1:], grad_output, im2col_step)
        return [g.to(t.dtype) for g, t in zip(grads, (value, sampling_loc, attn_weight), strict=True)]
    grad_output = grad_output.to(value.dtype)
    spatial_shapes, level_start_index = as_int64_levels(spatial_shapes, level_start_index)  # int32, as the forward
    args = (value, spatial_shapes, level_start_index, sampling_loc, attn_weight)
    if _backend.is_compiled(_backend.choose("ms_deform_attn", value.device)):
        grads = torch.ops.dnops._ms_deform_attn_backward.default(grad_output.contiguous(), *args, False)
        return list(grads)
    # elsewhere (another backend, a device without dnops kernels): the gradients of the public op
    if torch.compiler.is_compiling():
        # Dynamo cannot trace torch.autograd.grad inside a traced backward; it traces torch.func.vjp
        _, vjp = torch.func.vjp(
            lambda v, loc, w: ms_deform_attn(v, spatial_shapes, level_start_index, loc, w),
            value,
            sampling_loc,
            attn_weight,
        )
        return list(vjp(grad_output))
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (value, sampling_loc, attn_weight)]
        out = ms_deform_attn(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
        return list(torch.autograd.grad(out, inputs, grad_output))


if __name__ == "__main__":
    from dnops.compat.extensions import main

    sys.exit(main())
