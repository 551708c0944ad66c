"""The DN-DETR and DINO denoising-query algorithms as published (their step sequence: per-image Python lists,
nonzero, repeat, scatter, per-group mask slicing), re-written device-agnostic, and the real-time DETRs'
deformable-attention functions. The oracle of the dnops.compat adapter tests and the baseline of the benchmarks.

Each function names the repository, commit and file it transcribes; each was read against that file line by line
(docs/testing.md, "Transcriptions"). Differences every function shares: ``.cuda()`` / ``.to('cuda')`` become the
inputs' device, and Python ints stand where the original sums one-element tensors; any other difference is in the
function's docstring."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def rtdetr_get_contrastive_denoising_training_group(
    targets, num_classes, num_queries, class_embed, num_denoising=100, label_noise_ratio=0.5, box_noise_scale=1.0
):
    """RT-DETR v2's get_contrastive_denoising_training_group (lyuwenyu/RT-DETR 068dfde,
    rtdetrv2_pytorch/src/zoo/rtdetr/denoising.py), with its box_ops and inverse_sigmoid (eps 1e-5) inlined. A
    batch without GT gets one dummy group. With box_noise_scale <= 0 it raises UnboundLocalError, as the original."""
    return _contrastive_group(
        targets, num_classes, num_queries, class_embed, num_denoising, label_noise_ratio, box_noise_scale, False
    )


def dfine_get_contrastive_denoising_training_group(
    targets, num_classes, num_queries, class_embed, num_denoising=100, label_noise_ratio=0.5, box_noise_scale=1.0
):
    """D-FINE's get_contrastive_denoising_training_group (Peterande/D-FINE 4a1f73a, src/zoo/dfine/denoising.py; DEIM's
    engine/deim/denoising.py at a9aa4ad is the same code): RT-DETR v2's up to a batch without GT, which returns
    (None, None, None, dn_meta), and the noised boxes' negative values turned positive before inverse_sigmoid."""
    return _contrastive_group(
        targets, num_classes, num_queries, class_embed, num_denoising, label_noise_ratio, box_noise_scale, True
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


# ---- detrex (IDEA-Research/detrex e244e6c3da3e84566728c52c21fb061d23ce0e2f) -----------------------------------------
# Checked against the repository's files by comparing the syntax trees (docstrings aside): identical except the
# `.cuda()` / `.to("cuda")` calls, which take the inputs' device here.


def detrex_apply_label_noise(
    labels: torch.Tensor,
    label_noise_prob: float = 0.2,
    num_classes: int = 80,
):
    """detrex/layers/denoising.py::apply_label_noise (detrex e244e6c3da3e84566728c52c21fb061d23ce0e2f). Verbatim
    (the original has no device-specific calls).  NOTE: ``labels`` is modified in place (scatter_).
    """
    if label_noise_prob > 0:
        p = torch.rand_like(labels.float())
        noised_index = torch.nonzero(p < label_noise_prob).view(-1)
        new_lebels = torch.randint_like(noised_index, 0, num_classes)
        noised_labels = labels.scatter_(0, noised_index, new_lebels)
        return noised_labels
    else:
        return labels


def detrex_apply_box_noise(
    boxes: torch.Tensor,
    box_noise_scale: float = 0.4,
):
    """detrex/layers/denoising.py::apply_box_noise (detrex e244e6c3da3e84566728c52c21fb061d23ce0e2f). Verbatim.
    NOTE: ``boxes += ...`` modifies the input in place before the (out-of-place) clamp.
    """
    if box_noise_scale > 0:
        diff = torch.zeros_like(boxes)
        diff[:, :2] = boxes[:, 2:] / 2
        diff[:, 2:] = boxes[:, 2:]
        boxes += torch.mul((torch.rand_like(boxes) * 2 - 1.0), diff) * box_noise_scale
        boxes = boxes.clamp(min=0.0, max=1.0)
    return boxes


class DetrexGenerateDNQueries(nn.Module):
    """detrex/layers/denoising.py::GenerateDNQueries (detrex e244e6c3da3e84566728c52c21fb061d23ce0e2f).

    No difference: the original takes its inputs' device (no ``.cuda()``). state_dict: ``label_encoder.weight``,
    (num_classes, label_embed_dim - 1) if with_indicator else (num_classes, label_embed_dim).
    """

    def __init__(
        self,
        num_queries: int = 300,
        num_classes: int = 80,
        label_embed_dim: int = 256,
        denoising_groups: int = 5,
        label_noise_prob: float = 0.2,
        box_noise_scale: float = 0.4,
        with_indicator: bool = False,
    ):
        super().__init__()
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.label_embed_dim = label_embed_dim
        self.denoising_groups = denoising_groups
        self.label_noise_prob = label_noise_prob
        self.box_noise_scale = box_noise_scale
        self.with_indicator = with_indicator

        # leave one dim for indicator mentioned in DN-DETR
        if with_indicator:
            self.label_encoder = nn.Embedding(num_classes, label_embed_dim - 1)
        else:
            self.label_encoder = nn.Embedding(num_classes, label_embed_dim)

    def generate_query_masks(self, max_gt_num_per_image, device):
        noised_query_nums = max_gt_num_per_image * self.denoising_groups
        tgt_size = noised_query_nums + self.num_queries
        attn_mask = torch.ones(tgt_size, tgt_size).to(device) < 0
        # match query cannot see the reconstruct
        attn_mask[noised_query_nums:, :noised_query_nums] = True
        for i in range(self.denoising_groups):
            if i == 0:
                attn_mask[
                    max_gt_num_per_image * i : max_gt_num_per_image * (i + 1),
                    max_gt_num_per_image * (i + 1) : noised_query_nums,
                ] = True
            if i == self.denoising_groups - 1:
                attn_mask[
                    max_gt_num_per_image * i : max_gt_num_per_image * (i + 1),
                    : max_gt_num_per_image * i,
                ] = True
            else:
                attn_mask[
                    max_gt_num_per_image * i : max_gt_num_per_image * (i + 1),
                    max_gt_num_per_image * (i + 1) : noised_query_nums,
                ] = True
                attn_mask[
                    max_gt_num_per_image * i : max_gt_num_per_image * (i + 1),
                    : max_gt_num_per_image * i,
                ] = True
        return attn_mask

    def forward(
        self,
        gt_labels_list,
        gt_boxes_list,
    ):
        # concat ground truth labels and boxes in one batch
        gt_labels = torch.cat(gt_labels_list)
        gt_boxes = torch.cat(gt_boxes_list)

        # repeat the original ground truth labels and boxes (group-major)
        gt_labels = gt_labels.repeat(self.denoising_groups, 1).flatten()
        gt_boxes = gt_boxes.repeat(self.denoising_groups, 1)

        # set the device as "gt_labels"
        device = gt_labels.device
        assert len(gt_labels_list) == len(gt_boxes_list)

        batch_size = len(gt_labels_list)

        gt_nums_per_image = [x.numel() for x in gt_labels_list]

        # Add noise on labels and boxes
        noised_labels = detrex_apply_label_noise(gt_labels, self.label_noise_prob, self.num_classes)
        noised_boxes = detrex_apply_box_noise(gt_boxes, self.box_noise_scale)
        noised_boxes = _inverse_sigmoid(noised_boxes)

        # encoding labels
        label_embedding = self.label_encoder(noised_labels)
        query_num = label_embedding.shape[0]

        # add indicator to label encoding if with_indicator == True
        if self.with_indicator:
            label_embedding = torch.cat([label_embedding, torch.ones([query_num, 1]).to(device)], 1)

        max_gt_num_per_image = max(gt_nums_per_image)

        noised_query_nums = max_gt_num_per_image * self.denoising_groups

        noised_label_queries = torch.zeros(noised_query_nums, self.label_embed_dim).to(device).repeat(batch_size, 1, 1)
        noised_box_queries = torch.zeros(noised_query_nums, 4).to(device).repeat(batch_size, 1, 1)

        # batch index per image: [0, 1, 2, 3] for batch_size == 4   (CPU tensor, as in the original)
        batch_idx = torch.arange(0, batch_size)

        batch_idx_per_instance = torch.repeat_interleave(batch_idx, torch.tensor(gt_nums_per_image).long())

        batch_idx_per_group = batch_idx_per_instance.repeat(self.denoising_groups, 1).flatten()

        if len(gt_nums_per_image):
            valid_index_per_group = torch.cat([torch.tensor(list(range(num))) for num in gt_nums_per_image])
            valid_index_per_group = torch.cat(
                [valid_index_per_group + max_gt_num_per_image * i for i in range(self.denoising_groups)]
            ).long()
        if len(batch_idx_per_group):
            noised_label_queries[(batch_idx_per_group, valid_index_per_group)] = label_embedding
            noised_box_queries[(batch_idx_per_group, valid_index_per_group)] = noised_boxes

        # generate attention masks for transformer layers
        attn_mask = self.generate_query_masks(max_gt_num_per_image, device)

        return (
            noised_label_queries,
            noised_box_queries,
            attn_mask,
            self.denoising_groups,
            max_gt_num_per_image,
        )


def detrex_set_aux_loss(outputs_class, outputs_coord):
    """detrex DNDETR._set_aux_loss / DINO._set_aux_loss (identical bodies), for use as ``self._set_aux_loss``."""
    return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1], strict=False)]


def detrex_prepare_for_cdn(
    self,
    targets,
    dn_number,
    label_noise_ratio,
    box_noise_scale,
    num_queries,
    num_classes,
    hidden_dim,
    label_enc,
):
    """projects/dino/modeling/dino.py::DINO.prepare_for_cdn (detrex e244e6c3da3e84566728c52c21fb061d23ce0e2f),
    as a plain function with the method's exact signature.  ``self`` is accepted but never read (the original
    method does not touch ``self`` either; pass anything, e.g. None).  Everything comes in as explicit args;
    ``label_enc`` is the nn.Embedding (detrex: nn.Embedding(num_classes, embed_dim)).

    Differences from the original: the 9 ``.cuda()`` / ``.to("cuda")`` calls become ``.to(device)`` with
    ``device = targets[0]["labels"].device`` (fallback CPU for an empty batch, where the original raises the same
    ``ValueError`` from ``max([])`` a few lines later).  No other difference.
    """
    if dn_number <= 0:
        return None, None, None, None
        # positive and negative dn queries
    device = targets[0]["labels"].device if len(targets) else torch.device("cpu")  # [transcription] for .cuda()
    dn_number = dn_number * 2
    known = [(torch.ones_like(t["labels"])).to(device) for t in targets]
    batch_size = len(known)
    known_num = [sum(k) for k in known]
    if int(max(known_num)) == 0:
        return None, None, None, None

    dn_number = dn_number // (int(max(known_num) * 2))

    if dn_number == 0:
        dn_number = 1
    unmask_bbox = unmask_label = torch.cat(known)
    labels = torch.cat([t["labels"] for t in targets])
    boxes = torch.cat([t["boxes"] for t in targets])
    batch_idx = torch.cat([torch.full_like(t["labels"].long(), i) for i, t in enumerate(targets)])

    known_indice = torch.nonzero(unmask_label + unmask_bbox)
    known_indice = known_indice.view(-1)

    known_indice = known_indice.repeat(2 * dn_number, 1).view(-1)
    known_labels = labels.repeat(2 * dn_number, 1).view(-1)
    known_bid = batch_idx.repeat(2 * dn_number, 1).view(-1)
    known_bboxs = boxes.repeat(2 * dn_number, 1)
    known_labels_expaned = known_labels.clone()
    known_bbox_expand = known_bboxs.clone()

    if label_noise_ratio > 0:
        p = torch.rand_like(known_labels_expaned.float())
        chosen_indice = torch.nonzero(p < (label_noise_ratio * 0.5)).view(-1)  # half of bbox prob
        new_label = torch.randint_like(chosen_indice, 0, num_classes)  # randomly put a new one here
        known_labels_expaned.scatter_(0, chosen_indice, new_label)
    single_padding = int(max(known_num))

    pad_size = int(single_padding * 2 * dn_number)
    positive_idx = torch.tensor(range(len(boxes))).long().to(device).unsqueeze(0).repeat(dn_number, 1)
    positive_idx += (torch.tensor(range(dn_number)) * len(boxes) * 2).long().to(device).unsqueeze(1)
    positive_idx = positive_idx.flatten()
    negative_idx = positive_idx + len(boxes)
    if box_noise_scale > 0:
        known_bbox_ = torch.zeros_like(known_bboxs)
        known_bbox_[:, :2] = known_bboxs[:, :2] - known_bboxs[:, 2:] / 2
        known_bbox_[:, 2:] = known_bboxs[:, :2] + known_bboxs[:, 2:] / 2

        diff = torch.zeros_like(known_bboxs)
        diff[:, :2] = known_bboxs[:, 2:] / 2
        diff[:, 2:] = known_bboxs[:, 2:] / 2

        rand_sign = torch.randint_like(known_bboxs, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
        rand_part = torch.rand_like(known_bboxs)
        rand_part[negative_idx] += 1.0
        rand_part *= rand_sign
        known_bbox_ = known_bbox_ + torch.mul(rand_part, diff).to(device) * box_noise_scale
        known_bbox_ = known_bbox_.clamp(min=0.0, max=1.0)
        known_bbox_expand[:, :2] = (known_bbox_[:, :2] + known_bbox_[:, 2:]) / 2
        known_bbox_expand[:, 2:] = known_bbox_[:, 2:] - known_bbox_[:, :2]

    m = known_labels_expaned.long().to(device)
    input_label_embed = label_enc(m)
    input_bbox_embed = _inverse_sigmoid(known_bbox_expand)

    padding_label = torch.zeros(pad_size, hidden_dim).to(device)
    padding_bbox = torch.zeros(pad_size, 4).to(device)

    input_query_label = padding_label.repeat(batch_size, 1, 1)
    input_query_bbox = padding_bbox.repeat(batch_size, 1, 1)

    map_known_indice = torch.tensor([]).to(device)
    if len(known_num):
        map_known_indice = torch.cat([torch.tensor(range(num)) for num in known_num])  # [1,2, 1,2,3]
        map_known_indice = torch.cat([map_known_indice + single_padding * i for i in range(2 * dn_number)]).long()
    if len(known_bid):
        input_query_label[(known_bid.long(), map_known_indice)] = input_label_embed
        input_query_bbox[(known_bid.long(), map_known_indice)] = input_bbox_embed

    tgt_size = pad_size + num_queries
    attn_mask = torch.ones(tgt_size, tgt_size).to(device) < 0
    # match query cannot see the reconstruct
    attn_mask[pad_size:, :pad_size] = True
    # reconstruct cannot see each other
    for i in range(dn_number):
        if i == 0:
            attn_mask[
                single_padding * 2 * i : single_padding * 2 * (i + 1),
                single_padding * 2 * (i + 1) : pad_size,
            ] = True
        if i == dn_number - 1:
            attn_mask[single_padding * 2 * i : single_padding * 2 * (i + 1), : single_padding * i * 2] = True
        else:
            attn_mask[
                single_padding * 2 * i : single_padding * 2 * (i + 1),
                single_padding * 2 * (i + 1) : pad_size,
            ] = True
            attn_mask[single_padding * 2 * i : single_padding * 2 * (i + 1), : single_padding * 2 * i] = True

    dn_meta = {
        "single_padding": single_padding * 2,
        "dn_num": dn_number,
    }

    return input_query_label, input_query_bbox, attn_mask, dn_meta


def detrex_dn_post_process(self, outputs_class, outputs_coord, dn_metas):
    """projects/dino/modeling/dino.py::DINO.dn_post_process (detrex e244e6c3...). Verbatim, as a plain function;
    ``self`` must provide ``aux_loss`` (bool) and ``_set_aux_loss`` (see ``set_aux_loss``).  No difference.
    """
    if dn_metas and dn_metas["single_padding"] > 0:
        padding_size = dn_metas["single_padding"] * dn_metas["dn_num"]
        output_known_class = outputs_class[:, :, :padding_size, :]
        output_known_coord = outputs_coord[:, :, :padding_size, :]
        outputs_class = outputs_class[:, :, padding_size:, :]
        outputs_coord = outputs_coord[:, :, padding_size:, :]

        out = {"pred_logits": output_known_class[-1], "pred_boxes": output_known_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(output_known_class, output_known_coord)
        dn_metas["output_known_lbs_bboxes"] = out
    return outputs_class, outputs_coord


# ---- MaskDINO (IDEA-Research/MaskDINO 3831d8514a3728535ace8d4ecc7d28044c42dd14) ------------------------------------
# Checked as detrex's above: identical except the `.cuda()` / `.to("cuda")` calls.


def maskdino_prepare_for_dn(self, targets, tgt, refpoint_emb, batch_size):
    """maskdino/modeling/transformer_decoder/maskdino_decoder.py::MaskDINODecoder.prepare_for_dn
    (IDEA-Research/MaskDINO @ 3831d8514a3728535ace8d4ecc7d28044c42dd14), as a plain function of ``self``.

    Differences from the original: the 7 ``.cuda()`` / ``.to('cuda')`` calls become ``.to(device)`` with
    ``device = targets[0]['labels'].device`` (computed only in the training branch; CPU fallback for an empty
    batch, which then raises the same ``ValueError`` from ``max([])`` as the original).  No other difference.
    """
    if self.training:
        scalar, noise_scale = self.dn_num, self.noise_scale
        device = targets[0]["labels"].device if len(targets) else torch.device("cpu")  # [transcription]

        known = [(torch.ones_like(t["labels"])).to(device) for t in targets]
        know_idx = [torch.nonzero(t) for t in known]
        known_num = [sum(k) for k in known]

        # use fix number of dn queries
        if max(known_num) > 0:
            scalar = scalar // (int(max(known_num)))
        else:
            scalar = 0
        if scalar == 0:
            input_query_label = None
            input_query_bbox = None
            attn_mask = None
            mask_dict = None
            return input_query_label, input_query_bbox, attn_mask, mask_dict

        # can be modified to selectively denosie some label or boxes; also known label prediction
        unmask_bbox = unmask_label = torch.cat(known)
        labels = torch.cat([t["labels"] for t in targets])
        boxes = torch.cat([t["boxes"] for t in targets])
        batch_idx = torch.cat([torch.full_like(t["labels"].long(), i) for i, t in enumerate(targets)])
        # known
        known_indice = torch.nonzero(unmask_label + unmask_bbox)
        known_indice = known_indice.view(-1)

        # noise
        known_indice = known_indice.repeat(scalar, 1).view(-1)
        known_labels = labels.repeat(scalar, 1).view(-1)
        known_bid = batch_idx.repeat(scalar, 1).view(-1)
        known_bboxs = boxes.repeat(scalar, 1)
        known_labels_expaned = known_labels.clone()
        known_bbox_expand = known_bboxs.clone()

        # noise on the label
        if noise_scale > 0:
            p = torch.rand_like(known_labels_expaned.float())
            chosen_indice = torch.nonzero(p < (noise_scale * 0.5)).view(-1)  # half of bbox prob
            new_label = torch.randint_like(chosen_indice, 0, self.num_classes)  # randomly put a new one here
            known_labels_expaned.scatter_(0, chosen_indice, new_label)
        if noise_scale > 0:
            diff = torch.zeros_like(known_bbox_expand)
            diff[:, :2] = known_bbox_expand[:, 2:] / 2
            diff[:, 2:] = known_bbox_expand[:, 2:]
            known_bbox_expand += (
                torch.mul((torch.rand_like(known_bbox_expand) * 2 - 1.0), diff).to(device) * noise_scale
            )
            known_bbox_expand = known_bbox_expand.clamp(min=0.0, max=1.0)

        m = known_labels_expaned.long().to(device)
        input_label_embed = self.label_enc(m)
        input_bbox_embed = _inverse_sigmoid(known_bbox_expand, eps=1e-5)  # maskdino/utils/utils.py: eps 1e-5
        single_pad = int(max(known_num))
        pad_size = int(single_pad * scalar)

        padding_label = torch.zeros(pad_size, self.hidden_dim).to(device)
        padding_bbox = torch.zeros(pad_size, 4).to(device)

        if refpoint_emb is not None:
            input_query_label = torch.cat([padding_label, tgt], dim=0).repeat(batch_size, 1, 1)
            input_query_bbox = torch.cat([padding_bbox, refpoint_emb], dim=0).repeat(batch_size, 1, 1)
        else:
            input_query_label = padding_label.repeat(batch_size, 1, 1)
            input_query_bbox = padding_bbox.repeat(batch_size, 1, 1)

        # map
        map_known_indice = torch.tensor([]).to(device)
        if len(known_num):
            map_known_indice = torch.cat([torch.tensor(range(num)) for num in known_num])  # [1,2, 1,2,3]
            map_known_indice = torch.cat([map_known_indice + single_pad * i for i in range(scalar)]).long()
        if len(known_bid):
            input_query_label[(known_bid.long(), map_known_indice)] = input_label_embed
            input_query_bbox[(known_bid.long(), map_known_indice)] = input_bbox_embed

        tgt_size = pad_size + self.num_queries
        attn_mask = torch.ones(tgt_size, tgt_size).to(device) < 0
        # match query cannot see the reconstruct
        attn_mask[pad_size:, :pad_size] = True
        # reconstruct cannot see each other
        for i in range(scalar):
            if i == 0:
                attn_mask[single_pad * i : single_pad * (i + 1), single_pad * (i + 1) : pad_size] = True
            if i == scalar - 1:
                attn_mask[single_pad * i : single_pad * (i + 1), : single_pad * i] = True
            else:
                attn_mask[single_pad * i : single_pad * (i + 1), single_pad * (i + 1) : pad_size] = True
                attn_mask[single_pad * i : single_pad * (i + 1), : single_pad * i] = True
        mask_dict = {
            "known_indice": torch.as_tensor(known_indice).long(),
            "batch_idx": torch.as_tensor(batch_idx).long(),
            "map_known_indice": torch.as_tensor(map_known_indice).long(),
            "known_lbs_bboxes": (known_labels, known_bboxs),
            "know_idx": know_idx,
            "pad_size": pad_size,
            "scalar": scalar,
        }
    else:
        if refpoint_emb is not None:
            input_query_label = tgt.repeat(batch_size, 1, 1)
            input_query_bbox = refpoint_emb.repeat(batch_size, 1, 1)
        else:
            input_query_label = None
            input_query_bbox = None
        attn_mask = None
        mask_dict = None

    # 100*batch*256
    if input_query_bbox is not None:
        input_query_label = input_query_label
        input_query_bbox = input_query_bbox

    return input_query_label, input_query_bbox, attn_mask, mask_dict


def maskdino_dn_post_process(self, outputs_class, outputs_coord, mask_dict, outputs_mask):
    """maskdino/modeling/transformer_decoder/maskdino_decoder.py::MaskDINODecoder.dn_post_process
    (IDEA-Research/MaskDINO @ 3831d8514a3728535ace8d4ecc7d28044c42dd14), as a plain function of ``self``
    (reads only ``self._set_aux_loss``).  Verbatim; no device calls in the original.  As in the original,
    ``outputs_mask=None`` raises UnboundLocalError on ``output_known_mask``.
    """
    assert mask_dict["pad_size"] > 0
    output_known_class = outputs_class[:, :, : mask_dict["pad_size"], :]
    outputs_class = outputs_class[:, :, mask_dict["pad_size"] :, :]
    output_known_coord = outputs_coord[:, :, : mask_dict["pad_size"], :]
    outputs_coord = outputs_coord[:, :, mask_dict["pad_size"] :, :]
    if outputs_mask is not None:
        output_known_mask = outputs_mask[:, :, : mask_dict["pad_size"], :]
        outputs_mask = outputs_mask[:, :, mask_dict["pad_size"] :, :]
    out = {
        "pred_logits": output_known_class[-1],
        "pred_boxes": output_known_coord[-1],
        "pred_masks": output_known_mask[-1],
    }

    out["aux_outputs"] = self._set_aux_loss(output_known_class, output_known_mask, output_known_coord)
    mask_dict["output_known_lbs_bboxes"] = out
    return outputs_class, outputs_coord, outputs_mask


def maskdino_set_aux_loss(outputs_class, outputs_seg_masks, out_boxes=None):
    """MaskDINODecoder._set_aux_loss (MaskDINO 3831d851...), verbatim minus ``self``; use as ``self._set_aux_loss``."""
    if out_boxes is None:
        return [
            {"pred_logits": a, "pred_masks": b}
            for a, b in zip(outputs_class[:-1], outputs_seg_masks[:-1], strict=False)
        ]
    else:
        return [
            {"pred_logits": a, "pred_masks": b, "pred_boxes": c}
            for a, b, c in zip(outputs_class[:-1], outputs_seg_masks[:-1], out_boxes[:-1], strict=False)
        ]
