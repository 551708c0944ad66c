"""Denoising-query generation in Triton: one program per block of output slots, noise from tl.randint4x with
the counter layout of dnops/reference/dn_queries.py (so every backend draws the same numbers).

What bounds it: a few kB in and out (B=32, 5 groups of 30 slots: 4,800 slots x ~60 bytes = 0.3 MB, under 0.1 us of
HBM time) and a few Philox rounds per slot: one kernel launch (~5 us with its Python around it) is the cost.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dnops._constants import host_to_device

BLOCK = 128
BLOCKS_PER_GROUP: tl.constexpr = tl.constexpr(8)


@triton.jit
def _uniform(word):
    """tl.rand's conversion of a uint32 word to [0, 1)."""
    x = word.to(tl.int32, bitcast=True)
    return tl.where(x < 0, ~x, x).to(tl.float32) * 4.6566127342e-10


@triton.jit
def _words(seed, k, block):
    return tl.randint4x(seed, (block.to(tl.int64) << 32) | k.to(tl.int64))


@triton.jit
def _kernel(
    labels_ptr,
    boxes_ptr,
    starts_ptr,
    counts_ptr,
    out_labels_ptr,
    out_boxes_ptr,
    gt_index_ptr,
    neg_ptr,
    total,
    pad,
    group_size,
    max_gt,
    num_classes,
    flip_prob,
    box_scale,
    seed,
    CONTRASTIVE: tl.constexpr,
    ABS_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < total
    b = i // pad
    s = i % pad
    group = s // group_size
    within = s % group_size
    if CONTRASTIVE:
        neg = within >= max_gt
    else:
        neg = within < 0
    j = tl.where(neg, within - max_gt, within)
    start = tl.load(starts_ptr + b, mask=live, other=0)
    count = tl.minimum(tl.load(counts_ptr + b, mask=live, other=0), max_gt)
    valid = live & (j < count)
    k = tl.where(valid, start + j, 0)
    base = group * BLOCKS_PER_GROUP + tl.where(neg, 3, 0)
    w0, w1, w2, w3 = _words(seed, k, base)
    gt_label = tl.load(labels_ptr + k, mask=valid, other=0)
    new_label = (w1.to(tl.int64) & 0xFFFFFFFF) % num_classes
    label = tl.where(_uniform(w0) < flip_prob, new_label, gt_label)
    cx = tl.load(boxes_ptr + 4 * k, mask=valid, other=0).to(tl.float32)
    cy = tl.load(boxes_ptr + 4 * k + 1, mask=valid, other=0).to(tl.float32)
    w = tl.load(boxes_ptr + 4 * k + 2, mask=valid, other=0).to(tl.float32)
    h = tl.load(boxes_ptr + 4 * k + 3, mask=valid, other=0).to(tl.float32)
    if CONTRASTIVE:
        m0, m1, m2, m3 = _words(seed, k, base + 1)
        s0, s1, s2, s3 = _words(seed, k, base + 2)
        extra = tl.where(neg, 1.0, 0.0)
        x0 = cx - w * 0.5 + tl.where(_uniform(s0) < 0.5, -1.0, 1.0) * (_uniform(m0) + extra) * (w * 0.5) * box_scale
        y0 = cy - h * 0.5 + tl.where(_uniform(s1) < 0.5, -1.0, 1.0) * (_uniform(m1) + extra) * (h * 0.5) * box_scale
        x1 = cx + w * 0.5 + tl.where(_uniform(s2) < 0.5, -1.0, 1.0) * (_uniform(m2) + extra) * (w * 0.5) * box_scale
        y1 = cy + h * 0.5 + tl.where(_uniform(s3) < 0.5, -1.0, 1.0) * (_uniform(m3) + extra) * (h * 0.5) * box_scale
        x0 = tl.minimum(tl.maximum(x0, 0.0), 1.0)
        y0 = tl.minimum(tl.maximum(y0, 0.0), 1.0)
        x1 = tl.minimum(tl.maximum(x1, 0.0), 1.0)
        y1 = tl.minimum(tl.maximum(y1, 0.0), 1.0)
        ncx = (x0 + x1) * 0.5
        ncy = (y0 + y1) * 0.5
        if ABS_SIZE:
            nw = tl.abs(x1 - x0)
            nh = tl.abs(y1 - y0)
        else:
            nw = tl.maximum(x1 - x0, 0.0)
            nh = tl.maximum(y1 - y0, 0.0)
    else:
        v0, v1, _, _ = _words(seed, k, group * BLOCKS_PER_GROUP + 1)
        ncx = tl.minimum(tl.maximum(cx + (_uniform(w2) * 2.0 - 1.0) * (w * 0.5) * box_scale, 0.0), 1.0)
        ncy = tl.minimum(tl.maximum(cy + (_uniform(w3) * 2.0 - 1.0) * (h * 0.5) * box_scale, 0.0), 1.0)
        nw = tl.minimum(tl.maximum(w + (_uniform(v0) * 2.0 - 1.0) * w * box_scale, 0.0), 1.0)
        nh = tl.minimum(tl.maximum(h + (_uniform(v1) * 2.0 - 1.0) * h * box_scale, 0.0), 1.0)
    ty = out_boxes_ptr.dtype.element_ty
    tl.store(out_labels_ptr + i, tl.where(valid, label, num_classes), mask=live)
    tl.store(out_boxes_ptr + 4 * i, tl.where(valid, ncx, 0.5).to(ty), mask=live)
    tl.store(out_boxes_ptr + 4 * i + 1, tl.where(valid, ncy, 0.5).to(ty), mask=live)
    tl.store(out_boxes_ptr + 4 * i + 2, tl.where(valid, nw, 0.5).to(ty), mask=live)
    tl.store(out_boxes_ptr + 4 * i + 3, tl.where(valid, nh, 0.5).to(ty), mask=live)
    tl.store(gt_index_ptr + i, tl.where(valid, k, -1), mask=live)
    tl.store(neg_ptr + i, (valid & neg).to(tl.int8), mask=live)


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """The per-image starts and counts on the kernel's device (a Triton kernel takes no arrays as arguments); under
    CUDA graph capture this raises: the CUDA kernel, which takes the counts as launch parameters, captures."""
    return host_to_device(torch.tensor(values, dtype=torch.int64), device, "dn_queries (its Triton kernel)")


@triton_op("dnops::_dn_queries_triton", mutates_args={})
def dn_queries_triton(
    labels: torch.Tensor,
    boxes: torch.Tensor,
    counts: Sequence[int],
    num_groups: int,
    max_gt: int,
    contrastive: bool,
    num_classes: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    seed: int,
    abs_size: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of the dnops::dn_queries kernel (same arguments and outputs)."""
    batch = len(counts)
    group_size = max_gt * (2 if contrastive else 1)
    pad = num_groups * group_size
    device = labels.device
    out_labels = torch.empty((batch, pad), dtype=torch.int64, device=device)
    out_boxes = torch.empty((batch, pad, 4), dtype=boxes.dtype, device=device)
    gt_index = torch.empty((batch, pad), dtype=torch.int64, device=device)
    negative = torch.empty((batch, pad), dtype=torch.int8, device=device)
    total = batch * pad
    if total:
        starts_counts = _to_device([*itertools.accumulate(counts, initial=0)][:-1] + list(counts), device)
        wrap_triton(_kernel)[(triton.cdiv(total, BLOCK),)](
            labels.contiguous(),
            boxes.contiguous(),
            starts_counts[:batch],
            starts_counts[batch:],
            out_labels,
            out_boxes,
            gt_index,
            negative,
            total,
            pad,
            max(group_size, 1),
            max_gt,
            num_classes,
            label_noise_ratio,
            box_noise_scale,
            seed,
            CONTRASTIVE=contrastive,
            ABS_SIZE=abs_size,
            BLOCK=BLOCK,
        )
    return out_labels, out_boxes, gt_index, negative.bool()
