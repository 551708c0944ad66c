"""Hungarian matching and the DETR losses (sigmoid focal + L1 + GIoU) for the matching and the DN queries."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from dnops.dn import dn_loss_pairs
from models.config import Config


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(IoU, union) of xyxy boxes (..., 4), broadcast over the leading dims: pass (N, 1, 4) and (M, 4) for the
    (N, M) matrix, two (P, 4) for the P aligned pairs."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    return inter / union.clamp(min=1e-7), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of xyxy boxes (..., 4), broadcast as ``box_iou``."""
    iou, union = box_iou(a, b)
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-7)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float = 2.0):
    """Element-wise focal loss of independent sigmoids (RetinaNet), same shape as ``logits``."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    return ce * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict], cfg: Config
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, (query indices, GT indices) of the minimum-cost assignment (scipy's linear_sum_assignment).

    logits (B, Q, C), boxes (B, Q, 4). Cost: Deformable-DETR's focal class cost + L1 + GIoU with the loss weights.
    """
    batch, queries = logits.shape[:2]
    counts = [len(t["labels"]) for t in targets]
    if sum(counts) == 0:
        return [(np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in counts]
    labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
    gt = torch.cat([t["boxes"] for t in targets]).to(boxes.device).float()
    p = logits.flatten(0, 1).float().sigmoid()
    a, g = cfg.focal_alpha, 2.0
    pos = a * (1 - p) ** g * -(p + 1e-8).log()
    neg = (1 - a) * p**g * -(1 - p + 1e-8).log()
    out = boxes.flatten(0, 1).float()
    cost = (
        cfg.cls_weight * (pos[:, labels] - neg[:, labels])
        + cfg.l1_weight * torch.cdist(out, gt, p=1)
        - cfg.giou_weight * generalized_box_iou(box_cxcywh_to_xyxy(out)[:, None], box_cxcywh_to_xyxy(gt))
    )
    cost = cost.view(batch, queries, -1).cpu().numpy()
    result, start = [], 0
    for i, n in enumerate(counts):
        rows, cols = linear_sum_assignment(cost[i, :, start : start + n])
        result.append((rows.astype(np.int64), cols.astype(np.int64)))
        start += n
    return result


def global_num_boxes(counts: list[int], device: torch.device) -> float:
    """GT boxes per process averaged over ranks (>= 1): with DDP's gradient averaging, the loss is the mean
    over every GT of the global batch, however the GT are spread over the processes."""
    total = torch.tensor([float(sum(counts))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        total /= dist.get_world_size()
    return max(float(total.item()), 1.0)


class Criterion(nn.Module):
    """Sum of the weighted losses over decoder layers (auxiliary losses) for the matching and the DN queries."""

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes

    def _box_losses(self, pred: torch.Tensor, gt: torch.Tensor, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        l1 = F.l1_loss(pred, gt, reduction="sum") / norm
        giou = (1 - generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt))).sum() / norm
        return l1, giou

    def forward(self, outputs: dict, targets: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns (total loss, per-term values summed over layers)."""
        cfg = self.cfg
        logits, boxes = outputs["logits"], outputs["boxes"]  # (layers, B, Q, ...)
        device = logits.device
        counts = [len(t["labels"]) for t in targets]
        norm = global_num_boxes(counts, device)
        gt_labels = torch.cat([t["labels"] for t in targets]).to(device)
        gt_boxes = torch.cat([t["boxes"] for t in targets]).to(device)
        offsets = np.cumsum([0, *counts[:-1]])
        terms = {"cls": 0.0, "l1": 0.0, "giou": 0.0}
        for layer in range(logits.shape[0]):
            matches = hungarian_match(logits[layer], boxes[layer], targets, cfg)
            b_idx = torch.from_numpy(np.concatenate([np.full(len(q), i) for i, (q, _) in enumerate(matches)]))
            q_idx = torch.from_numpy(np.concatenate([q for q, _ in matches]))
            g_idx = torch.from_numpy(np.concatenate([g + offsets[i] for i, (_, g) in enumerate(matches)]))
            onehot = torch.zeros_like(logits[layer])
            onehot[b_idx, q_idx, gt_labels[g_idx]] = 1.0
            terms["cls"] = terms["cls"] + sigmoid_focal_loss(logits[layer], onehot, cfg.focal_alpha).sum() / norm
            l1, giou = self._box_losses(boxes[layer][b_idx, q_idx], gt_boxes[g_idx], norm)
            terms["l1"], terms["giou"] = terms["l1"] + l1, terms["giou"] + giou
        if "dn" in outputs:
            dn = outputs["dn"]
            dn_norm = norm * dn.num_groups
            # real slots: positives learn their GT's class, CDN negatives learn "no object"; padding is ignored
            real = (dn.gt_index >= 0).to(logits.dtype)
            label = gt_labels[dn.gt_index.clamp(min=0)]  # DN queries exist only when some image has GT
            onehot = F.one_hot(label, self.num_classes).to(logits.dtype) * (real * (~dn.negative))[..., None]
            focal = sigmoid_focal_loss(outputs["dn_logits"], onehot.expand_as(outputs["dn_logits"]), cfg.focal_alpha)
            terms["dn_cls"] = (focal * real[..., None]).sum() / dn_norm
            _, pred_boxes, _, tgt_boxes = dn_loss_pairs(
                dn, counts, outputs["dn_logits"], outputs["dn_boxes"], gt_labels, gt_boxes
            )
            l1 = giou = 0.0
            for layer in range(pred_boxes.shape[0]):
                a, b = self._box_losses(pred_boxes[layer], tgt_boxes, dn_norm)
                l1, giou = l1 + a, giou + b
            terms["dn_l1"], terms["dn_giou"] = l1, giou
        weight = {"cls": cfg.cls_weight, "l1": cfg.l1_weight, "giou": cfg.giou_weight}
        total = sum(weight[name.removeprefix("dn_")] * value for name, value in terms.items())
        return total, {name: float(torch.as_tensor(value).detach()) for name, value in terms.items()}
