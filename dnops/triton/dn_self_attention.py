"""Block-sparse DN self-attention in Triton, flash-attention style (online softmax, recomputation backward).

A query block iterates only over the key blocks its rows may see: the DN groups its DN rows belong to, then the
matching keys. The dK/dV pass iterates, for a key block, only over the query blocks that see it. Visibility
inside a block comes from indices (the DN structure), never from a mask tensor.

What bounds it at the dino shape (B=2, H=8, W=200 DN + 900 matching, Dh=32) on an H200: 15.9 M visible
(query, key) pairs (of 19.4 M dense), 2.0 GFLOP forward in exact float32 dots (no TF32: "ieee"), ~30 us at
67 TFLOP/s; q, k, v and out are 4.5 MB, 1 us at 4.3 TB/s. With 64-row blocks the forward launches only
18 x 16 = 288 programs, about two per SM: at this size latency and occupancy, not the roofline, set the time.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dnops._autograd import register_dn_self_attention
from dnops.triton.ms_deform_attn import interpreted

BLOCK = 16


@triton.jit
def _scale(hi, mid, lo, ACC: tl.constexpr):
    """The softmax scale from its three float32 parts (``scale_parts``), exact in float64."""
    return (tl.cast(hi, ACC) + tl.cast(mid, ACC)) + tl.cast(lo, ACC)


@triton.jit
def _dot(a, b, DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    return tl.dot(a.to(DOT), b.to(DOT), input_precision=PREC, out_dtype=ACC)


@triton.jit
def _visible(rows, cols, width, pad, group):
    same_group = (rows // group)[:, None] == (cols // group)[None, :]
    dn_pair = (rows < pad)[:, None] & (cols < pad)[None, :] & same_group
    vis = (cols >= pad)[None, :] | dn_pair
    return vis & (rows < width)[:, None] & (cols < width)[None, :]


@triton.jit
def _group_span(first, last, pad, group):
    """[lo, hi) of the DN slots in the groups of slots first..last; empty when first is not a DN slot."""
    lo = (first // group) * group
    hi = tl.minimum((tl.minimum(last, pad - 1) // group + 1) * group, pad)
    return lo, tl.where(first < pad, hi, lo)


@triton.jit
def _visible_block(it, lo, hi, pad, width, BLOCK_N: tl.constexpr):
    """Columns of the it-th key block of [lo, hi) (the query block's DN groups) followed by [pad, width) (the
    matching keys); columns past hi in the first range become ``width``, which every load and mask treats as
    out of range."""
    n_group = tl.cdiv(hi - lo, BLOCK_N)
    start = tl.where(it < n_group, lo + it * BLOCK_N, pad + (it - n_group) * BLOCK_N)
    cols = start + tl.arange(0, BLOCK_N)
    return tl.where((it >= n_group) | (cols < hi), cols, width)


@triton.jit
def _load_rows(ptr, rows, ds, width, dh):
    return tl.load(ptr + rows[:, None] * dh + ds[None, :], mask=(rows < width)[:, None] & (ds < dh)[None, :], other=0)


@triton.jit
def _fwd_step(
    q,
    k_ptr,
    v_ptr,
    rows,
    cols,
    ds,
    width,
    pad,
    group,
    dh,
    scale,
    m_i,
    l_i,
    acc,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
):
    k = _load_rows(k_ptr, cols, ds, width, dh)
    v = _load_rows(v_ptr, cols, ds, width, dh)
    s = _dot(q, tl.trans(k), DOT, ACC, PREC) * scale
    s = tl.where(_visible(rows, cols, width, pad, group), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p, v, DOT, ACC, PREC)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    width,
    pad,
    group,
    dh,
    scale_hi,
    scale_mid,
    scale_lo,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    scale = _scale(scale_hi, scale_mid, scale_lo, ACC)
    bh = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    ds = tl.arange(0, BLOCK_D)
    base = bh * width * dh
    q = _load_rows(q_ptr + base, rows, ds, width, dh)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    lo, hi = _group_span(first, tl.minimum(first + BLOCK_M, width) - 1, pad, group)
    for it in range(0, tl.cdiv(hi - lo, BLOCK_N) + tl.cdiv(width - pad, BLOCK_N)):
        cols = _visible_block(it, lo, hi, pad, width, BLOCK_N)
        m_i, l_i, acc = _fwd_step(
            q, k_ptr + base, v_ptr + base, rows, cols, ds, width, pad, group, dh, scale, m_i, l_i, acc, ACC, PREC, DOT
        )
    l_safe = tl.where(l_i == 0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        o_ptr + base + rows[:, None] * dh + ds[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=(rows < width)[:, None] & (ds < dh)[None, :],
    )
    tl.store(lse_ptr + bh * width + rows, m_i + tl.log(l_safe), mask=rows < width)


@triton.jit
def _probs(q, k, rows, cols, lse, width, pad, group, scale, ACC: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr):
    s = _dot(q, tl.trans(k), DOT, ACC, PREC) * scale
    return tl.where(_visible(rows, cols, width, pad, group), tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    width,
    pad,
    group,
    dh,
    scale_hi,
    scale_mid,
    scale_lo,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    scale = _scale(scale_hi, scale_mid, scale_lo, ACC)
    bh = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) * BLOCK_N
    last = tl.minimum(first + BLOCK_N, width) - 1
    cols = first + tl.arange(0, BLOCK_N)
    ds = tl.arange(0, BLOCK_D)
    base = bh * width * dh
    k = _load_rows(k_ptr + base, cols, ds, width, dh)
    v = _load_rows(v_ptr + base, cols, ds, width, dh)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    # Matching keys are seen by every query; DN keys only by their own groups.
    lo, hi = _group_span(first, last, pad, group)
    lo = tl.where(last >= pad, 0, lo)
    hi = tl.where(last >= pad, width, hi)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_rows(q_ptr + base, rows, ds, width, dh)
        do = _load_rows(do_ptr + base, rows, ds, width, dh)
        lse = tl.load(lse_ptr + bh * width + rows, mask=rows < width, other=0)
        delta = tl.load(delta_ptr + bh * width + rows, mask=rows < width, other=0)
        p = _probs(q, k, rows, cols, lse, width, pad, group, scale, ACC, PREC, DOT)
        dv += _dot(tl.trans(p), do, DOT, ACC, PREC)
        dp = _dot(do, tl.trans(v), DOT, ACC, PREC)
        dsc = p * (dp - delta[:, None]) * scale
        dk += _dot(tl.trans(dsc), q, DOT, ACC, PREC)
    mask = (cols < width)[:, None] & (ds < dh)[None, :]
    tl.store(dk_ptr + base + cols[:, None] * dh + ds[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + base + cols[:, None] * dh + ds[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dq_step(
    q,
    do,
    lse,
    delta,
    k_ptr,
    v_ptr,
    rows,
    cols,
    ds,
    width,
    pad,
    group,
    dh,
    scale,
    dq,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
):
    k = _load_rows(k_ptr, cols, ds, width, dh)
    v = _load_rows(v_ptr, cols, ds, width, dh)
    p = _probs(q, k, rows, cols, lse, width, pad, group, scale, ACC, PREC, DOT)
    dp = _dot(do, tl.trans(v), DOT, ACC, PREC)
    dsc = p * (dp - delta[:, None]) * scale
    return dq + _dot(dsc, k, DOT, ACC, PREC)


@triton.jit
def _dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    width,
    pad,
    group,
    dh,
    scale_hi,
    scale_mid,
    scale_lo,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    scale = _scale(scale_hi, scale_mid, scale_lo, ACC)
    bh = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    ds = tl.arange(0, BLOCK_D)
    base = bh * width * dh
    q = _load_rows(q_ptr + base, rows, ds, width, dh)
    do = _load_rows(do_ptr + base, rows, ds, width, dh)
    lse = tl.load(lse_ptr + bh * width + rows, mask=rows < width, other=0)
    delta = tl.load(delta_ptr + bh * width + rows, mask=rows < width, other=0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    lo, hi = _group_span(first, tl.minimum(first + BLOCK_M, width) - 1, pad, group)
    for it in range(0, tl.cdiv(hi - lo, BLOCK_N) + tl.cdiv(width - pad, BLOCK_N)):
        cols = _visible_block(it, lo, hi, pad, width, BLOCK_N)
        dq = _dq_step(
            q,
            do,
            lse,
            delta,
            k_ptr + base,
            v_ptr + base,
            rows,
            cols,
            ds,
            width,
            pad,
            group,
            dh,
            scale,
            dq,
            ACC,
            PREC,
            DOT,
        )
    tl.store(
        dq_ptr + base + rows[:, None] * dh + ds[None, :],
        dq.to(dq_ptr.dtype.element_ty),
        mask=(rows < width)[:, None] & (ds < dh)[None, :],
    )


def scale_parts(scale: float) -> tuple[float, float, float]:
    """``scale`` as three float32 values whose float64 sum is ``scale`` exactly: a compiled Triton kernel takes a
    Python float as float32 (the interpreter keeps the double), which would round a float64 kernel's scale."""
    hi = _float32(scale)
    mid = _float32(scale - hi)
    return hi, mid, _float32(scale - hi - mid)


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


_TL_TYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _launch_args(q: torch.Tensor) -> dict:
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    dot = _TL_TYPES[q.dtype]
    if dot == tl.bfloat16 and interpreted():
        dot = tl.float32  # the interpreter's tl.dot misreads bfloat16 operands (numpy has no bfloat16)
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    block = _block(block_d, q.shape[-1], q.dtype)
    # exact (float32 / float64) tiles of 128-wide heads spill with 4 warps, and float32's 32 x 32 tiles park values on
    # the stack (the forward at DN-DETR's shapes): 8 warps spread them over twice the registers
    exact = q.dtype in (torch.float32, torch.float64)
    warps = 8 if exact and (block_d >= 128 or block >= 32) and not interpreted() else 4
    return {
        "ACC": acc,
        "PREC": "ieee",
        "DOT": dot,
        "BLOCK_M": block,
        "BLOCK_N": block,
        "BLOCK_D": block_d,
        "num_warps": warps,
    }


def _dkdv_launch_args(args: dict, dtype: torch.dtype) -> dict:
    """The dK / dV kernel's: float32 32-key tiles step over the queries 16 rows at a time, on 4 warps. It holds four
    tiles across its loop; 32-row steps take 255 registers and 8 bytes of stack on sm_90 with 4 warps, 128 and 8
    with 8 warps, 16-row steps 138 and none (tests/gpu_compile.py)."""
    if dtype == torch.float32 and args["BLOCK_N"] == 32:
        return {**args, "BLOCK_M": 16, "num_warps": 4}
    return args


def _block(block_d: int, dh: int, dtype: torch.dtype) -> int:
    """Query and key block edge. Compiled, float16 / bfloat16 take 64 x 64 score tiles for heads up to 64 wide
    (DN-DETR's 32): wgmma keeps the q / acc tiles in registers; wider heads halve it. Exact float32 and float64
    dots ("ieee") run on the FMA units with every tile in registers, and 64 x 64 spills (7-19 KB of stack per
    kernel on sm_90): float32 takes 32 for 16-divisible heads up to 32 wide and 16 otherwise (the dK / dV kernel
    holds four tiles), float64 16. tests/gpu_compile.py holds them to no spills. The interpreter (CPU) keeps 16:
    its cost grows with the tile, and DN groups are often that small."""
    if interpreted():
        return BLOCK
    if dtype == torch.float64:
        return 16
    if dtype == torch.float32:
        return 32 if block_d <= 32 and dh % 16 == 0 else 16
    return 64 if block_d <= 64 else 32 if block_d <= 128 else 16


@triton_op("dnops::_dn_self_attention_triton", mutates_args={})
def dn_self_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_size: int, group_size: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, W, Dh), lse (B, H, W)) for q, k, v (B, H, W, Dh); shapes as ``dnops.dn_self_attention``."""
    b, h, width, dh = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(
        (b, h, width), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device
    )
    if q.numel():
        args = _launch_args(q)
        grid = (triton.cdiv(width, args["BLOCK_M"]), b * h)
        structure = (width, pad_size, max(group_size, 1), dh, *scale_parts(scale))
        wrap_triton(_fwd_kernel)[grid](q, k, v, out, lse, *structure, **args)
    return out, lse


@triton_op("dnops::_dn_self_attention_triton_backward", mutates_args={})
def dn_self_attention_triton_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pad_size: int,
    group_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each (B, H, W, Dh)."""
    b, h, width, dh = q.shape
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous().to(q.dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel():
        delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1).contiguous()
        args = _launch_args(q)
        grid = (triton.cdiv(width, args["BLOCK_M"]), b * h)
        common = (width, pad_size, max(group_size, 1), dh, *scale_parts(scale))
        kv_args = _dkdv_launch_args(args, q.dtype)
        kv_grid = (triton.cdiv(width, kv_args["BLOCK_N"]), b * h)
        wrap_triton(_dkdv_kernel)[kv_grid](q, k, v, grad_out, lse.contiguous(), delta, dk, dv, *common, **kv_args)
        wrap_triton(_dq_kernel)[grid](q, k, v, grad_out, lse.contiguous(), delta, dq, *common, **args)
    return dq, dk, dv


register_dn_self_attention(dn_self_attention_triton, dn_self_attention_triton_backward)
