# Transcribed, and modified as the docstring says, from ShihuaHuang95/DEIM a9aa4adce6b5e97b2a6ca9452bf01b7c35440913:
# engine/deim/utils.py (read against D-FINE 4a1f73a src/zoo/dfine/utils.py and RT-DETR 068dfde
# rtdetrv2_pytorch/src/zoo/rtdetr/utils.py).
# DEIM: Copyright (c) 2024 The DEIM Authors. D-FINE: Copyright (c) 2024 The D-FINE Authors. RT-DETR: Copyright (c)
# 2023 lyuwenyu. All Rights Reserved.
# Licensed under the Apache License, Version 2.0: LICENSE at the root of this repository (the upstream's licence).
"""The real-time DETRs' ``deformable_attention_core_func_v2`` (DEIM's, which is D-FINE's and RT-DETR v2's),
re-written device-agnostic: the oracle of dnops.compat.rtdetr's v2 tests and the benchmarks' baseline.

Differences every function shares: ``.cuda()`` / ``.to('cuda')`` become the inputs' device, and Python ints
stand where the original sums one-element tensors; any other difference is in the function's docstring."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def deim_deformable_attention_core_func_v2(
    value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list, method="default",
    value_shape="default",
):  # fmt: skip
    """DEIM's deformable_attention_core_func_v2 (ShihuaHuang95/DEIM a9aa4ad, engine/deim/utils.py). With
    value_shape="reshape" it is RT-DETR v2's (lyuwenyu/RT-DETR 068dfde, rtdetrv2_pytorch/src/zoo/rtdetr/utils.py,
    value (N, S, M, D)); with "default" D-FINE's (Peterande/D-FINE 4a1f73a, src/zoo/dfine/utils.py, one
    (N, M, D, H_l * W_l) value per level): read line by line, the three differ in nothing else. "discrete" clamps
    both coordinates to [0, H_l - 1], as the originals do."""
    if value_shape == "default":
        bs, n_head, c, _ = value[0].shape
    elif value_shape == "reshape":
        bs, _, n_head, c = value.shape
        value = value.permute(0, 2, 3, 1).flatten(0, 1).split([h * w for h, w in value_spatial_shapes], dim=-1)
    _, len_q, _, _, _ = sampling_locations.shape
    if method == "default":
        sampling_grids = 2 * sampling_locations - 1
    elif method == "discrete":
        sampling_grids = sampling_locations
    sampling_grids = sampling_grids.permute(0, 2, 1, 3, 4).flatten(0, 1)
    sampling_locations_list = sampling_grids.split(num_points_list, dim=-2)
    sampling_value_list = []
    for level, (h, w) in enumerate(value_spatial_shapes):
        value_l = value[level].reshape(bs * n_head, c, h, w)
        grid_l = sampling_locations_list[level]
        if method == "default":
            sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        elif method == "discrete":
            coord = (grid_l * torch.tensor([[w, h]], device=value_l.device) + 0.5).to(torch.int64)
            coord = coord.clamp(0, h - 1)
            coord = coord.reshape(bs * n_head, len_q * num_points_list[level], 2)
            s_idx = torch.arange(coord.shape[0], device=value_l.device).unsqueeze(-1).repeat(1, coord.shape[1])
            sampled = value_l[s_idx, :, coord[..., 1], coord[..., 0]]
            sampled = sampled.permute(0, 2, 1).reshape(bs * n_head, c, len_q, num_points_list[level])
        sampling_value_list.append(sampled)
    attn_weights = attention_weights.permute(0, 2, 1, 3).reshape(bs * n_head, 1, len_q, sum(num_points_list))
    output = (torch.concat(sampling_value_list, dim=-1) * attn_weights).sum(-1).reshape(bs, n_head * c, len_q)
    return output.permute(0, 2, 1)
