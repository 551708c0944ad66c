"""The part DN-DETR's and DINO's adapters share: their per-image targets into dnops.dn_queries."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dnops.dn import flatten_targets
from dnops.ops.dn_queries import DNQueries, dn_queries


def queries_from_targets(
    targets: Sequence[dict], mode: str, num_classes: int, label_noise: float, box_noise: float, **layout: int
) -> tuple[torch.Tensor, torch.Tensor, list[int], DNQueries]:
    """(labels (K,), boxes (K, 4), counts, DNQueries); negative noise settings mean none, as the originals
    treat them. ``layout``: num_groups (DN) or dn_number (CDN)."""
    labels, boxes, counts = flatten_targets(targets)
    dn = dn_queries(
        labels,
        boxes,
        counts,
        num_classes=num_classes,
        mode=mode,
        label_noise_ratio=max(float(label_noise), 0.0),
        box_noise_scale=max(float(box_noise), 0.0),
        **{key: int(value) for key, value in layout.items()},
    )
    return labels, boxes, counts, dn
