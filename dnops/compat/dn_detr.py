"""DN-DETR's ``prepare_for_dn`` / ``dn_post_process`` (models/DN_DAB_DETR/dn_components.py) on dnops.

Same signatures and return structures (sequence-first query tensors, the dense bool mask, mask_dict keys), but
device-agnostic and fused: the noise comes from dnops.dn_queries (counter-based, so the random numbers differ
from the original's torch.rand draws; the distributions are the same).
"""

from __future__ import annotations

import functools
from array import array
from itertools import chain, repeat

import torch
import torch.nn.functional as F

from dnops.compat._dn_targets import queries_from_targets
from dnops.dn import dn_box_queries
from dnops.ops.dn_attn_mask import dn_attn_mask


def prepare_for_dn(dn_args, embedweight, batch_size, training, num_queries, num_classes, hidden_dim, label_enc):
    """dn_args: (targets, scalar, label_noise_scale, box_noise_scale, num_patterns) in training, num_patterns
    otherwise. Returns (input_query_label (W, B, hidden_dim), input_query_bbox (W, B, 4), attn_mask (W, W) or
    None, mask_dict or None), W = pad_size + num_queries * num_patterns."""
    if training:
        targets, scalar, label_noise_scale, box_noise_scale, num_patterns = dn_args
    else:
        num_patterns = dn_args
    num_patterns = max(int(num_patterns), 1)
    device = embedweight.device
    matching = num_queries * num_patterns
    # The anchors once per pattern (a view for one pattern, a copy only for several), for every image.
    refpoint_emb = embedweight.expand(num_patterns, -1, -1).reshape(matching, -1).expand(batch_size, -1, -1)
    if not training:
        tgt = label_enc.weight[num_classes].to(embedweight.dtype)
        tgt = torch.cat([tgt, tgt.new_zeros(1)]).expand(batch_size, matching, -1)
        return tgt.transpose(0, 1), refpoint_emb.transpose(0, 1), None, None

    labels, boxes, counts, dn = queries_from_targets(
        targets, "dn", num_classes, label_noise_scale, box_noise_scale, num_groups=scalar
    )
    # One lookup writes the whole sequence-first query tensor (the step's largest write): rows 0..C-1 are the
    # class embeddings with indicator 1, row C the zero padding slot, row C+1 the matching queries' embedding.
    weight = label_enc.weight.to(embedweight.dtype)
    zero_row, indicator, matching_index = _constants(
        num_classes, weight.shape[1], matching, batch_size, weight.dtype, weight.device
    )
    table = torch.cat(
        [torch.cat([weight[:num_classes], zero_row, weight[num_classes : num_classes + 1]]), indicator], 1
    )
    input_query_label = F.embedding(torch.cat([dn.labels.t(), matching_index]), table)
    input_query_bbox = torch.cat([dn_box_queries(dn).to(embedweight.dtype), refpoint_emb], 1)
    attn_mask = dn_attn_mask(dn.pad_size, dn.group_size, matching, device=device)

    # The index maps come from the host counts: built on the host in one buffer, one tensor (one copy to the device),
    # no device round trip. know_idx's columns are views of one arange, and the known labels / boxes one
    # expand-and-copy each: every op here is a dispatch (a kernel launch on a GPU) on the step's critical path.
    groups, known = int(scalar), labels.shape[0]
    within = list(chain.from_iterable(map(range, counts)))
    maps = array("q", range(known))
    maps *= groups
    maps.extend(chain.from_iterable(repeat(b, c) for b, c in enumerate(counts)))
    maps.extend([j + dn.group_size * g for g in range(groups) for j in within])
    # torch.frombuffer rejects an empty buffer (no GT in the batch)
    known_indice, batch_idx, map_known_indice = (
        torch.frombuffer(maps, dtype=torch.int64).to(device).split([known * groups, known, known * groups])
        if len(maps)
        else (torch.zeros(0, dtype=torch.int64, device=device),) * 3
    )
    column = torch.arange(max(counts, default=0), device=device).unsqueeze(1)
    mask_dict = {
        "known_indice": known_indice,
        "batch_idx": batch_idx,
        "map_known_indice": map_known_indice,
        "known_lbs_bboxes": (
            labels.expand(groups, -1).reshape(-1),
            boxes.expand(groups, -1, -1).reshape(-1, boxes.shape[1]),
        ),
        "know_idx": [column[:c] for c in counts],
        "pad_size": dn.pad_size,
    }
    return input_query_label, input_query_bbox.transpose(0, 1), attn_mask, mask_dict


@functools.lru_cache(maxsize=16)
def _constants(num_classes, width, matching, batch_size, dtype, device):
    """(zero row (1, width), indicator column (num_classes + 2, 1), matching rows' index (matching, B)): inputs of
    every step's lookup that never change, made once per layout instead of three ops per step."""
    zero_row = torch.zeros(1, width, dtype=dtype, device=device)
    indicator = torch.zeros(num_classes + 2, 1, dtype=dtype, device=device)
    indicator[:num_classes] = 1
    matching_index = torch.full((matching, batch_size), num_classes + 1, dtype=torch.int64, device=device)
    return zero_row, indicator, matching_index


def dn_post_process(outputs_class, outputs_coord, mask_dict):
    """Splits (layers, B, W, C) decoder outputs: returns the matching part and stores the DN part in
    mask_dict['output_known_lbs_bboxes'] = (class, coord), as DN-DETR does."""
    if mask_dict and mask_dict["pad_size"] > 0:
        pad = mask_dict["pad_size"]
        mask_dict["output_known_lbs_bboxes"] = (outputs_class[:, :, :pad, :], outputs_coord[:, :, :pad, :])
        outputs_class, outputs_coord = outputs_class[:, :, pad:, :], outputs_coord[:, :, pad:, :]
    return outputs_class, outputs_coord
