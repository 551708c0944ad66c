"""What the detrex, MaskDINO and mmdetection denoising adapters share: per-image GT into dnops' generation kernel
with the layout the original computes (its group count, its flip probability), and back into query tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnops._types import DNQueries
from dnops.dn import dn_box_queries, dn_label_queries
from dnops.ops.dn_queries import generate


def noised_groups(
    labels: Sequence[torch.Tensor],
    boxes: Sequence[torch.Tensor],
    groups: int,
    contrastive: bool,
    num_classes: int,
    flip: float,
    box_noise_scale: float,
) -> DNQueries:
    """``groups`` groups of max(n_b) slots (twice that, positives then negatives, when ``contrastive``) of each image's
    GT: labels (n_b,) and normalised cxcywh boxes (n_b, 4). ``flip``: the probability a label is redrawn uniformly
    from [0, num_classes); ``box_noise_scale``: DN-DETR's box law, or DINO's corner law when contrastive. A setting
    <= 0 means none, as the originals skip the noise then. The GT counts are the tensors' sizes: nothing is read from
    the device."""
    counts = [int(t.shape[0]) for t in labels]
    max_gt = max(counts)
    flat_labels = torch.cat(list(labels)).long()
    flat_boxes = torch.cat(list(boxes))
    out = generate(
        flat_labels,
        flat_boxes,
        counts,
        groups,
        max_gt,
        contrastive,
        num_classes,
        max(float(flip), 0.0),
        max(float(box_noise_scale), 0.0),
        None,
    )
    group_size = max_gt * (2 if contrastive else 1)
    return DNQueries(
        *out, num_groups=groups, group_size=group_size, pad_size=groups * group_size, contrastive=contrastive
    )


def query_tensors(
    dn: DNQueries, label_enc: nn.Embedding, num_classes: int, eps: float, indicator: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, pad, C) label embeddings (zeros in padding slots) in the embedding's dtype and (B, pad, 4) boxes through
    inverse_sigmoid with the original's ``eps`` (0 in padding slots)."""
    return dn_label_queries(dn, label_enc, num_classes, indicator), dn_box_queries(dn, eps)
