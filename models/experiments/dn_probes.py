"""Two measurements on trained checkpoints, for the claims the ablation's curves cannot show by themselves.

``attention_on_dn``: DN-DETR's reason for the attention mask. Without it the matching queries can read the
denoising queries, which carry the (noised) ground truth in training and do not exist at inference. Measured as
the softmax mass the matching queries put on the DN queries in the decoder's self-attention, on training images
with their DN queries, per layer, next to the share the DN queries would get if attention were uniform.

``duplicates``: DINO's claim for contrastive denoising (its negatives teach a query near an object that is not its
match to say "no object", so one object gets one prediction): the share of validation GT with two or more
predictions of its class that score above ``score`` and overlap it at IoU above ``iou``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from models.criterion import box_cxcywh_to_xyxy, box_iou
from models.data import CocoDetection, collate
from models.engine import predict
from models.evaluate import val_set
from models.train import datasets, load


def _attention(mha: torch.nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities (B, heads, W, W) of a batch-first nn.MultiheadAttention on its inputs."""
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
    heads = mha.num_heads
    q = F.linear(query, w_q, b_q).unflatten(-1, (heads, -1)).transpose(1, 2)
    k = F.linear(key, w_k, b_k).unflatten(-1, (heads, -1)).transpose(1, 2)
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)


@torch.no_grad()
def attention_on_dn(checkpoint: Path, images: int = 64, batch_size: int = 8) -> dict:
    """{"per_layer": mean mass the matching queries put on the DN queries per decoder layer, "uniform": pad / W
    averaged the same way}, on the first ``images`` training images, with the model as it trained (DN queries on).
    For a model trained without the mask (with it the mass is 0 by construction)."""
    model, _ = load(checkpoint)
    cfg = model.cfg
    if not cfg.dn or cfg.dn_mask:
        raise ValueError(f"attention_on_dn: {checkpoint} was trained with {'the DN mask' if cfg.dn else 'no DN'}")
    train_set, _ = datasets(cfg, 0)
    batch = collate([train_set[i] for i in range(min(images, len(train_set)))])
    captured: list[torch.Tensor] = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(lambda mod, args: captured.append(_attention(mod, args[0], args[1])))
        for layer in model.decoder
    ]
    model.train()  # DN queries exist in training only; dropout is 0 in the ablation's config
    torch.manual_seed(cfg.seed)
    masses, uniform = [[] for _ in model.decoder], []
    try:
        for start in range(0, len(batch[1]), batch_size):
            captured.clear()
            out = model(batch[0][start : start + batch_size], batch[1][start : start + batch_size])
            pad = out["dn"].pad_size if "dn" in out else 0
            for layer, probs in enumerate(captured):
                masses[layer].append(float(probs[:, :, pad:, :pad].sum(-1).mean()))
            uniform.append(pad / captured[0].shape[-1])
    finally:
        for hook in hooks:
            hook.remove()
    return {"per_layer": [sum(m) / len(m) for m in masses], "uniform": sum(uniform) / len(uniform)}


@torch.no_grad()
def duplicates(checkpoint: Path, score: float = 0.3, iou: float = 0.7, batch_size: int = 8) -> dict:
    """{"share": fraction of val GT with >= 2 same-class predictions scoring > score at IoU > iou, "gt": GT count,
    "score": score, "iou": iou} over the checkpoint's validation split."""
    model, _ = load(checkpoint)
    dataset: CocoDetection = val_set(model.cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    total, duplicated = 0, 0
    for images, targets in loader:
        for det, target in zip(predict(model, images), targets, strict=True):
            hits = hits_per_gt(target, det, score, iou)
            total += len(hits)
            duplicated += int((hits >= 2).sum())
    return {"share": duplicated / max(total, 1), "gt": total, "score": score, "iou": iou}


def hits_per_gt(target: dict, det: dict, score: float, iou: float) -> torch.Tensor:
    """(G,) per GT of one image (target boxes (G, 4) cxcywh, labels (G,)), how many predictions (det scores (k,),
    labels (k,), boxes (k, 4) cxcywh) of its class score above ``score`` and overlap it at IoU above ``iou``."""
    keep = det["scores"] > score
    overlap, _ = box_iou(box_cxcywh_to_xyxy(target["boxes"])[:, None], box_cxcywh_to_xyxy(det["boxes"][keep]))
    same = target["labels"][:, None] == det["labels"][keep][None, :]
    return ((overlap > iou) & same).sum(1)
