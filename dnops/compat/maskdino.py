"""MaskDINO's denoising on dnops: ``MaskDINODecoder.prepare_for_dn`` / ``dn_post_process``
(maskdino/modeling/transformer_decoder/maskdino_decoder.py).

Same signatures, outputs and ``mask_dict`` entries as the originals, with the noise from dnops.dn_queries
(counter-based random numbers, the same laws) and no host syncs or ``.cuda()`` calls. Both take ``self`` first (the
decoder: they read ``training``, ``dn_num``, ``noise_scale``, ``num_classes``, ``num_queries``, ``label_enc`` and
``_set_aux_loss``), so they are assigned to the class as they are::

    from dnops.compat import maskdino as dn
    MaskDINODecoder.prepare_for_dn = dn.prepare_for_dn
    MaskDINODecoder.dn_post_process = dn.dn_post_process

MaskDINO's pixel decoder imports the compiled ``MultiScaleDeformableAttention``: dnops.compat.extensions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dnops.compat._generators import noised_groups, query_tensors
from dnops.ops.dn_attn_mask import dn_attn_mask


def prepare_for_dn(
    self, targets: Sequence[dict], tgt: torch.Tensor | None, refpoint_emb: torch.Tensor | None, batch_size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict | None]:
    """In training: targets, one {"labels": (n,), "boxes": (n, 4) cxcywh} per image -> (input_query_label
    (B, pad[ + Nq], hidden), input_query_bbox (B, pad[ + Nq], 4) through inverse_sigmoid (eps 1e-5), attn_mask
    (pad + num_queries,) * 2 bool, mask_dict), pad = scalar * M with scalar = dn_num // M, M = max(n_b); tgt
    (Nq, hidden) and refpoint_emb (Nq, 4), when given, follow the DN part. Four Nones when scalar is 0 (no GT, or an
    image with more than dn_num GT), as the original.

    mask_dict holds the original's entries: known_indice, batch_idx (on the GT's device), map_known_indice (on the
    CPU, as the original builds it), known_lbs_bboxes (the clean labels and boxes, once per group), know_idx (one
    (n_b, 1) tensor per image), pad_size, scalar. Outside training: (tgt, refpoint_emb) repeated over the batch, or
    Nones."""
    if not self.training:
        if refpoint_emb is None:
            return None, None, None, None
        return tgt.repeat(batch_size, 1, 1), refpoint_emb.repeat(batch_size, 1, 1), None, None
    counts = [len(t["labels"]) for t in targets]
    single_pad = max(counts)
    scalar = self.dn_num // single_pad if single_pad > 0 else 0
    if scalar == 0:
        return None, None, None, None
    labels = [t["labels"] for t in targets]
    dn = noised_groups(
        labels,
        [t["boxes"] for t in targets],
        scalar,
        False,
        self.num_classes,
        self.noise_scale * 0.5 if self.noise_scale > 0 else 0.0,
        self.noise_scale,
    )
    input_query_label, input_query_bbox = query_tensors(dn, self.label_enc, self.num_classes, 1e-5)
    if refpoint_emb is not None:
        input_query_label = torch.cat([input_query_label, tgt.expand(len(targets), -1, -1)], 1)
        input_query_bbox = torch.cat([input_query_bbox, refpoint_emb.expand(len(targets), -1, -1)], 1)
    device = input_query_label.device
    attn_mask = dn_attn_mask(dn.pad_size, single_pad, self.num_queries, device=device)
    total = sum(counts)
    flat_labels = torch.cat(labels)
    # each GT's slot in its image's group, on the CPU as the original makes it: position - its image's offset
    sizes = torch.tensor(counts)
    slots = torch.arange(total) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes, output_size=total)
    within = torch.arange(single_pad, device=device).unsqueeze(1)  # each image's (n_b, 1) is a view of it
    mask_dict = {
        "known_indice": torch.arange(total, device=device).repeat(scalar),
        "batch_idx": torch.cat([torch.full_like(t.long(), i) for i, t in enumerate(labels)]),
        "map_known_indice": (slots + single_pad * torch.arange(scalar).unsqueeze(1)).flatten(),
        "known_lbs_bboxes": (flat_labels.repeat(scalar), torch.cat([t["boxes"] for t in targets]).repeat(scalar, 1)),
        "know_idx": [within[:n] for n in counts],
        "pad_size": dn.pad_size,
        "scalar": scalar,
    }
    return input_query_label, input_query_bbox, attn_mask, mask_dict


def dn_post_process(
    self,
    outputs_class: torch.Tensor,
    outputs_coord: torch.Tensor,
    mask_dict: dict,
    outputs_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Splits the stacked (layers, B, pad + Nq, ...) class, box and mask outputs: returns the matching parts and
    stores the DN parts in mask_dict["output_known_lbs_bboxes"] ({"pred_logits", "pred_boxes", "pred_masks",
    "aux_outputs"}, the last from ``self._set_aux_loss(class, mask, coord)``), as the original."""
    pad = mask_dict["pad_size"]
    if pad <= 0:
        raise ValueError(f"dn_post_process: mask_dict['pad_size'] must be > 0, got {pad}")
    known_class, outputs_class = outputs_class[:, :, :pad, :], outputs_class[:, :, pad:, :]
    known_coord, outputs_coord = outputs_coord[:, :, :pad, :], outputs_coord[:, :, pad:, :]
    known_mask, outputs_mask = outputs_mask[:, :, :pad, :], outputs_mask[:, :, pad:, :]
    out = {"pred_logits": known_class[-1], "pred_boxes": known_coord[-1], "pred_masks": known_mask[-1]}
    out["aux_outputs"] = self._set_aux_loss(known_class, known_mask, known_coord)
    mask_dict["output_known_lbs_bboxes"] = out
    return outputs_class, outputs_coord, outputs_mask
