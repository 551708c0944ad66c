# Transcribed, and modified as the docstrings say, from lyuwenyu/RT-DETR 068dfde65f2667ad6555883c69d73de886518cad:
# rtdetr_pytorch/src/zoo/rtdetr/utils.py, rtdetrv2_pytorch/src/zoo/rtdetr/denoising.py.
# RT-DETR: Copyright (c) 2023 lyuwenyu. All Rights Reserved.
# Licensed under the Apache License, Version 2.0: LICENSE at the root of this repository (the upstream's licence).
"""RT-DETR's deformable-attention function and RT-DETR v2's contrastive denoising group, re-written
device-agnostic: the oracle of dnops.compat.rtdetr's tests and the benchmarks' baseline.

Differences every function shares: ``.cuda()`` / ``.to('cuda')`` become the inputs' device, and Python ints
stand where the original sums one-element tensors; any other difference is in the function's docstring."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rtdetr_deformable_attention_core_func(value, value_spatial_shapes, sampling_locations, attention_weights):
    """RT-DETR's deformable_attention_core_func (lyuwenyu/RT-DETR 068dfde, rtdetr_pytorch/src/zoo/rtdetr/utils.py; the
    same function is in rtdetrv2_pytorch's): Deformable-DETR's layout, (N, Lq, M * D) as a transposed view."""
    bs, _, n_head, c = value.shape
    _, len_q, _, n_levels, n_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in value_spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for level, (h, w) in enumerate(value_spatial_shapes):
        value_l = value_list[level].flatten(2).permute(0, 2, 1).reshape(bs * n_head, c, h, w)
        grid_l = sampling_grids[:, :, :, level].permute(0, 2, 1, 3, 4).flatten(0, 1)
        sampling_value_list.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    attention_weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(bs * n_head, 1, len_q, n_levels * n_points)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1)
    return output.reshape(bs, n_head * c, len_q).permute(0, 2, 1)


def rtdetr_get_contrastive_denoising_training_group(
    targets, num_classes, num_queries, class_embed, num_denoising=100, label_noise_ratio=0.5, box_noise_scale=1.0
):
    """RT-DETR v2's get_contrastive_denoising_training_group (lyuwenyu/RT-DETR 068dfde,
    rtdetrv2_pytorch/src/zoo/rtdetr/denoising.py), with its box_ops and inverse_sigmoid (eps 1e-5) inlined. A
    batch without GT gets one dummy group. With box_noise_scale <= 0 it raises UnboundLocalError, as the original."""
    return _contrastive_group(
        targets, num_classes, num_queries, class_embed, num_denoising, label_noise_ratio, box_noise_scale, False
    )


def _contrastive_group(
    targets, num_classes, num_queries, class_embed, num_denoising, label_noise_ratio, box_noise_scale, dfine
):
    """The two originals above, read line by line: they differ in the two places marked ``dfine``."""
    if num_denoising <= 0:
        return None, None, None, None
    num_gts = [len(t["labels"]) for t in targets]
    device = targets[0]["labels"].device
    max_gt_num = max(num_gts)
    is_empty_batch = False
    if max_gt_num == 0 and dfine:
        dn_meta = {"dn_positive_idx": None, "dn_num_group": 0, "dn_num_split": [0, num_queries]}
        return None, None, None, dn_meta
    if max_gt_num == 0:
        is_empty_batch = True
        max_gt_num = 1
        num_group = 1
    else:
        num_group = num_denoising // max_gt_num
        num_group = 1 if num_group == 0 else num_group
    bs = len(num_gts)
    input_query_class = torch.full([bs, max_gt_num], num_classes, dtype=torch.int32, device=device)
    input_query_bbox = torch.zeros([bs, max_gt_num, 4], device=device)
    pad_gt_mask = torch.zeros([bs, max_gt_num], dtype=torch.bool, device=device)
    if is_empty_batch:
        input_query_bbox[..., :2] = 0.5
        input_query_bbox[..., 2:] = 0.1
    for i in range(bs):
        num_gt = num_gts[i]
        if num_gt > 0:
            input_query_class[i, :num_gt] = targets[i]["labels"]
            input_query_bbox[i, :num_gt] = targets[i]["boxes"]
            pad_gt_mask[i, :num_gt] = 1
    input_query_class = input_query_class.tile([1, 2 * num_group])
    input_query_bbox = input_query_bbox.tile([1, 2 * num_group, 1])
    pad_gt_mask = pad_gt_mask.tile([1, 2 * num_group])
    negative_gt_mask = torch.zeros([bs, max_gt_num * 2, 1], device=device)
    negative_gt_mask[:, max_gt_num:] = 1
    negative_gt_mask = negative_gt_mask.tile([1, num_group, 1])
    positive_gt_mask = 1 - negative_gt_mask
    positive_gt_mask = positive_gt_mask.squeeze(-1) * pad_gt_mask
    dn_positive_idx = torch.nonzero(positive_gt_mask)[:, 1]
    dn_positive_idx = torch.split(dn_positive_idx, [n * num_group for n in num_gts])
    num_denoising = int(max_gt_num * 2 * num_group)
    if label_noise_ratio > 0:
        mask = torch.rand_like(input_query_class, dtype=torch.float) < (label_noise_ratio * 0.5)
        new_label = torch.randint_like(mask, 0, num_classes, dtype=input_query_class.dtype)
        input_query_class = torch.where(mask & pad_gt_mask, new_label, input_query_class)
    if box_noise_scale > 0:
        x_c, y_c, w, h = input_query_bbox.unbind(-1)
        known_bbox = torch.stack([x_c - 0.5 * w, y_c - 0.5 * h, x_c + 0.5 * w, y_c + 0.5 * h], dim=-1)
        diff = torch.tile(input_query_bbox[..., 2:] * 0.5, [1, 1, 2]) * box_noise_scale
        rand_sign = torch.randint_like(input_query_bbox, 0, 2) * 2.0 - 1.0
        rand_part = torch.rand_like(input_query_bbox)
        rand_part = (rand_part + 1.0) * negative_gt_mask + rand_part * (1 - negative_gt_mask)
        known_bbox += rand_sign * rand_part * diff
        known_bbox = torch.clip(known_bbox, min=0.0, max=1.0)
        x0, y0, x1, y1 = known_bbox.unbind(-1)
        input_query_bbox = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
        if dfine:
            input_query_bbox[input_query_bbox < 0] *= -1
        x = input_query_bbox.clip(min=0.0, max=1.0)
        input_query_bbox_unact = torch.log(x.clip(min=1e-5) / (1 - x).clip(min=1e-5))
    input_query_logits = class_embed(input_query_class)
    tgt_size = num_denoising + num_queries
    attn_mask = torch.full([tgt_size, tgt_size], False, dtype=torch.bool, device=device)
    attn_mask[num_denoising:, :num_denoising] = True
    for i in range(num_group):
        rows = slice(max_gt_num * 2 * i, max_gt_num * 2 * (i + 1))
        if i == 0:
            attn_mask[rows, max_gt_num * 2 * (i + 1) : num_denoising] = True
        if i == num_group - 1:
            attn_mask[rows, : max_gt_num * i * 2] = True
        else:
            attn_mask[rows, max_gt_num * 2 * (i + 1) : num_denoising] = True
            attn_mask[rows, : max_gt_num * 2 * i] = True
    dn_meta = {
        "dn_positive_idx": dn_positive_idx,
        "dn_num_group": num_group,
        "dn_num_split": [num_denoising, num_queries],
    }
    return input_query_logits, input_query_bbox_unact, attn_mask, dn_meta


# ultralytics' multi_scale_deformable_attn_pytorch before 8.4 (ultralytics 8.3.250 from PyPI,
# ultralytics/nn/modules/utils.py; the rank-6 layout, one grid_sample per level) is RT-DETR v1's function line for
# line: the same splits, grids and weighted sum; it ends in .transpose(1, 2).contiguous() where RT-DETR returns the
# transposed view, the same values.


ultralytics_83_multi_scale_deformable_attn_pytorch = rtdetr_deformable_attention_core_func
