"""detrex's denoising on dnops: ``GenerateDNQueries`` (detrex/layers/denoising.py, its DN-DETR project's generator)
and the ``prepare_for_cdn`` / ``dn_post_process`` methods of its DINO projects (projects/dino, and the identical
ones of dino_eva, focus_detr and align_detr).

Same constructor, state_dict, signatures and outputs as the originals, with the noise from dnops.dn_queries
(counter-based random numbers, the same laws) and no host syncs or ``.cuda()`` calls. The methods take ``self``
first, so they are assigned to the class as they are::

    from dnops.compat import detrex as dn
    DINO.prepare_for_cdn = dn.prepare_for_cdn      # projects/dino/modeling/dino.py's DINO (or FocusDETR, ...)
    DINO.dn_post_process = dn.dn_post_process
    # and in projects/dn_detr's config / model: detrex.layers.GenerateDNQueries -> dnops.compat.detrex's
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnops.compat._generators import noised_groups, query_tensors
from dnops.ops.dn_attn_mask import dn_attn_mask


class GenerateDNQueries(nn.Module):
    """detrex's DN-DETR query generator: ``denoising_groups`` groups of max(n_b) noised GT per image (labels redrawn
    with ``label_noise_prob``, boxes moved by DN-DETR's law with ``box_noise_scale``), embedded by ``label_encoder``
    (with a last indicator channel of 1 when ``with_indicator``).

    forward(gt_labels_list, gt_boxes_list), one (n_b,) and one (n_b, 4) normalised cxcywh per image -> (label
    queries (B, G * M, label_embed_dim), box queries (B, G * M, 4) through inverse_sigmoid (eps 1e-3), attn_mask
    (G * M + num_queries,) * 2 bool (True = blocked), denoising_groups, M = max(n_b)); padding slots are zeros."""

    def __init__(
        self,
        num_queries: int = 300,
        num_classes: int = 80,
        label_embed_dim: int = 256,
        denoising_groups: int = 5,
        label_noise_prob: float = 0.2,
        box_noise_scale: float = 0.4,
        with_indicator: bool = False,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.label_embed_dim = label_embed_dim
        self.denoising_groups = denoising_groups
        self.label_noise_prob = label_noise_prob
        self.box_noise_scale = box_noise_scale
        self.with_indicator = with_indicator
        self.label_encoder = nn.Embedding(num_classes, label_embed_dim - 1 if with_indicator else label_embed_dim)

    def forward(
        self, gt_labels_list: Sequence[torch.Tensor], gt_boxes_list: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        if len(gt_labels_list) != len(gt_boxes_list):
            raise ValueError(
                f"GenerateDNQueries: {len(gt_labels_list)} label tensors but {len(gt_boxes_list)} box tensors"
            )
        dn = noised_groups(
            gt_labels_list,
            gt_boxes_list,
            self.denoising_groups,
            False,
            self.num_classes,
            self.label_noise_prob,
            self.box_noise_scale,
        )
        labels, boxes = query_tensors(dn, self.label_encoder, self.num_classes, 1e-3, self.with_indicator)
        mask = dn_attn_mask(dn.pad_size, dn.group_size, self.num_queries, device=labels.device)
        return labels, boxes, mask, self.denoising_groups, dn.max_gt


def prepare_for_cdn(
    self,
    targets: Sequence[dict],
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_queries: int,
    num_classes: int,
    hidden_dim: int,
    label_enc: nn.Embedding,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict | None]:
    """detrex DINO's method (``self`` is not read): targets, one {"labels": (n,), "boxes": (n, 4) cxcywh} per image
    -> (input_query_label (B, pad, hidden_dim), input_query_bbox (B, pad, 4) through inverse_sigmoid (eps 1e-3),
    attn_mask (pad + num_queries,) * 2 bool, dn_meta {"single_padding": 2 * M, "dn_num": groups}), pad =
    2 * M * groups with groups = max(1, dn_number // M), M = max(n_b). Four Nones when dn_number <= 0 or no image
    has GT (detrex's; DINO's own function keeps a group then).

    As the original: each group is M positives then M negatives; labels redrawn with label_noise_ratio / 2; corners
    moved by sign * r * half-size * box_noise_scale, r in [0, 1) for positives and [1, 2) for negatives, clipped to
    [0, 1]."""
    if dn_number <= 0:
        return None, None, None, None
    counts = [len(t["labels"]) for t in targets]
    if max(counts) == 0:
        return None, None, None, None
    groups = max(1, (2 * dn_number) // (2 * max(counts)))
    dn = noised_groups(
        [t["labels"] for t in targets],
        [t["boxes"] for t in targets],
        groups,
        True,
        num_classes,
        label_noise_ratio * 0.5,
        box_noise_scale,
    )
    labels, boxes = query_tensors(dn, label_enc, num_classes, 1e-3)
    attn_mask = dn_attn_mask(dn.pad_size, dn.group_size, num_queries, device=labels.device)
    return labels, boxes, attn_mask, {"single_padding": dn.group_size, "dn_num": dn.num_groups}


def dn_post_process(
    self, outputs_class: torch.Tensor, outputs_coord: torch.Tensor, dn_metas: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """detrex DINO's method: splits (layers, B, pad + num_queries, C) outputs, returns the matching part and stores
    the DN part in dn_metas["output_known_lbs_bboxes"] ({"pred_logits", "pred_boxes"}, and "aux_outputs" from
    ``self._set_aux_loss`` when ``self.aux_loss``)."""
    if dn_metas and dn_metas["single_padding"] > 0:
        pad = dn_metas["single_padding"] * dn_metas["dn_num"]
        known_class, known_coord = outputs_class[:, :, :pad, :], outputs_coord[:, :, :pad, :]
        outputs_class, outputs_coord = outputs_class[:, :, pad:, :], outputs_coord[:, :, pad:, :]
        out = {"pred_logits": known_class[-1], "pred_boxes": known_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(known_class, known_coord)
        dn_metas["output_known_lbs_bboxes"] = out
    return outputs_class, outputs_coord
