"""Model-side helpers around dnops.dn_queries: query embeddings, concatenation with the matching queries, the
split of decoder outputs (DN-DETR / DINO ``dn_post_process``) and the loss-side pairing of predictions and GT."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dnops._constants import host_to_device
from dnops._types import DNQueries


def flatten_targets(targets: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """DETR-style per-image targets ({"labels": (n,), "boxes": (n, 4)}) -> (labels (K,), boxes (K, 4), counts)."""
    counts = [len(t["labels"]) for t in targets]
    labels = torch.cat([t["labels"] for t in targets]).long()
    return labels, torch.cat([t["boxes"] for t in targets]), counts


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps (the DETR-family convention)."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def dn_label_queries(dn: DNQueries, label_enc: nn.Embedding, num_classes: int, indicator: bool = False) -> torch.Tensor:
    """(B, pad, C) label embeddings of the DN slots, zeros in padding slots (as DN-DETR and DINO pad).

    One lookup in a small table: rows 0..num_classes-1 of ``label_enc`` (with DN-DETR's indicator channel of 1
    appended when ``indicator``, giving C = embedding dim + 1) and a zero row for the padding label num_classes.
    Gradients reach ``label_enc.weight``.
    """
    table = label_enc.weight[:num_classes]
    if indicator:
        table = torch.cat([table, table.new_ones(num_classes, 1)], 1)
    table = torch.cat([table, table.new_zeros(1, table.shape[1])], 0)
    return F.embedding(dn.labels, table)


def dn_box_queries(dn: DNQueries, eps: float = 1e-3) -> torch.Tensor:
    """(B, pad, 4) box queries in inverse-sigmoid space; padding slots (box 0.5) become exactly 0."""
    return inverse_sigmoid(dn.boxes, eps)


def dn_concat(dn_part: torch.Tensor, matching_part: torch.Tensor) -> torch.Tensor:
    """[DN part | matching part] along the query dim, batch-first: (B, pad, C) + (Nq, C) or (B|1, Nq, C)."""
    if matching_part.dim() == 2:
        matching_part = matching_part.unsqueeze(0)
    return torch.cat([dn_part, matching_part.expand(dn_part.shape[0], -1, -1).to(dn_part.dtype)], 1)


def dn_split(outputs: torch.Tensor, pad_size: int, dim: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """(DN part, matching part) of decoder outputs laid out [DN | matching] along ``dim`` (default -2)."""
    width = outputs.shape[dim]
    return outputs.narrow(dim, 0, pad_size), outputs.narrow(dim, pad_size, width - pad_size)


def dn_positive_index(dn: DNQueries, counts: Sequence[int], device: torch.device | str | None = None):
    """(batch_idx, slot_idx, gt_idx), each (P,) int64: every positive DN slot and the flat GT row it rebuilds.

    Computed from the host ``counts``, so it costs no device sync (boolean indexing on gt_index would).
    Order: group, then image, then GT, as DN-DETR's known_bid / map_known_indice.
    """
    # Python (or, under torch.compile, symbolic) ints: every size below is known without reading a tensor
    used_n = [min(c, dn.max_gt) for c in counts]
    total = sum(used_n)
    used = torch.tensor(used_n, dtype=torch.int64)
    starts = torch.tensor(list(itertools.accumulate(counts, initial=0))[:-1], dtype=torch.int64)
    image = torch.repeat_interleave(torch.arange(len(counts)), used, output_size=total)
    within = torch.arange(total) - torch.repeat_interleave(torch.cumsum(used, 0) - used, used, output_size=total)
    groups = torch.arange(dn.num_groups).repeat_interleave(total)
    batch_idx = image.repeat(dn.num_groups)
    j = within.repeat(dn.num_groups)
    slot_idx = groups * dn.group_size + j
    gt_idx = starts[batch_idx] + j
    device = dn.labels.device if device is None else device
    maps = host_to_device(torch.cat([batch_idx, slot_idx, gt_idx]), device, "dn_positive_index")
    # three sizes, not one: with no positive slot an empty tensor split by size 0 gives one chunk, not three
    return maps.split([batch_idx.shape[0]] * 3)


def dn_loss_pairs(
    dn: DNQueries,
    counts: Sequence[int],
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_boxes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions of the positive DN slots and the GT they reconstruct, for the DN losses.

    pred_logits (..., B, pad, num_classes) and pred_boxes (..., B, pad, 4) (leading dims, e.g. decoder layers,
    are kept); gt_labels (K,), gt_boxes (K, 4). Returns (logits (..., P, num_classes), boxes (..., P, 4),
    target labels (P,), target boxes (P, 4)).
    """
    batch_idx, slot_idx, gt_idx = dn_positive_index(dn, counts, pred_logits.device)
    return (
        pred_logits[..., batch_idx, slot_idx, :],
        pred_boxes[..., batch_idx, slot_idx, :],
        gt_labels[gt_idx],
        gt_boxes[gt_idx],
    )
