"""Argument checks shared by every backend, so a bad call fails the same way whichever kernel would run.

Checks read only metadata, plus tensor values when those live on the CPU (reading them is free there and
would cost a device sync elsewhere).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_TYPES = (torch.float16, torch.bfloat16)


def geometry_fits(value_dtype: torch.dtype, geometry_dtype: torch.dtype) -> bool:
    """Whether the deformable-attention kernels take locations and weights of ``geometry_dtype`` with a value of
    ``value_dtype`` as they are: value's own dtype, or float32 with a half-precision value (the AMP pair)."""
    return geometry_dtype == value_dtype or (value_dtype in HALF_TYPES and geometry_dtype == torch.float32)


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"dnops.{op}: {msg}")


def structure_int(value: object, name: str, op: str) -> int:
    """``value`` (pad_size, group_size, num_queries) as a Python int: an int, a numpy integer, a float with an
    integral value or an integral 0-dim tensor; a SymInt (torch.compile's dynamic size) stays one."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    _fail(op, f"{name} must be an integer, got {value!r} ({type(value).__name__})")


def check_dn_structure(pad_size: int, group_size: int, num_queries: int, op: str = "dn_attn_mask") -> None:
    if pad_size < 0:
        _fail(op, f"pad_size must be >= 0, got {pad_size}")
    if num_queries < 0:
        _fail(op, f"num_queries must be >= 0, got {num_queries}")
    if pad_size > 0 and group_size <= 0:
        _fail(op, f"group_size must be > 0 when pad_size > 0, got {group_size}")
    if pad_size > 0 and pad_size % group_size:
        _fail(op, f"pad_size ({pad_size}) must be a multiple of group_size ({group_size})")


def check_ms_deform_attn_args(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    values_when_compiling: bool = False,
    points: list[int] | None = None,
) -> None:
    """``values_when_compiling``: check spatial_shapes / level_start_index values under torch.compile too, for
    callers that read them anyway (the reference splits value by them, a graph break either way). ``points``: the
    counts check_points_per_level returned, for locations (N, Lq, M, sum_l P_l, 2) it has checked against them."""
    op = "ms_deform_attn"
    named = {
        "value": (value, 4, "(N, S, M, D)"),
        "spatial_shapes": (spatial_shapes, 2, "(L, 2)"),
        "level_start_index": (level_start_index, 1, "(L,)"),
        "sampling_locations": (sampling_locations, 6, "(N, Lq, M, L, P, 2)")
        if points is None
        else (sampling_locations, 5, "(N, Lq, M, sum_l P_l, 2)"),
        "attention_weights": (attention_weights, 5, "(N, Lq, M, L, P)")
        if points is None
        else (attention_weights, 4, "(N, Lq, M, sum_l P_l)"),
    }
    for name, (t, rank, shape) in named.items():
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            _fail(op, f"{name} must have rank {rank} {shape}, got shape {tuple(t.shape)}")
    if value.dtype not in FLOAT_TYPES:
        _fail(op, f"value must be float16/bfloat16/float32/float64, got {value.dtype}")
    geometry = sampling_locations.dtype
    if not geometry_fits(value.dtype, geometry):
        allowed = f"{value.dtype} or torch.float32" if value.dtype in HALF_TYPES else f"{value.dtype}"
        _fail(op, f"sampling_locations has dtype {geometry} but value has {value.dtype} (allowed: {allowed})")
    if attention_weights.dtype != geometry:
        _fail(op, f"attention_weights has dtype {attention_weights.dtype} but sampling_locations has {geometry}")
    for name in ("spatial_shapes", "level_start_index"):
        if named[name][0].dtype != torch.int64:
            _fail(op, f"{name} must be int64, got {named[name][0].dtype}")
    for name, (t, _, _) in named.items():
        if t.device != value.device:
            _fail(op, f"{name} is on {t.device} but value is on {value.device}")
    n, s, m, _ = value.shape
    nl = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2 or nl < 1:
        _fail(op, f"spatial_shapes must be (L, 2) with L >= 1, got {tuple(spatial_shapes.shape)}")
    if level_start_index.shape[0] != nl:
        _fail(op, f"level_start_index has {level_start_index.shape[0]} levels but spatial_shapes has {nl}")
    loc = sampling_locations.shape
    if points is not None:
        if loc[0] != n or loc[2] != m:
            _fail(op, f"sampling_locations must be (N={n}, Lq, M={m}, sum_l P_l={sum(points)}, 2), got {tuple(loc)}")
    elif loc[0] != n or loc[2] != m or loc[3] != nl or loc[5] != 2 or loc[4] < 1:
        _fail(op, f"sampling_locations must be (N={n}, Lq, M={m}, L={nl}, P>=1, 2), got {tuple(loc)}")
    elif tuple(attention_weights.shape) != tuple(loc[:5]):
        _fail(op, f"attention_weights must be {tuple(loc[:5])}, got {tuple(attention_weights.shape)}")
    # Level values are read where that is free: on the CPU. Off it a read is a device sync on every call (callers
    # build a new level tensor per forward); there every kernel skips a level that does not fit inside value
    # (csrc's level_fits), so a wrong level reads zeros, never memory outside value.
    if spatial_shapes.device.type == "cpu" and (values_when_compiling or not torch.compiler.is_compiling()):
        _check_levels(spatial_shapes, level_start_index, s)


SAMPLINGS = ("bilinear", "discrete")
# csrc's PointLayout::kMaxLevels: the GPU kernels get the per-level counts by value
MAX_POINT_LEVELS = 16


def check_points_per_level(
    points_per_level: object,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> list[int]:
    """``points_per_level`` as a list of ints, one count >= 1 per level of spatial_shapes, adding up to the point
    axis of sampling_locations (N, Lq, M, sum_l P_l, 2) and attention_weights (N, Lq, M, sum_l P_l)."""
    op = "ms_deform_attn"
    if isinstance(points_per_level, torch.Tensor) and points_per_level.dim() == 1:
        points_per_level = points_per_level.tolist()
    if isinstance(points_per_level, str | bytes) or not isinstance(points_per_level, Sequence):
        _fail(op, f"points_per_level must be a sequence of ints, got {type(points_per_level).__name__}")
    if any(isinstance(c, bool) or not isinstance(c, numbers.Integral | torch.SymInt) for c in points_per_level):
        _fail(op, f"points_per_level must be a sequence of ints, got {list(points_per_level)}")
    points = [c if isinstance(c, torch.SymInt) else int(c) for c in points_per_level]
    levels = spatial_shapes.shape[0] if isinstance(spatial_shapes, torch.Tensor) and spatial_shapes.dim() == 2 else None
    if levels is not None and len(points) != levels:
        _fail(op, f"points_per_level has {len(points)} counts but spatial_shapes has {levels} levels")
    if not points or any(c < 1 for c in points):
        _fail(op, f"points_per_level must hold one count >= 1 per level, got {points}")
    if len(points) > MAX_POINT_LEVELS:
        _fail(op, f"points_per_level takes at most {MAX_POINT_LEVELS} levels, got {len(points)}")
    for name, t, rank, shape in (
        ("sampling_locations", sampling_locations, 5, "(N, Lq, M, sum_l P_l, 2)"),
        ("attention_weights", attention_weights, 4, "(N, Lq, M, sum_l P_l)"),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            _fail(op, f"{name} must have rank {rank} {shape} with points_per_level, got shape {tuple(t.shape)}")
    total = sum(points)
    if sampling_locations.shape[3] != total or sampling_locations.shape[4] != 2:
        _fail(
            op,
            f"sampling_locations must be (N, Lq, M, sum_l P_l = {total}, 2) for points_per_level {points}, got "
            f"{tuple(sampling_locations.shape)}",
        )
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:4]):
        _fail(
            op, f"attention_weights must be {tuple(sampling_locations.shape[:4])}, got {tuple(attention_weights.shape)}"
        )
    return points


def assert_levels_in_graph(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, s: int) -> None:
    """The level checks as asserts inside a compiled graph (torch.compile, where reading the values on the host
    would break the graph): a violation raises a RuntimeError naming the argument when the compiled code runs.
    Unlike the host check, an H * W product that overflows int64 is not caught here (the gather then fails on
    its out-of-range index)."""
    sizes = spatial_shapes.prod(1)
    torch._assert_async((spatial_shapes >= 1).all(), "ms_deform_attn: spatial_shapes must be positive")
    torch._assert_async(
        (level_start_index == sizes.cumsum(0) - sizes).all(),
        "ms_deform_attn: level_start_index != exclusive cumsum of spatial_shapes",
    )
    torch._assert_async(sizes.sum() == s, "ms_deform_attn: spatial_shapes do not cover the S positions of value")


def _check_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, s: int) -> None:
    op = "ms_deform_attn"
    # Python ints: exact, where an int64 product H * W could overflow and pass a sum check
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(x) for x in level_start_index.tolist()]
    total = 0
    for level, ((h, w), start) in enumerate(zip(shapes, starts, strict=True)):
        if h < 1 or w < 1:
            _fail(op, f"spatial_shapes must be positive, got spatial_shapes[{level}] = ({h}, {w})")
        if start != total:
            _fail(op, f"level_start_index {starts} != exclusive cumsum of spatial_shapes at level {level}")
        total += h * w
        if total > s:
            _fail(op, f"spatial_shapes cover more than the S={s} positions of value (levels 0..{level}: {total})")
    if total != s:
        _fail(op, f"spatial_shapes cover {total} positions but value has S={s}")


def check_dn_self_attention_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_size: int, group_size: int
) -> None:
    op = "dn_self_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            _fail(op, f"{name} must be (B, H, W, Dh), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_TYPES:
            _fail(op, f"{name} must be a floating tensor, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            _fail(op, f"q, k, v must share dtype and device, got {q.dtype}/{q.device} and {t.dtype}/{t.device}")
    if k.shape != q.shape or v.shape != q.shape:
        _fail(
            op, f"q, k, v must share one (B, H, W, Dh) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[3] < 1:
        _fail(op, f"q, k, v must have a head dimension Dh >= 1, got shape {tuple(q.shape)}")
    width = q.shape[2]
    if pad_size > width:
        _fail(op, f"pad_size ({pad_size}) exceeds the sequence length W={width}")
    check_dn_structure(pad_size, group_size, width - pad_size, op)


def check_counts(counts: object) -> list[int]:
    """``counts`` as a list of Python ints: a 1-D integer tensor or a sequence of ints (no floats, no nesting)."""
    op = "dn_queries"
    if type(counts) in (list, tuple) and all(type(c) is int for c in counts):
        return list(counts)  # the common case, without the abstract-class checks (~1 us each) below
    if torch.compiler.is_compiling() and isinstance(counts, list | tuple):
        # under torch.compile the counts of a dynamic batch are SymInts: kept symbolic, int() would specialize them
        if all(isinstance(c, int | torch.SymInt) and not isinstance(c, bool) for c in counts):
            return list(counts)
    if isinstance(counts, torch.Tensor):
        if counts.dim() != 1 or counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
            _fail(op, f"counts must be a 1-D integer tensor, got {counts.dtype} of shape {tuple(counts.shape)}")
        return [int(c) for c in counts.tolist()]
    if isinstance(counts, str | bytes) or not isinstance(counts, Sequence):
        _fail(op, f"counts must be a 1-D sequence of ints, got {type(counts).__name__}")
    bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
    if bad:
        _fail(op, f"counts must be a 1-D sequence of ints, got {bad[0]!r} ({type(bad[0]).__name__}) in {list(counts)}")
    return [int(c) for c in counts]


def check_dn_queries_args(
    labels: torch.Tensor, boxes: torch.Tensor, counts: Sequence[int], num_classes: int, check_values: bool = True
) -> None:
    """``check_values=False`` skips the label range and box finiteness checks (the C++ kernel makes them while it
    reads the inputs)."""
    op = "dn_queries"
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
        _fail(
            op,
            f"labels must be a (K,) int64 tensor, got {getattr(labels, 'dtype', type(labels))} "
            f"of shape {tuple(getattr(labels, 'shape', ()))}",
        )
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        _fail(op, f"boxes must be a (K, 4) tensor, got shape {tuple(getattr(boxes, 'shape', ()))}")
    if boxes.dtype not in FLOAT_TYPES:
        _fail(op, f"boxes must be a floating tensor, got {boxes.dtype}")
    if boxes.device != labels.device:
        _fail(op, f"boxes are on {boxes.device} but labels on {labels.device}")
    if boxes.shape[0] != labels.shape[0]:
        _fail(op, f"labels ({labels.shape[0]}) and boxes ({boxes.shape[0]}) must have one row per GT")
    if any(c < 0 for c in counts):
        _fail(op, f"counts must be >= 0, got {list(counts)}")
    if sum(counts) != labels.shape[0]:
        _fail(op, f"counts sum to {sum(counts)} but there are {labels.shape[0]} GT rows")
    if num_classes < 1:
        _fail(op, f"num_classes must be >= 1, got {num_classes}")
    if check_values and labels.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_gt_values(labels, boxes, num_classes)


def _check_gt_values(labels: torch.Tensor, boxes: torch.Tensor, num_classes: int) -> None:
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            _fail("dn_queries", f"labels must be in [0, num_classes={num_classes}), got values in [{lo}, {hi}]")
        # one rule for every backend: a NaN or infinite box is a data error (on a GPU, where reading the values
        # would cost a sync, its slots come out non-finite instead)
        if not bool(torch.isfinite(boxes).all()):
            _fail("dn_queries", "boxes must be finite, got NaN or infinite values")


@torch.library.custom_op("dnops::_checked_gt_labels", mutates_args=())
def _checked_gt_labels(labels: torch.Tensor, boxes: torch.Tensor, num_classes: int) -> torch.Tensor:
    _check_gt_values(labels, boxes, num_classes)
    return labels.clone()


@_checked_gt_labels.register_fake
def _(labels, boxes, num_classes):
    return torch.empty_like(labels)


def checked_gt_labels(labels: torch.Tensor, boxes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``labels``, whose values (and the boxes') check_dn_queries_args checks on the host in eager mode, checked
    inside a torch.compile graph too (CPU tensors): a copy that the generation then reads, so the check runs before
    any kernel indexes with a label, and raises eager's error. Inductor's own bounds checks would raise an error
    naming nothing, or abort the process from a parallel region."""
    if labels.device.type == "cpu" and torch.compiler.is_compiling():
        return torch.ops.dnops._checked_gt_labels(labels, boxes, num_classes)
    return labels
