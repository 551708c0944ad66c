"""DINO's ``prepare_for_cdn`` / ``dn_post_process`` (models/dino/dn_components.py) on dnops.

Same signatures and return structures (batch-first DN queries, the dense bool mask, dn_meta keys), but
device-agnostic and fused: the noise comes from dnops.dn_queries in CDN mode (counter-based random numbers, the
same distributions).
"""

from __future__ import annotations

from dnops.compat._dn_targets import queries_from_targets
from dnops.dn import dn_box_queries, dn_label_queries
from dnops.ops.dn_attn_mask import dn_attn_mask


def prepare_for_cdn(dn_args, training, num_queries, num_classes, hidden_dim, label_enc):
    """dn_args: (targets, dn_number, label_noise_ratio, box_noise_scale). Returns (input_query_label
    (B, pad, hidden_dim), input_query_bbox (B, pad, 4), attn_mask (pad + num_queries,) * 2, dn_meta), or four
    Nones outside training."""
    if not training:
        return None, None, None, None
    targets, dn_number, label_noise_ratio, box_noise_scale = dn_args
    if not isinstance(targets, list | tuple) or not targets:
        raise ValueError("prepare_for_cdn: need one labels and one boxes tensor per image, got no targets")
    labels, _, _, dn = queries_from_targets(
        targets, "cdn", num_classes, label_noise_ratio, box_noise_scale, dn_number=dn_number
    )
    dtype = label_enc.weight.dtype
    input_query_label = dn_label_queries(dn, label_enc, num_classes).to(dtype)
    input_query_bbox = dn_box_queries(dn).to(dtype)
    attn_mask = dn_attn_mask(dn.pad_size, dn.group_size, num_queries, device=labels.device)
    dn_meta = {"pad_size": dn.pad_size, "num_dn_group": dn.num_groups}
    return input_query_label, input_query_bbox, attn_mask, dn_meta


def dn_post_process(outputs_class, outputs_coord, dn_meta, aux_loss, _set_aux_loss):
    """Splits (layers, B, W, C) decoder outputs: returns the matching part and stores the DN part in
    dn_meta['output_known_lbs_bboxes'] = {'pred_logits', 'pred_boxes'[, 'aux_outputs']}, as DINO does."""
    if dn_meta and dn_meta["pad_size"] > 0:
        pad = dn_meta["pad_size"]
        known_class, known_coord = outputs_class[:, :, :pad, :], outputs_coord[:, :, :pad, :]
        outputs_class, outputs_coord = outputs_class[:, :, pad:, :], outputs_coord[:, :, pad:, :]
        out = {"pred_logits": known_class[-1], "pred_boxes": known_coord[-1]}
        if aux_loss:
            out["aux_outputs"] = _set_aux_loss(known_class, known_coord)
        dn_meta["output_known_lbs_bboxes"] = out
    return outputs_class, outputs_coord
