"""D-FINE's and DEIM's names on dnops (Peterande/D-FINE ``src/zoo/dfine/``, ShihuaHuang95/DEIM ``engine/deim/``):
their deformable attention as dnops.compat.rtdetr serves it, and their contrastive denoising group, which differs
from RT-DETR v2's in two places."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dnops.compat.rtdetr import contrastive_group, deformable_attention_core_func_v2, use_dnops

__all__ = ["deformable_attention_core_func_v2", "get_contrastive_denoising_training_group", "use_dnops"]


def get_contrastive_denoising_training_group(
    targets: Sequence[dict],
    num_classes: int,
    num_queries: int,
    class_embed: torch.nn.Module,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict | None]:
    """D-FINE's / DEIM's ``get_contrastive_denoising_training_group`` (``denoising.py``) on dnops.dn_queries: as
    dnops.compat.rtdetr's (RT-DETR v2's), except that a width or height whose corners crossed is their distance (the
    originals turn negative sizes positive) and that a batch without GT returns (None, None, None, {"dn_positive_idx":
    None, "dn_num_group": 0, "dn_num_split": [0, num_queries]}). Shapes as there."""
    return contrastive_group(
        targets, num_classes, num_queries, class_embed, num_denoising, label_noise_ratio, box_noise_scale, True
    )
