# Transcribed, and modified as the docstrings say, from IDEA-Research/MaskDINO 3831d8514a3728535ace8d4ecc7d28044c42dd14:
# maskdino/modeling/transformer_decoder/maskdino_decoder.py.
# MaskDINO (DINO): Copyright (c) 2022 IDEA. All Rights Reserved.
# Licensed under the Apache License, Version 2.0: LICENSE at the root of this repository (the upstream's licence).
"""MaskDINO's ``prepare_for_dn`` / ``dn_post_process``, re-written device-agnostic: the oracle of
dnops.compat.maskdino's tests and the benchmarks' baseline. Checked against the repository's functions as syntax
trees: they differ only in the ``.cuda()`` calls.

Differences every function shares: ``.cuda()`` / ``.to('cuda')`` become the inputs' device, and Python ints
stand where the original sums one-element tensors; any other difference is in the function's docstring."""

from __future__ import annotations

import torch

from originals.dn_detr import _inverse_sigmoid


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
