# Transcribed, and modified as the docstring says, from Peterande/D-FINE 4a1f73a8bcfac736a88abde9596d87f116d780a7:
# src/zoo/dfine/denoising.py.
# Copyright (c) 2023 lyuwenyu. All Rights Reserved. Modifications Copyright (c) 2024 The D-FINE Authors.
# Licensed under the Apache License, Version 2.0: LICENSE at the root of this repository (the upstream's licence).
"""D-FINE's (and DEIM's) contrastive denoising group, re-written device-agnostic: the oracle of
dnops.compat.dfine's tests.

Differences every function shares: ``.cuda()`` / ``.to('cuda')`` become the inputs' device, and Python ints
stand where the original sums one-element tensors; any other difference is in the function's docstring."""

from __future__ import annotations

from originals.rtdetr import _contrastive_group


def dfine_get_contrastive_denoising_training_group(
    targets, num_classes, num_queries, class_embed, num_denoising=100, label_noise_ratio=0.5, box_noise_scale=1.0
):
    """D-FINE's get_contrastive_denoising_training_group (Peterande/D-FINE 4a1f73a, src/zoo/dfine/denoising.py; DEIM's
    engine/deim/denoising.py at a9aa4ad is the same code): RT-DETR v2's up to a batch without GT, which returns
    (None, None, None, dn_meta), and the noised boxes' negative values turned positive before inverse_sigmoid."""
    return _contrastive_group(
        targets, num_classes, num_queries, class_embed, num_denoising, label_noise_ratio, box_noise_scale, True
    )
