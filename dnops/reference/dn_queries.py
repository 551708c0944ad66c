"""Denoising-query generation: the definition every backend is tested against, in vectorized torch ops.

Random stream (shared bit for bit by every backend): the noise of ground truth k in group g is drawn from
Philox4x32-10 keyed by the seed with counter (k, 8 * g + block, 0, 0), i.e. ``tl.randint4x(seed, offset)`` at
``offset = ((8 * g + block) << 32) | k``. Each block gives four uint32 words w0..w3:

- DN:  block 0: w0 label-flip draw, w1 new label (w1 % num_classes), w2, w3 -> u for cx, cy; block 1: w0, w1
  -> u for w, h. Box noise: cx += (2u - 1) * scale * w / 2 (cy likewise with h), w += (2u - 1) * scale * w.
- CDN: positives use blocks 0..2, negatives 3..5: block b: w0 flip, w1 new label; block b+1: w0..w3 magnitudes
  r (+1 for negatives); block b+2: w0..w3 signs (uniform < 0.5 -> -1). The xyxy corners move by
  sign * r * half * scale with half = w / 2 for x and h / 2 for y. Corners that cross give w or h = 0 (DINO
  leaves them negative, which its inverse_sigmoid then clamps to 0: the decoder sees the same query).

A word becomes a uniform in [0, 1) as ``tl.rand`` does. Box arithmetic runs in float32 and is clamped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dnops.reference.philox import philox4x32_compilable, uint32_to_uniform
from dnops.validation import check_dn_queries_args

BLOCKS_PER_GROUP = 8


def dn_layout(
    counts: Sequence[int], contrastive: bool, num_groups: int, dn_number: int, max_dn_queries: int | None
) -> tuple[int, int]:
    """(groups, max_gt): how many groups and how many GT slots per image per group (per polarity for CDN).

    DN uses ``num_groups``; CDN derives the group count from ``dn_number`` as DINO does. ``max_dn_queries`` caps
    pad_size: first by dropping groups, and if one group is still too large, by reconstructing only the first
    max_gt GT of each image.
    """
    mx = max(counts) if counts else 0  # not max(..., default=): torch 2.11's Dynamo cannot trace that form
    per = 2 if contrastive else 1
    if contrastive:
        d = 2 * dn_number
        groups = 1 if mx == 0 else (max(1, d // (2 * mx)) if d >= 100 else max(1, d))
    else:
        groups = num_groups
    if groups < 1:
        raise ValueError(f"dnops.dn_queries: num_groups must be >= 1, got {groups}")
    max_gt = mx
    if max_dn_queries is not None and mx > 0:
        if max_dn_queries < per:
            raise ValueError(f"dnops.dn_queries: max_dn_queries must be >= {per}, got {max_dn_queries}")
        if groups * per * mx > max_dn_queries:
            groups = max(1, max_dn_queries // (per * mx))
            max_gt = min(mx, max_dn_queries // per)
    return groups, max_gt


def dn_queries(
    labels: torch.Tensor,
    boxes: torch.Tensor,
    counts: Sequence[int],
    num_groups: int,
    max_gt: int,
    contrastive: bool,
    num_classes: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    seed: int | torch.Tensor,
    abs_size: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-slot computation behind ``dnops.dn_queries`` once the layout is fixed (the op's schema).

    label_noise_ratio here is the flip probability itself. ``abs_size`` (CDN): a width or height whose corners
    crossed is their distance, as D-FINE / DEIM flip it, instead of 0. Returns (labels, boxes, gt_index, negative).
    """
    check_dn_queries_args(labels, boxes, counts, num_classes)
    device = labels.device
    per = 2 if contrastive else 1
    group_size = per * max_gt
    pad = num_groups * group_size
    slot = torch.arange(pad, device=device)
    group = slot // max(group_size, 1)
    within = slot % max(group_size, 1)
    negative_half = within >= max_gt
    j = within - negative_half.long() * max_gt
    counts_t = torch.tensor(list(counts), dtype=torch.int64, device=device)
    starts = torch.cumsum(counts_t, 0) - counts_t
    valid = j[None, :] < counts_t.clamp(max=max_gt)[:, None]  # (B, pad)
    k = torch.where(valid, starts[:, None] + j[None, :], torch.zeros((), dtype=torch.int64, device=device))

    def words(block: torch.Tensor | int) -> tuple[torch.Tensor, ...]:
        c1 = (group * BLOCKS_PER_GROUP + block).expand_as(k)
        zero = torch.zeros_like(k)
        return philox4x32_compilable(seed, k, c1, zero, zero)

    first = negative_half.long() * 3 if contrastive else 0
    w0 = words(first)
    flip = uint32_to_uniform(w0[0]) < torch.tensor(label_noise_ratio, dtype=torch.float32)
    new_labels = torch.where(flip, w0[1] % num_classes, labels[k])

    gt = boxes[k].float()
    cx, cy, w, h = gt.unbind(-1)
    lam = torch.tensor(box_noise_scale, dtype=torch.float32)
    if contrastive:
        mags = torch.stack([uint32_to_uniform(x) for x in words(first + 1)], -1)
        mags = mags + negative_half[None, :, None].float()
        signs = torch.stack([uint32_to_uniform(x) for x in words(first + 2)], -1)
        signs = torch.where(signs < 0.5, -1.0, 1.0)
        half = torch.stack([w * 0.5, h * 0.5, w * 0.5, h * 0.5], -1)
        xyxy = torch.stack([cx - w * 0.5, cy - h * 0.5, cx + w * 0.5, cy + h * 0.5], -1)
        xyxy = (xyxy + signs * mags * half * lam).clamp(0.0, 1.0)
        x0, y0, x1, y1 = xyxy.unbind(-1)
        size = (lambda d: d.abs()) if abs_size else (lambda d: d.clamp(min=0))
        noised = torch.stack([(x0 + x1) * 0.5, (y0 + y1) * 0.5, size(x1 - x0), size(y1 - y0)], -1)
    else:
        w1 = words(1)
        u = torch.stack([uint32_to_uniform(x) for x in (w0[2], w0[3], w1[0], w1[1])], -1) * 2.0 - 1.0
        span = torch.stack([w * 0.5, h * 0.5, w, h], -1)
        noised = (gt + u * span * lam).clamp(0.0, 1.0)

    out_labels = torch.where(valid, new_labels, num_classes)
    out_boxes = torch.where(valid[..., None], noised, 0.5).to(boxes.dtype)
    gt_index = torch.where(valid, k, -1)
    negative = valid & negative_half[None, :] if contrastive else torch.zeros_like(valid)
    return out_labels, out_boxes, gt_index, negative
