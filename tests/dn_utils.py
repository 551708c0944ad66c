"""Ground-truth batches for the denoising-query tests."""

from __future__ import annotations

import torch


def make_gt(counts, num_classes=10, seed=0, dtype=torch.float32, centered=False):
    """(labels (K,), boxes (K, 4) cxcywh, counts list); ``centered`` keeps every noised box inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    k = sum(counts)
    labels = torch.randint(0, num_classes, (k,), generator=g)
    if centered:
        cxcy = 0.4 + 0.2 * torch.rand(k, 2, generator=g)
        wh = 0.05 + 0.1 * torch.rand(k, 2, generator=g)
    else:
        wh = 0.02 + 0.5 * torch.rand(k, 2, generator=g)
        cxcy = wh / 2 + (1 - wh) * torch.rand(k, 2, generator=g)
    return labels, torch.cat([cxcy, wh], 1).to(dtype), list(counts)


def to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
