from __future__ import annotations

from collections.abc import Callable

import torch

from dnops import _backend, reference
from dnops._autograd import register_ms_deform_attn
from dnops.validation import assert_levels_in_graph, check_ms_deform_attn_args

# What an export writes instead of the standard-op graph, when an adapter sets one (dnops.compat.tensorrt's
# plugin_export): called with the op's six arguments. A slot the adapter fills, so that the op knows no adapter.
EXPORT_OVERRIDE: list[Callable[..., torch.Tensor]] = []

if _backend.HAS_C:

    @torch.library.register_fake("dnops::ms_deform_attn")
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, attention_logits=False):
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake("dnops::_ms_deform_attn_backward")
    def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, logits=False):
        return (
            value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape),
        )

    register_ms_deform_attn("dnops::ms_deform_attn", "dnops::_ms_deform_attn_backward")

    # Under autocast the op runs in float32, as grid_sample does: sampling locations in bfloat16 would be off by
    # a third of a pixel on a 167-pixel-wide map.
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast("dnops::ms_deform_attn", _device, torch.float32)


def _autocast_float32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast every backend runs in float32, as the compiled op's registered autocast rule does: the inputs
    come in mixed dtypes there (value from a half-precision projection, locations and softmax in float32), and
    the checks below would otherwise reject them before that rule applies. float64 stays float64, as autocast
    leaves it."""
    return tuple(
        t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def as_int64_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 level tensors (often built by hand) as the int64 the kernels index with; other dtypes are left to the
    checks, which name the argument."""
    return tuple(
        t.long() if isinstance(t, torch.Tensor) and t.dtype == torch.int32 else t
        for t in (spatial_shapes, level_start_index)
    )


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    attention_logits: bool = False,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable-DETR), differentiable in value, locations and weights.

    Args:
        value: (N, S, M, D) with S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) int64 rows (H_l, W_l); int32 is accepted and converted once.
        level_start_index: (L,) int64 (or int32), exclusive cumsum of H_l * W_l.
        sampling_locations: (N, Lq, M, L, P, 2) normalized (x, y); corners outside the map read 0.
        attention_weights: (N, Lq, M, L, P).
        attention_logits: the weights are logits; the softmax over the L * P weights of each (query, head)
            runs inside the kernel (as DCNv4 fuses it), gradient included.

    Returns:
        (N, Lq, M * D) in value's dtype (float16 / bfloat16 accumulate in float32); under torch.autocast the
        floating inputs are cast to float32 and so is the output, whatever the autocast dtype. Exported
        (torch.export, torch.onnx.export) it becomes ``reference.ms_deform_attn_gather``'s standard ops, or, inside
        ``dnops.compat.tensorrt.plugin_export()``, TensorRT's plugin node.
    """
    if isinstance(value, torch.Tensor) and torch.is_autocast_enabled(value.device.type):
        value, sampling_locations, attention_weights = _autocast_float32(value, sampling_locations, attention_weights)
    spatial_shapes, level_start_index = as_int64_levels(spatial_shapes, level_start_index)
    check_ms_deform_attn_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, attention_logits)
    if _backend.exporting():
        if EXPORT_OVERRIDE:
            return EXPORT_OVERRIDE[-1](*args)
        # a graph of standard ops that reads the level sizes as data: correct for any spatial_shapes input
        return reference.ms_deform_attn_gather(*args)
    backend = _backend.choose("ms_deform_attn", value.device)
    if _backend.is_compiled(backend):
        return torch.ops.dnops.ms_deform_attn.default(*args)
    if backend == "triton":
        from dnops.triton.ms_deform_attn import ms_deform_attn_triton

        return ms_deform_attn_triton(*args)
    if torch.compiler.is_compiling():
        # the grid_sample definition splits value by the level sizes as Python numbers, which torch.compile can
        # only read as unbacked sizes (fullgraph fails on them); the gather formulation reads them as data
        assert_levels_in_graph(spatial_shapes, level_start_index, value.shape[1])
        return reference.ms_deform_attn_gather(*args)
    return reference.ms_deform_attn(*args)
