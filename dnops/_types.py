"""The result types of the public ops, below every layer that makes or reads them."""

from __future__ import annotations

from typing import NamedTuple

import torch


class DNQueries(NamedTuple):
    """Denoising queries, batch-first; pad_size = num_groups * group_size.

    labels: (B, pad) int64, num_classes in padding slots. boxes: (B, pad, 4) noised (cx, cy, w, h), 0.5 in
    padding slots. gt_index: (B, pad) int64 row of the reconstructed GT in the flat input, -1 for padding.
    negative: (B, pad) bool, True for CDN negative slots holding a GT. contrastive: CDN layout (each group is
    max_gt positive slots then max_gt negative slots).
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    gt_index: torch.Tensor
    negative: torch.Tensor
    num_groups: int
    group_size: int
    pad_size: int
    contrastive: bool = False

    @property
    def max_gt(self) -> int:
        """GT slots per image per group (per polarity for CDN)."""
        return self.group_size // 2 if self.contrastive else self.group_size
