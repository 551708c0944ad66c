# Transcribed, and modified as the docstring says, from IDEA-Research/DN-DETR ff3902a20d521ead052d1243ff249b19bc1ce531:
# models/DN_DAB_DETR, models/dn_dab_deformable_detr, models/dn_dab_deformable_detr_deformable_encoder_only and
# models/dn_dab_dino_deformable_detr: dn_components.py.
# DN-DETR: Copyright (c) 2022 IDEA. All Rights Reserved.
# Licensed under the Apache License, Version 2.0: LICENSE at the root of this repository (the upstream's licence).
"""DN-DETR's ``prepare_for_dn`` (its four models' variants) and ``prepare_for_loss``, re-written device-agnostic:
the oracle of dnops.compat.dn_detr's tests and the benchmarks' baseline.

Differences every function shares: ``.cuda()`` / ``.to('cuda')`` become the inputs' device, and Python ints
stand where the original sums one-element tensors; any other difference is in the function's docstring."""

from __future__ import annotations

import torch


def _inverse_sigmoid(x, eps=1e-3):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _padded_layout(noised_labels, noised_boxes, batch_size, pad_size, num_classes):
    """The ending without label_enc: the noised GT and the (B, pad) / (B, pad, 4) tensors of dnops.dn_queries'
    padded layout (padding label num_classes, box 0.5) that it is scattered into instead of the embeddings."""
    device = noised_boxes.device
    labels = torch.full((batch_size, pad_size), num_classes, dtype=torch.long, device=device)
    return noised_labels.long(), noised_boxes, labels, torch.full((batch_size, pad_size, 4), 0.5, device=device)


def dn_detr_group_mask(pad_size: int, single_pad: int, groups: int, tgt_size: int, device=None) -> torch.Tensor:
    """DN-DETR's mask: matching rows block the DN part, each group's rows block every other group."""
    mask = torch.zeros(tgt_size, tgt_size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    for i in range(groups):
        rows = slice(single_pad * i, single_pad * (i + 1))
        if i == 0:
            mask[rows, single_pad * (i + 1) : pad_size] = True
        if i == groups - 1:
            mask[rows, : single_pad * i] = True
        else:
            mask[rows, single_pad * (i + 1) : pad_size] = True
            mask[rows, : single_pad * i] = True
    return mask


def dn_detr_prepare_for_dn(dn_args, embedweight, batch_size, training, num_queries, num_classes, hidden_dim, label_enc):
    """DN-DETR's prepare_for_dn (IDEA-Research/DN-DETR ff3902a, models/DN_DAB_DETR/dn_components.py; the one of
    models/dn_dab_deformable_detr_deformable_encoder_only is the same): (input_query_label (W, B, C),
    input_query_bbox (W, B, 4), attn_mask, mask_dict).

    ``label_enc=None`` stops at the generation and the mask (what dnops.dn_queries + dnops.dn_attn_mask replace):
    the noised labels and boxes are scattered into the padded layout dnops.dn_queries returns, (B, pad) and
    (B, pad, 4) batch-first, instead of their embeddings into the query tensors."""
    device = embedweight.device
    num_patterns = max(dn_args[4] if training else dn_args, 1)
    tgt = refpoint_emb = None
    if label_enc is not None:
        indicator0 = torch.zeros([num_queries * num_patterns, 1], device=device)
        tgt = label_enc(torch.tensor(num_classes, device=device)).repeat(num_queries * num_patterns, 1)
        tgt = torch.cat([tgt, indicator0], dim=1)
        refpoint_emb = embedweight.repeat(num_patterns, 1)
    matching = num_queries * num_patterns
    out = _dn_detr_queries(
        dn_args, tgt, refpoint_emb, matching, batch_size, training, num_classes, hidden_dim, label_enc
    )
    if label_enc is None:
        return out
    return out[0].transpose(0, 1), out[1].transpose(0, 1), out[2], out[3]


def dn_deformable_detr_prepare_for_dn(
    dn_args, tgt_weight, embedweight, batch_size, training, num_queries, num_classes, hidden_dim, label_enc
):
    """DN-Deformable-DETR's prepare_for_dn (IDEA-Research/DN-DETR ff3902a,
    models/dn_dab_deformable_detr/dn_components.py): the matching part is the learned
    [tgt_weight | 0] (plus label_enc's first weight times 0, so label_enc is always in the graph) and the anchors
    embedweight as given; batch-first (B, W, C), (B, W, 4)."""
    num_patterns = max(dn_args[4] if training else dn_args, 1)
    indicator0 = torch.zeros([num_queries * num_patterns, 1], device=embedweight.device)
    tgt = torch.cat([tgt_weight, indicator0], dim=1) + label_enc.weight[0][0] * 0
    matching = num_queries * num_patterns
    return _dn_detr_queries(
        dn_args, tgt, embedweight, matching, batch_size, training, num_classes, hidden_dim, label_enc
    )


def dn_dino_deformable_detr_prepare_for_dn(
    dn_args, tgt_weight, embedweight, batch_size, training, num_queries, num_classes, hidden_dim, label_enc
):
    """DN-DETR's models/dn_dab_dino_deformable_detr prepare_for_dn (IDEA-Research/DN-DETR ff3902a,
    models/dn_dab_dino_deformable_detr/dn_components.py): dn_args with a contrastive flag, each image's GT extended
    by a copy labelled num_classes when contrastive, corner (xyxy) box noise, a scalar of 100 or more read as a DN
    query count, and no matching part without tgt_weight / embedweight. Batch-first.

    The negatives (far noise, label num_classes after the label noise) are the second half of each group's entries
    over the whole batch, as in the original. Differences: the original builds its negative indices inside the box
    noise branch, so with contrastive and box_noise_scale <= 0 it raises NameError; here they are built before it."""
    device = label_enc.weight.device
    num_patterns = max(dn_args[4] if training else dn_args, 1)
    tgt = refpoint_emb = None
    if tgt_weight is not None and embedweight is not None:
        indicator0 = torch.zeros([num_queries * num_patterns, 1], device=device)
        tgt = torch.cat([tgt_weight, indicator0], dim=1) + label_enc.weight[0][0] * 0
        refpoint_emb = embedweight
    if not training:
        if tgt is None:
            return None, None, None, None
        return tgt.repeat(batch_size, 1, 1), refpoint_emb.repeat(batch_size, 1, 1), None, None
    targets, scalar, label_noise_scale, box_noise_scale, _, contrastive = dn_args
    if contrastive:
        targets = [
            {
                "labels": torch.cat([t["labels"], torch.full_like(t["labels"], num_classes)]),
                "boxes": torch.cat([t["boxes"], t["boxes"]]),
            }
            for t in targets
        ]
    known = [torch.ones_like(t["labels"]) for t in targets]
    know_idx = [torch.nonzero(t) for t in known]
    known_num = [int(sum(k)) for k in known]
    if max(known_num) == 0:
        scalar = 1
    elif scalar >= 100:
        scalar = scalar // max(known_num)
    scalar = max(scalar, 1)
    labels, boxes, batch_idx, known_indice, known_bid, known_labels, known_bboxs, noised_labels = _repeat_targets(
        targets, known, scalar, label_noise_scale, num_classes
    )
    noised_boxes = known_bboxs.clone()
    if contrastive:
        # the negatives: the second half of each group's entries over the whole concatenated batch (not each
        # image's copies), as the original indexes them
        positive_idx = (torch.arange(len(boxes) // 2)[None, :] + (torch.arange(scalar) * len(boxes))[:, None]).flatten()
        negative_idx = (positive_idx + len(boxes) // 2).to(device)
    if box_noise_scale > 0:
        xyxy = torch.cat([known_bboxs[:, :2] - known_bboxs[:, 2:] / 2, known_bboxs[:, :2] + known_bboxs[:, 2:] / 2], 1)
        diff = torch.cat([known_bboxs[:, 2:] / 2, known_bboxs[:, 2:] / 2], 1)
        if contrastive:
            sign = torch.randint_like(noised_boxes, 0, 2) * 2.0 - 1.0
            part = torch.rand_like(noised_boxes)
            part[negative_idx] += 1.0
            xyxy = xyxy + part * sign * diff * box_noise_scale
        else:
            xyxy = xyxy + (torch.rand_like(noised_boxes) * 2 - 1.0) * diff * box_noise_scale
        xyxy = xyxy.clamp(0.0, 1.0)
        noised_boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    if contrastive:
        noised_labels.scatter_(0, negative_idx, num_classes)
    label_embed = label_enc(noised_labels.long())
    label_embed = torch.cat([label_embed, torch.ones([label_embed.shape[0], 1], device=device)], dim=1)
    bbox_embed = _inverse_sigmoid(noised_boxes)
    single_pad = max(known_num)
    pad_size = single_pad * scalar
    input_query_label = torch.zeros(pad_size, hidden_dim, device=device)
    input_query_bbox = torch.zeros(pad_size, 4, device=device)
    if tgt is not None:
        input_query_label = torch.cat([input_query_label, tgt])
        input_query_bbox = torch.cat([input_query_bbox, refpoint_emb])
    input_query_label = input_query_label.repeat(batch_size, 1, 1)
    input_query_bbox = input_query_bbox.repeat(batch_size, 1, 1)
    map_known = torch.cat([torch.arange(n) for n in known_num])
    map_known = torch.cat([map_known + single_pad * i for i in range(scalar)]).long().to(device)
    input_query_label[(known_bid.long(), map_known)] = label_embed
    input_query_bbox[(known_bid.long(), map_known)] = bbox_embed
    attn_mask = dn_detr_group_mask(pad_size, single_pad, scalar, pad_size + num_queries * num_patterns, device)
    mask_dict = {
        "known_indice": known_indice.long(),
        "batch_idx": batch_idx.long(),
        "map_known_indice": map_known,
        "known_lbs_bboxes": (known_labels, known_bboxs),
        "know_idx": know_idx,
        "pad_size": pad_size,
        "scalar": scalar,
        "contrastive": contrastive,
    }
    return input_query_label, input_query_bbox, attn_mask, mask_dict


def _repeat_targets(targets, known, scalar, label_noise_scale, num_classes):
    """DN-DETR's common start: the GT concatenated, their indices and images repeated once per group, and the
    labels flipped with probability label_noise_scale to a uniform class. (labels, boxes, batch_idx,
    known_indice, known_bid, known_labels, known_bboxs, noised_labels)."""
    labels = torch.cat([t["labels"] for t in targets])
    boxes = torch.cat([t["boxes"] for t in targets])
    batch_idx = torch.cat([torch.full_like(t["labels"].long(), i) for i, t in enumerate(targets)])
    known_indice = torch.nonzero(torch.cat(known)).view(-1).repeat(scalar, 1).view(-1)
    known_bid = batch_idx.repeat(scalar, 1).view(-1)
    known_labels = labels.repeat(scalar, 1).view(-1)
    known_bboxs = boxes.repeat(scalar, 1)
    noised_labels = known_labels.clone()
    if label_noise_scale > 0:
        chosen = torch.nonzero(torch.rand_like(noised_labels.float()) < label_noise_scale).view(-1)
        noised_labels.scatter_(0, chosen, torch.randint_like(chosen, 0, num_classes))
    return labels, boxes, batch_idx, known_indice, known_bid, known_labels, known_bboxs, noised_labels


def _dn_detr_queries(dn_args, tgt, refpoint_emb, matching, batch_size, training, num_classes, hidden_dim, label_enc):
    """The generation, layout and mask both DN-DETR variants share, batch-first; tgt / refpoint_emb: the matching
    part's content and anchors (None with label_enc None), ``matching`` queries of them."""
    if not training:
        return tgt.repeat(batch_size, 1, 1), refpoint_emb.repeat(batch_size, 1, 1), None, None
    targets, scalar, label_noise_scale, box_noise_scale, _ = dn_args
    device = refpoint_emb.device if refpoint_emb is not None else targets[0]["labels"].device
    known = [torch.ones_like(t["labels"]) for t in targets]
    know_idx = [torch.nonzero(t) for t in known]
    known_num = [sum(k) for k in known]
    _, _, batch_idx, known_indice, known_bid, known_labels, known_bboxs, noised_labels = _repeat_targets(
        targets, known, scalar, label_noise_scale, num_classes
    )
    noised_boxes = known_bboxs.clone()
    if box_noise_scale > 0:
        diff = torch.zeros_like(noised_boxes)
        diff[:, :2] = noised_boxes[:, 2:] / 2
        diff[:, 2:] = noised_boxes[:, 2:]
        noised_boxes += torch.mul(torch.rand_like(noised_boxes) * 2 - 1.0, diff) * box_noise_scale
        noised_boxes = noised_boxes.clamp(min=0.0, max=1.0)
    single_pad = int(max(known_num)) if known_num else 0
    pad_size = int(single_pad * scalar)
    if label_enc is None:
        label_embed, bbox_embed, input_query_label, input_query_bbox = _padded_layout(
            noised_labels, noised_boxes, batch_size, pad_size, num_classes
        )
    else:
        label_embed = label_enc(noised_labels.long())
        label_embed = torch.cat([label_embed, torch.ones([label_embed.shape[0], 1], device=device)], dim=1)
        bbox_embed = _inverse_sigmoid(noised_boxes)
        input_query_label = torch.cat([torch.zeros(pad_size, hidden_dim, device=device), tgt]).repeat(batch_size, 1, 1)
        input_query_bbox = torch.cat([torch.zeros(pad_size, 4, device=device), refpoint_emb]).repeat(batch_size, 1, 1)
    map_known = torch.tensor([], device=device)
    if len(known_num):
        map_known = torch.cat([torch.tensor(range(num)) for num in known_num])
        map_known = torch.cat([map_known + single_pad * i for i in range(scalar)]).long().to(device)
    if len(known_bid):
        input_query_label[(known_bid.long(), map_known)] = label_embed
        input_query_bbox[(known_bid.long(), map_known)] = bbox_embed
    attn_mask = dn_detr_group_mask(pad_size, single_pad, scalar, pad_size + matching, device)
    mask_dict = {
        "known_indice": known_indice.long(),
        "batch_idx": batch_idx.long(),
        "map_known_indice": map_known.long(),
        "known_lbs_bboxes": (known_labels, known_bboxs),
        "know_idx": know_idx,
        "pad_size": pad_size,
    }
    return input_query_label, input_query_bbox, attn_mask, mask_dict


def dn_dino_deformable_detr_prepare_for_loss(mask_dict):
    """DN-DETR's prepare_for_loss (IDEA-Research/DN-DETR ff3902a, models/dn_dab_dino_deformable_detr/dn_components.py),
    after dn_post_process put ``output_known_lbs_bboxes`` into mask_dict: (known_labels, known_bboxs,
    output_known_class, output_known_coord, num_tgt), the DN predictions paired with their targets. With
    contrastive, the box targets are the first half of each group's entries over the whole batch."""
    output_known_class, output_known_coord = mask_dict["output_known_lbs_bboxes"]
    known_labels, known_bboxs = mask_dict["known_lbs_bboxes"]
    map_known_indice = mask_dict["map_known_indice"]
    known_indice = mask_dict["known_indice"]
    batch_idx = mask_dict["batch_idx"]
    bid = batch_idx[known_indice]
    num_tgt = known_indice.numel()
    if len(output_known_class) > 0:
        output_known_class = output_known_class.permute(1, 2, 0, 3)[(bid, map_known_indice)].permute(1, 0, 2)
        output_known_coord = output_known_coord.permute(1, 2, 0, 3)[(bid, map_known_indice)].permute(1, 0, 2)
    if mask_dict["contrastive"]:
        scalar = mask_dict["scalar"]
        num_tgt = num_tgt // 2
        num_box = num_tgt // scalar
        positive_idx = torch.arange(num_box).unsqueeze(0).repeat(scalar, 1)
        positive_idx += (torch.arange(scalar) * num_box * 2).unsqueeze(1)
        positive_idx = positive_idx.flatten().to(known_bboxs.device)
        output_known_coord = output_known_coord[:, positive_idx, :]
        known_bboxs = known_bboxs[positive_idx, :]
    return known_labels, known_bboxs, output_known_class, output_known_coord, num_tgt
