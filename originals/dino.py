# Transcribed, and modified as the docstring says, from IDEA-Research/DINO faa8520fe9604c23ad65a48bc583550a44c0e3ab:
# models/dino/dn_components.py.
# DINO: Copyright (c) 2022 IDEA. All Rights Reserved. DN-DETR: Copyright (c) 2022 IDEA. All Rights Reserved.
# Licensed under the Apache License, Version 2.0: LICENSE at the root of this repository (the upstream's licence).
"""DINO's ``prepare_for_cdn``, re-written device-agnostic: the oracle of dnops.compat.dino's tests and the
benchmarks' baseline.

Differences every function shares: ``.cuda()`` / ``.to('cuda')`` become the inputs' device, and Python ints
stand where the original sums one-element tensors; any other difference is in the function's docstring."""

from __future__ import annotations

import torch

from originals.dn_detr import _inverse_sigmoid, _padded_layout, dn_detr_group_mask


def dino_prepare_for_cdn(dn_args, training, num_queries, num_classes, hidden_dim, label_enc):
    """DINO's prepare_for_cdn (IDEA-Research/DINO faa8520, models/dino/dn_components.py): (input_query_label
    (B, pad, C), input_query_bbox (B, pad, 4), attn_mask, dn_meta).

    ``label_enc=None`` stops at the generation and the mask, as in dn_detr_prepare_for_dn."""
    if not training:
        return None, None, None, None
    targets, dn_number, label_noise_ratio, box_noise_scale = dn_args
    device = targets[0]["labels"].device if label_enc is None else label_enc.weight.device
    dn_number = dn_number * 2
    known = [torch.ones_like(t["labels"]) for t in targets]
    batch_size = len(known)
    known_num = [sum(k) for k in known]
    if int(max(known_num)) == 0:
        dn_number = 1
    elif dn_number >= 100:
        dn_number = dn_number // int(max(known_num) * 2)
    elif dn_number < 1:
        dn_number = 1
    if dn_number == 0:
        dn_number = 1
    labels = torch.cat([t["labels"] for t in targets])
    boxes = torch.cat([t["boxes"] for t in targets])
    batch_idx = torch.cat([torch.full_like(t["labels"].long(), i) for i, t in enumerate(targets)])
    known_labels = labels.repeat(2 * dn_number, 1).view(-1)
    known_bid = batch_idx.repeat(2 * dn_number, 1).view(-1)
    known_bboxs = boxes.repeat(2 * dn_number, 1)
    noised_labels = known_labels.clone()
    noised_boxes = known_bboxs.clone()
    if label_noise_ratio > 0:
        p = torch.rand_like(noised_labels.float())
        chosen = torch.nonzero(p < label_noise_ratio * 0.5).view(-1)
        noised_labels.scatter_(0, chosen, torch.randint_like(chosen, 0, num_classes))
    single_pad = int(max(known_num))
    pad_size = int(single_pad * 2 * dn_number)
    positive_idx = torch.tensor(range(len(boxes)), device=device).long().unsqueeze(0).repeat(dn_number, 1)
    positive_idx += (torch.tensor(range(dn_number), device=device) * len(boxes) * 2).long().unsqueeze(1)
    negative_idx = positive_idx.flatten() + len(boxes)
    if box_noise_scale > 0:
        xyxy = torch.zeros_like(known_bboxs)
        xyxy[:, :2] = known_bboxs[:, :2] - known_bboxs[:, 2:] / 2
        xyxy[:, 2:] = known_bboxs[:, :2] + known_bboxs[:, 2:] / 2
        diff = torch.zeros_like(known_bboxs)
        diff[:, :2] = known_bboxs[:, 2:] / 2
        diff[:, 2:] = known_bboxs[:, 2:] / 2
        sign = torch.randint_like(known_bboxs, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
        part = torch.rand_like(known_bboxs)
        part[negative_idx] += 1.0
        part *= sign
        xyxy = (xyxy + torch.mul(part, diff) * box_noise_scale).clamp(min=0.0, max=1.0)
        noised_boxes[:, :2] = (xyxy[:, :2] + xyxy[:, 2:]) / 2
        noised_boxes[:, 2:] = xyxy[:, 2:] - xyxy[:, :2]
    if label_enc is None:
        label_embed, bbox_embed, input_query_label, input_query_bbox = _padded_layout(
            noised_labels, noised_boxes, batch_size, pad_size, num_classes
        )
    else:
        label_embed = label_enc(noised_labels.long())
        bbox_embed = _inverse_sigmoid(noised_boxes)
        input_query_label = torch.zeros(pad_size, hidden_dim, device=device).repeat(batch_size, 1, 1)
        input_query_bbox = torch.zeros(pad_size, 4, device=device).repeat(batch_size, 1, 1)
    map_known = torch.tensor([], device=device)
    if len(known_num):
        map_known = torch.cat([torch.tensor(range(num)) for num in known_num])
        map_known = torch.cat([map_known + single_pad * i for i in range(2 * dn_number)]).long().to(device)
    if len(known_bid):
        input_query_label[(known_bid.long(), map_known)] = label_embed
        input_query_bbox[(known_bid.long(), map_known)] = bbox_embed
    attn_mask = dn_detr_group_mask(pad_size, single_pad * 2, dn_number, pad_size + num_queries, device)
    return input_query_label, input_query_bbox, attn_mask, {"pad_size": pad_size, "num_dn_group": dn_number}
