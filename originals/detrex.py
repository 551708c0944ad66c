# Transcribed, and modified as the docstrings say, from IDEA-Research/detrex e244e6c3da3e84566728c52c21fb061d23ce0e2f:
# detrex/layers/denoising.py, projects/dino/modeling/dino.py, projects/dn_detr/modeling/dn_detr.py.
# Copyright 2022 The IDEA Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0: LICENSE at the root of this repository (the upstream's licence).
"""detrex's ``GenerateDNQueries`` and its DINO projects' ``prepare_for_cdn`` / ``dn_post_process``, re-written
device-agnostic: the oracle of dnops.compat.detrex's tests and the benchmarks' baseline. Checked against the
repository's functions as syntax trees: they differ only in the ``.cuda()`` calls.

Differences every function shares: ``.cuda()`` / ``.to('cuda')`` become the inputs' device, and Python ints
stand where the original sums one-element tensors; any other difference is in the function's docstring."""

from __future__ import annotations

import torch
from torch import nn

from originals.dn_detr import _inverse_sigmoid


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
