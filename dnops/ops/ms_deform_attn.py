from __future__ import annotations

from collections.abc import Callable

import torch

from dnops import _backend, reference
from dnops._autograd import register_ms_deform_attn
from dnops._constants import device_constant
from dnops.validation import (
    HALF_TYPES,
    SAMPLINGS,
    assert_levels_in_graph,
    check_ms_deform_attn_args,
    check_points_per_level,
)

# What an export writes instead of the standard-op graph, when an adapter sets one (dnops.compat.tensorrt's
# plugin_export): called with the op's six arguments. A slot the adapter fills, so that the op knows no adapter.
EXPORT_OVERRIDE: list[Callable[..., torch.Tensor]] = []

if _backend.HAS_C:

    @torch.library.register_fake("dnops::ms_deform_attn")
    def _(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        attention_logits=False,
        points_per_level=None,
        discrete=False,
    ):
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake("dnops::_ms_deform_attn_backward")
    def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *options):
        return (
            value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape),
        )

    register_ms_deform_attn("dnops::ms_deform_attn", "dnops::_ms_deform_attn_backward")


def _autocast_geometry(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast value keeps its dtype (a half-precision projection's output: the gathers move half the bytes)
    and only the geometry, sampling locations and weights, is cast to float32: in bfloat16 a location would be off
    by a third of a pixel on a 167-pixel-wide map. float32 / float64 stay as they are."""
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.dtype in HALF_TYPES else t for t in tensors)


def _register_autocast(device_type: str) -> None:
    """The registered op's autocast rule, the public function's: value as it is, the geometry in float32."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    op = torch.ops.dnops.ms_deform_attn.default

    def kernel(_keyset, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *options):
        geometry = _autocast_geometry(sampling_locations, attention_weights)
        with torch._C._ExcludeDispatchKeyGuard(keys):
            return op(value, spatial_shapes, level_start_index, *geometry, *options)

    _AUTOCAST_LIB.impl("ms_deform_attn", kernel, key, with_keyset=True)


if _backend.HAS_C:
    _AUTOCAST_LIB = torch.library.Library("dnops", "IMPL")
    for _device in ("cpu", "cuda"):
        _register_autocast(_device)


def as_int64_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 level tensors (often built by hand) as the int64 the kernels index with; other dtypes are left to the
    checks, which name the argument."""
    return tuple(
        t.long() if isinstance(t, torch.Tensor) and t.dtype == torch.int32 else t
        for t in (spatial_shapes, level_start_index)
    )


def _padding_index(points: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, max P) int64: the point each (level, slot) holds (a padding slot: its level's first point, whose weight is
    then zeroed), and (L, max P) bool: which slots hold one. Made once per counts and device (a tensor from host
    values is a blocking host-to-device copy); in the graph under torch.compile."""

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        most, first = max(points), [sum(points[:level]) for level in range(len(points))]
        index = [[f + (j if j < c else 0) for j in range(most)] for f, c in zip(first, points, strict=True)]
        valid = [[j < c for j in range(most)] for c in points]
        return torch.tensor(index, device=device), torch.tensor(valid, device=device)

    return device_constant("padding", points, device, build)


def _as_levels(
    points: list[int] | None,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    attention_logits: bool,
) -> tuple:
    """The op's six arguments in the (N, Lq, M, L, P, 2) / (N, Lq, M, L, P) layout of one count P = max_l P_l, for
    TensorRT's plugin, which knows one count: with ``points`` (unequal counts,
    (N, Lq, M, sum_l P_l) inputs) each level's points are padded to P with zero weights, which is exact (a padded
    point adds nothing, and a gradient for it is dropped). Logits are softmaxed over all sum_l P_l points first (in
    float32 for half weights), as the padding must not take part in the softmax."""
    if points is not None:
        if attention_logits:
            half = attention_weights.dtype in HALF_TYPES
            attention_weights = attention_weights.softmax(-1, dtype=torch.float32 if half else None)
            attention_weights = attention_weights.to(sampling_locations.dtype)
            attention_logits = False
        index, valid = _padding_index(tuple(points), sampling_locations.device)
        weights = attention_weights[:, :, :, index]
        sampling_locations = sampling_locations[:, :, :, index]
        attention_weights = torch.where(valid, weights, torch.zeros_like(weights))
    return value, spatial_shapes, level_start_index, sampling_locations, attention_weights, attention_logits


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    attention_logits: bool = False,
    *,
    points_per_level: list[int] | None = None,
    sampling: str = "bilinear",
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable-DETR), differentiable in value, locations and weights.

    Args:
        value: (N, S, M, D) with S = sum_l H_l * W_l; float16 / bfloat16 / float32 / float64.
        spatial_shapes: (L, 2) int64 rows (H_l, W_l); int32 is accepted and converted once.
        level_start_index: (L,) int64 (or int32), exclusive cumsum of H_l * W_l. Level values that disagree with
            each other or with S raise a ValueError naming the argument on the CPU; on a GPU they are not read (a
            read is a device sync per call) and a level that does not fit inside value reads zeros.
        sampling_locations: (N, Lq, M, L, P, 2) normalized (x, y); corners outside the map read 0. In value's dtype,
            or float32 with a float16 / bfloat16 value (the AMP pair: exact geometry, half the gathered bytes).
        attention_weights: (N, Lq, M, L, P), in sampling_locations' dtype.
        attention_logits: the weights are logits; the softmax over the L * P weights of each (query, head)
            runs inside the kernel (as DCNv4 fuses it), gradient included.
        points_per_level: a point count per level (P_0, ..., P_{L-1}), as RT-DETR v2, D-FINE and DEIM sample; then
            sampling_locations is (N, Lq, M, sum_l P_l, 2) and attention_weights (N, Lq, M, sum_l P_l), level-major
            (level 0's P_0 points first), and logits are softmaxed over all sum_l P_l. Counts that do not add up to
            the point axis, a count < 1, more than 16 levels or a list of the wrong length raise naming the argument.
            Every kernel walks each level's own points; an export writes each level's points padded to the
            largest count with zero weights (exact).
        sampling: "bilinear" (the definition above) or "discrete" (RT-DETR v2's ``method="discrete"``): each point
            reads the one pixel (clamp(floor(x * W_l + 0.5), 0, W_l - 1), clamp(floor(y * H_l + 0.5), 0, H_l - 1))
            with weight 1; gradients reach value and attention_weights; the locations leave the autograd graph, as
            the originals' integer rounding takes them (``reference.ms_deform_attn_points`` defines it).

    Returns:
        (N, Lq, M * D) in value's dtype (float16 / bfloat16 accumulate in float32); each gradient in its input's
        dtype. Under torch.autocast value keeps its dtype and only sampling_locations and attention_weights are
        cast to float32 (float64 stays float64), so a half-precision projection's value is gathered as it is. Exported
        (torch.export, torch.onnx.export) it becomes ``reference.ms_deform_attn_gather``'s standard ops, or, inside
        ``dnops.compat.tensorrt.plugin_export()``, TensorRT's plugin node.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"dnops.ms_deform_attn: sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if isinstance(value, torch.Tensor) and torch.is_autocast_enabled(value.device.type):
        sampling_locations, attention_weights = _autocast_geometry(sampling_locations, attention_weights)
    spatial_shapes, level_start_index = as_int64_levels(spatial_shapes, level_start_index)
    points = None
    if points_per_level is not None:
        points = check_points_per_level(points_per_level, spatial_shapes, sampling_locations, attention_weights)
    exporting = _backend.exporting()
    if not exporting and points is not None and all(c == points[0] for c in points):
        # one count: the (N, Lq, M, L, P) layout of the same memory, which every kernel takes (an export keeps the
        # caller's folded layout: its graph stays at the caller's rank)
        sampling_locations = sampling_locations.unflatten(3, (len(points), points[0]))
        attention_weights = attention_weights.unflatten(3, (len(points), points[0]))
        points = None
    check_ms_deform_attn_args(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points=points
    )
    discrete = sampling == "discrete"
    if discrete:
        # nothing reaches the locations through a nearest pixel: out of the graph, as the originals' integer
        # rounding takes them (a parameter reached only through them gets None, not zeros, as there)
        sampling_locations = sampling_locations.detach()
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, attention_logits)
    if exporting:
        if EXPORT_OVERRIDE and not discrete:
            return EXPORT_OVERRIDE[-1](*_as_levels(points, *args))
        # a graph of standard ops that reads the level sizes as data: correct for any spatial_shapes input
        return reference.ms_deform_attn_gather(*args, sampling=sampling, points_per_level=points)
    backend = _backend.choose("ms_deform_attn", value.device)
    if _backend.is_compiled(backend):
        return torch.ops.dnops.ms_deform_attn.default(*args, points, discrete)
    if backend == "triton":
        from dnops.triton.ms_deform_attn import ms_deform_attn_triton

        return ms_deform_attn_triton(*args, points, discrete)
    if torch.compiler.is_compiling():
        # the grid_sample definition splits value by the level sizes as Python numbers, which torch.compile can
        # only read as unbacked sizes (fullgraph fails on them); the gather formulation reads them as data
        assert_levels_in_graph(spatial_shapes, level_start_index, value.shape[1])
        return reference.ms_deform_attn_gather(*args, sampling=sampling, points_per_level=points)
    if points is None and not discrete:
        return reference.ms_deform_attn(*args)
    if points is None:
        points = [sampling_locations.shape[4]] * sampling_locations.shape[3]
        sampling_locations, attention_weights = sampling_locations.flatten(3, 4), attention_weights.flatten(3, 4)
    return reference.ms_deform_attn_points(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        points,
        attention_logits,
        sampling,
    )
