"""Multi-scale deformable attention in Triton: the same per-sample math as csrc/ms_deform_attn (grid_sample's
align_corners=False convention, zero padding, optional in-kernel softmax of the weights).

What bounds it at enc800 (N=1, S=Lq=22,223, M=8, D=32, L=P=4) on an H200: the same bytes as the CUDA kernel
(80 MB of HBM traffic forward, 19 us at 4.3 TB/s; 1.46 GB of L2 gathers, ~150 us); each program gathers a
[rows, D] tile per corner, so loads are as wide as D's contiguous channels. The backward adds one float atomic
per channel and corner (364 M), which should bound it; its programs own one sample each.
"""

from __future__ import annotations

import itertools
import os
import warnings

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dnops._autograd import register_ms_deform_attn
from dnops._constants import device_constant

BLOCK_R = 16  # rows per backward program, and per forward program in the interpreter


def _tiles(d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(forward rows, forward channels, backward channels) per program; the backward takes BLOCK_R rows.

    Compiled, a forward program (Triton's default 4 warps) keeps about 2048 gathered elements in flight: 64 rows of
    DN-DETR's 32-channel heads. When D is not a multiple of 16 every element needs its own address (the loads are
    not vectorized), and 2048 elements spill (255 registers and 0.5-8 KB of stack at D = 30, 71, 257 on sm_90), so
    such programs take 512 elements and at most 32 channels (126 registers); float64 halves both. Set per channel
    width rather than autotuned: every autotuned configuration is one more compilation per shape and dtype.
    tests/gpu_compile.py holds them to no spills."""
    aligned = d % 16 == 0
    wide = 2 if dtype == torch.float64 else 1
    block_d = min(triton.next_power_of_2(d), (128 if aligned else 32) // wide)
    bwd_d = min(triton.next_power_of_2(d), (64 if aligned else 32) // wide)
    if interpreted():
        return BLOCK_R, block_d, bwd_d
    return max(16, min(128, (2048 if aligned else 512) // wide // block_d)), block_d, bwd_d


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (the tile sizes are the compiled kernels' otherwise, also
    when tests/gpu_compile.py compiles them for a GPU from CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _softmax_stats(w_ptr, rows, rmask, LP, ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    mx = tl.full([BLOCK_R], float("-inf"), ACC)
    for i in range(LP):
        mx = tl.maximum(mx, tl.load(w_ptr + rows * LP + i, mask=rmask, other=0).to(ACC))
    total = tl.zeros([BLOCK_R], ACC)
    for i in range(LP):
        total += tl.exp(tl.load(w_ptr + rows * LP + i, mask=rmask, other=0).to(ACC) - mx)
    return mx, total


@triton.jit
def _sample(
    loc_ptr,
    w_ptr,
    shapes_ptr,
    starts_ptr,
    rows,
    rmask,
    i,
    level,
    LP,
    M,
    D,
    S,
    Lq,
    mx,
    total,
    LOGITS: tl.constexpr,
    DISCRETE: tl.constexpr,
    ACC: tl.constexpr,
):
    """Corner geometry of sample i (in level ``level``) of each row: base offsets, pixel coordinates, map size,
    weight. Discrete sampling gives the nearest pixel's coordinates, whose corner 0 then has bilinear weight 1."""
    height = tl.load(shapes_ptr + 2 * level)
    width = tl.load(shapes_ptr + 2 * level + 1)
    start = tl.load(starts_ptr + level)
    lx = tl.load(loc_ptr + (rows * LP + i) * 2, mask=rmask, other=0).to(ACC)
    ly = tl.load(loc_ptr + (rows * LP + i) * 2 + 1, mask=rmask, other=0).to(ACC)
    a = tl.load(w_ptr + rows * LP + i, mask=rmask, other=0).to(ACC)
    if LOGITS:
        a = tl.exp(a - mx) / total
    if DISCRETE:
        # csrc's nearest_pixel: NaN reads as -1, locations clamp to [-1, 2], pixels to the map
        lx = tl.minimum(tl.maximum(tl.where(lx != lx, -1.0, lx), -1.0), 2.0)
        ly = tl.minimum(tl.maximum(tl.where(ly != ly, -1.0, ly), -1.0), 2.0)
        x = tl.minimum(tl.maximum(tl.floor(lx * width.to(ACC) + 0.5), 0.0), (width - 1).to(ACC))
        y = tl.minimum(tl.maximum(tl.floor(ly * height.to(ACC) + 0.5), 0.0), (height - 1).to(ACC))
    else:
        x = lx * width.to(ACC) - 0.5
        y = ly * height.to(ACC) - 0.5
    # the level must lie inside value (csrc's level_fits): shapes on the GPU are not checked on the host
    room = S - start
    fits = (height >= 1) & (width >= 1) & (start >= 0) & (room >= 0) & (height <= room)
    fits = fits & (width <= room // tl.maximum(height, 1))
    # (fits != 0): in the interpreter a scalar of mixed int32 / int64 comparisons is not a bool numpy takes in `&`
    inside = (x >= -1) & (y >= -1) & (x < width.to(ACC)) & (y < height.to(ACC)) & rmask & (fits != 0)
    x = tl.where(inside, x, 0.0)
    y = tl.where(inside, y, 0.0)
    m = rows % M
    n = rows // (M * Lq)
    base = ((n * S + start) * M + m) * D
    return base, x, y, height, width, inside, a


@triton.jit
def _corner(x, y, dx: tl.constexpr, dy: tl.constexpr, height, width, inside, M, D):
    """Row offset (elements), bilinear weight, its x / y derivatives and validity of one corner."""
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    fx = x - x0
    fy = y - y0
    xi = x0.to(tl.int64) + dx
    yi = y0.to(tl.int64) + dy
    wx = fx if dx == 1 else 1 - fx
    wy = fy if dy == 1 else 1 - fy
    sx = 1.0 if dx == 1 else -1.0
    sy = 1.0 if dy == 1 else -1.0
    valid = inside & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    # every load and atomic of an invalid corner is masked, so its offset is never dereferenced (selecting 0 here
    # made Triton 3.6's layout pass fail at D = 32 and 64)
    return (yi * width + xi) * M * D, wx * wy, sx * wy, sy * wx, valid


@triton.jit
def _level_points(points_ptr, level, P, PER_LEVEL: tl.constexpr):
    """The points [first, last) of a row that sample ``level``: level * P on, or the per-level table's entries."""
    if PER_LEVEL:
        first = tl.load(points_ptr + level)
        last = tl.load(points_ptr + level + 1)
    else:
        first = level * P
        last = first + P
    return first, last


@triton.jit
def _fwd_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    points_ptr,
    loc_ptr,
    w_ptr,
    out_ptr,
    S,
    M,
    D,
    Lq,
    L,
    P,
    LP,
    R,
    LOGITS: tl.constexpr,
    PER_LEVEL: tl.constexpr,
    DISCRETE: tl.constexpr,
    CORNERS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ds = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    dmask = ds < D
    mx = tl.zeros([BLOCK_R], ACC)
    total = tl.full([BLOCK_R], 1.0, ACC)
    if LOGITS:
        mx, total = _softmax_stats(w_ptr, rows, rmask, LP, ACC, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    for level in range(L):
        first, last = _level_points(points_ptr, level, P, PER_LEVEL)
        for i in range(first, last):
            base, x, y, height, width, inside, a = _sample(
                loc_ptr,
                w_ptr,
                shapes_ptr,
                starts_ptr,
                rows,
                rmask,
                i,
                level,
                LP,
                M,
                D,
                S,
                Lq,
                mx,
                total,
                LOGITS,
                DISCRETE,
                ACC,
            )
            for corner in tl.static_range(CORNERS):
                offset, cw, _, _, valid = _corner(x, y, corner % 2, corner // 2, height, width, inside, M, D)
                v = tl.load(
                    value_ptr + (base + offset)[:, None] + ds[None, :], mask=valid[:, None] & dmask[None, :], other=0
                ).to(ACC)
                acc += (a * cw)[:, None] * v
    out = out_ptr + rows[:, None] * D + ds[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _bwd_kernel(
    grad_out_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    points_ptr,
    loc_ptr,
    w_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_w_ptr,
    S,
    M,
    D,
    Lq,
    L,
    P,
    LP,
    R,
    PER_LEVEL: tl.constexpr,
    DISCRETE: tl.constexpr,
    CORNERS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # attention_weights are the weights themselves (with logits: their softmax, made once per row by the caller)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.program_id(1)
    rmask = rows < R
    if PER_LEVEL:
        level = 0
        for later in range(1, L):
            level += (i >= tl.load(points_ptr + later)).to(tl.int32)
    else:
        level = i // P
    mx = tl.zeros([BLOCK_R], ACC)
    total = tl.full([BLOCK_R], 1.0, ACC)
    base, x, y, height, width, inside, a = _sample(
        loc_ptr,
        w_ptr,
        shapes_ptr,
        starts_ptr,
        rows,
        rmask,
        i,
        level,
        LP,
        M,
        D,
        S,
        Lq,
        mx,
        total,
        False,
        DISCRETE,
        ACC,
    )
    ga = tl.zeros([BLOCK_R], ACC)
    gx = tl.zeros([BLOCK_R], ACC)
    gy = tl.zeros([BLOCK_R], ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        g = tl.load(grad_out_ptr + rows[:, None] * D + ds[None, :], mask=rmask[:, None] & dmask[None, :], other=0).to(
            ACC
        )
        for corner in tl.static_range(CORNERS):
            offset, cw, dwdx, dwdy, valid = _corner(x, y, corner % 2, corner // 2, height, width, inside, M, D)
            mask = valid[:, None] & dmask[None, :]
            ptrs = (base + offset)[:, None] + ds[None, :]
            gv = tl.sum(g * tl.load(value_ptr + ptrs, mask=mask, other=0).to(ACC), axis=1)
            ga += cw * gv
            gx += dwdx * gv
            gy += dwdy * gv
            # relaxed: the sums need atomicity, not ordering (acq_rel would fence every add)
            tl.atomic_add(grad_value_ptr + ptrs, (a * cw)[:, None] * g, mask=mask, sem="relaxed")
    tl.store(grad_w_ptr + rows * LP + i, ga, mask=rmask)
    if not DISCRETE:  # discrete sampling leaves the locations' gradient zero
        tl.store(grad_loc_ptr + (rows * LP + i) * 2, a * gx * width.to(ACC), mask=rmask)
        tl.store(grad_loc_ptr + (rows * LP + i) * 2 + 1, a * gy * height.to(ACC), mask=rmask)


def _point_starts(points: list[int] | None, like: torch.Tensor) -> torch.Tensor:
    """(L + 1,) int32 exclusive cumsum of the per-level counts on like's device, made once per counts and device
    (with one count: ``like`` itself, which the kernels then do not read)."""
    if points is None:
        return like
    starts = [0, *itertools.accumulate(points)]
    return device_constant(
        "point starts", tuple(points), like.device, lambda: torch.tensor(starts, dtype=torch.int32, device=like.device)
    )


def _dims(
    value: torch.Tensor, sampling_locations: torch.Tensor, points: list[int] | None
) -> tuple[int, int, int, int, int, int, int, int]:
    """(N, S, M, D, Lq, L, P, points per row); P is 0 with a count per level."""
    n, s, m, d = value.shape
    lq = sampling_locations.shape[1]
    if points is None:
        nl, p = sampling_locations.shape[3], sampling_locations.shape[4]
        return n, s, m, d, lq, nl, p, nl * p
    return n, s, m, d, lq, len(points), 0, sum(points)


@triton_op("dnops::_ms_deform_attn_triton", mutates_args={})
def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    attention_logits: bool = False,
    points_per_level: list[int] | None = None,
    discrete: bool = False,
) -> torch.Tensor:
    """Triton forward; arguments as ``dnops::ms_deform_attn``'s (locations (N, Lq, M, L, P, 2), or
    (N, Lq, M, sum_l P_l, 2) with ``points_per_level``)."""
    n, s, m, d, lq, nl, p, lp = _dims(value, sampling_locations, points_per_level)
    out = value.new_empty((n, lq, m * d))
    rows = n * lq * m
    if out.numel() == 0:
        return out
    block_r, block_d, _ = _tiles(d, value.dtype)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(d, block_d))
    wrap_triton(_fwd_kernel)[grid](
        value.contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        _point_starts(points_per_level, spatial_shapes),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        out,
        s,
        m,
        d,
        lq,
        nl,
        p,
        lp,
        rows,
        LOGITS=attention_logits,
        PER_LEVEL=points_per_level is not None,
        DISCRETE=discrete,
        CORNERS=1 if discrete else 4,  # discrete: the pixel is corner 0 with bilinear weight 1
        ACC=_acc_type(value.dtype),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return out


def _alert_not_deterministic() -> None:
    """As torch's nondeterministic ops under ``torch.use_deterministic_algorithms(True)``: an error, or a warning
    with ``warn_only=True``."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (
        "dnops.ms_deform_attn's Triton backward sums grad_value with atomics, in an order that varies between runs, "
        "but torch.use_deterministic_algorithms(True) is set; the CUDA backend's backward is deterministic "
        "(DNOPS_BACKEND=cuda or dnops.use_backend('cuda'))"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


@triton_op("dnops::_ms_deform_attn_triton_backward", mutates_args={})
def ms_deform_attn_triton_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    attention_logits: bool = False,
    points_per_level: list[int] | None = None,
    discrete: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (grad_value, grad_sampling_locations, grad_attention_weights).

    grad_value is summed by float atomics (in an order that varies from run to run): under
    ``torch.use_deterministic_algorithms(True)`` this raises as torch's nondeterministic ops do (the CUDA kernel has
    a deterministic backward)."""
    _alert_not_deterministic()
    n, s, m, d, lq, nl, p, lp = _dims(value, sampling_locations, points_per_level)
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    rows = n * lq * m
    grad_value = torch.zeros(value.shape, dtype=acc, device=value.device)  # the atomics add into it
    if not (rows and value.numel()):
        zeros = [torch.zeros(t.shape, dtype=acc, device=value.device) for t in (sampling_locations, attention_weights)]
        return grad_value.to(value.dtype), zeros[0].to(sampling_locations.dtype), zeros[1].to(attention_weights.dtype)
    # the kernel writes every element of both (discrete sampling: none of the locations', which stay zero)
    grad_loc = (torch.zeros if discrete else torch.empty)(sampling_locations.shape, dtype=acc, device=value.device)
    grad_w = torch.empty(attention_weights.shape, dtype=acc, device=value.device)
    weights = attention_weights.contiguous()
    if attention_logits:
        # the softmax over every point of a (query, head) row (dims 3 on), once per row; the kernel takes it
        probs = weights.to(acc).flatten(3).softmax(-1)
        weights = probs.view(weights.shape)
    block_d = _tiles(d, value.dtype)[2]
    grid = (triton.cdiv(rows, BLOCK_R), lp)
    wrap_triton(_bwd_kernel)[grid](
        grad_output.contiguous(),
        value.contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        _point_starts(points_per_level, spatial_shapes),
        sampling_locations.contiguous(),
        weights,
        grad_value,
        grad_loc,
        grad_w,
        s,
        m,
        d,
        lq,
        nl,
        p,
        lp,
        rows,
        PER_LEVEL=points_per_level is not None,
        DISCRETE=discrete,
        CORNERS=1 if discrete else 4,
        ACC=_acc_type(value.dtype),
        BLOCK_R=BLOCK_R,
        BLOCK_D=block_d,
    )
    if attention_logits:
        flat = grad_w.flatten(3)
        grad_w = (probs * (flat - (probs * flat).sum(-1, keepdim=True))).view_as(grad_w)
    return grad_value.to(value.dtype), grad_loc.to(sampling_locations.dtype), grad_w.to(attention_weights.dtype)


register_ms_deform_attn(ms_deform_attn_triton, ms_deform_attn_triton_backward)
