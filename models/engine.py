"""One training epoch, COCO evaluation and the matching-instability probe."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from models.criterion import Criterion, hungarian_match
from models.data import CocoDetection, collate

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def train_one_epoch(
    model: torch.nn.Module,
    criterion: Criterion,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    clip_max_norm: float,
    max_steps: int | None = None,
    progress: bool = False,
    on_step: Callable[[float], None] | None = None,
) -> dict[str, float]:
    """Trains over ``loader`` (at most ``max_steps`` steps); returns the mean of each loss term."""
    model.train()
    sums: dict[str, float] = {}
    steps = 0
    bar = tqdm(loader, disable=not progress, leave=False, dynamic_ncols=True)
    for images, targets in bar:
        if max_steps is not None and steps >= max_steps:
            break
        outputs = model(images, targets)
        loss, terms = criterion(outputs, targets)
        terms["loss"] = loss.item()
        if not math.isfinite(terms["loss"]):
            raise FloatingPointError(f"loss is {terms['loss']} ({terms})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        optimizer.step()
        steps += 1
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        bar.set_postfix(loss=f"{terms['loss']:.3f}")
        if on_step is not None:
            on_step(terms["loss"])
    return {name: value / max(steps, 1) for name, value in sums.items()} | {"steps": steps}


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, top_k: int = 100) -> list[dict[str, torch.Tensor]]:
    """Per image the ``top_k`` (query, class) pairs by sigmoid score: scores (k,), labels (k,), boxes (k, 4)
    normalized (cx, cy, w, h), as Deformable-DETR's post-processing."""
    model.eval()
    out = model(images)
    logits, boxes = out["logits"][-1], out["boxes"][-1]
    prob = logits.sigmoid().flatten(1)
    k = min(top_k, prob.shape[1])
    scores, flat = prob.topk(k, dim=1)
    query, label = flat // logits.shape[-1], flat % logits.shape[-1]
    picked = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, label, picked, strict=True)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: CocoDetection, batch_size: int = 8, limit: int = 0) -> dict[str, float]:
    """COCO box AP (pycocotools) on ``dataset`` (its first ``limit`` images if > 0): AP, AP50, AP75, APs, APm,
    APl, each in [0, 1] (-1 where COCO has no GT of that size)."""
    from pycocotools.cocoeval import COCOeval

    indices = list(range(len(dataset) if limit <= 0 else min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, collate_fn=collate
    )
    results = []
    for images, targets in loader:
        for det, target in zip(predict(model, images), targets, strict=True):
            h, w = target["orig_size"]
            cx, cy, bw, bh = (det["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
            xywh = torch.stack([cx - bw / 2, cy - bh / 2, bw, bh], -1).tolist()
            for score, label, box in zip(det["scores"].tolist(), det["labels"].tolist(), xywh, strict=True):
                results.append(
                    {"image_id": target["image_id"], "category_id": dataset.cat_ids[label], "bbox": box, "score": score}
                )
    if not results:
        return dict.fromkeys(AP_KEYS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its whole table
        detections = dataset.coco.loadRes(results)
        coco_eval = COCOeval(dataset.coco, detections, "bbox")
        coco_eval.params.imgIds = [dataset.ids[i] for i in indices]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {key: float(v) for key, v in zip(AP_KEYS, coco_eval.stats[:6], strict=True)}


@torch.no_grad()
def matching_assignment(model: torch.nn.Module, batch: tuple[torch.Tensor, list[dict]], cfg) -> np.ndarray:
    """The query each GT of ``batch`` is matched to by the last decoder layer, (num GT,) int64: the state whose
    change between epochs is DN-DETR's matching instability."""
    images, targets = batch
    model.eval()
    out = model(images)
    matches = hungarian_match(out["logits"][-1], out["boxes"][-1], targets, cfg)
    assigned = []
    for (queries, gts), target in zip(matches, targets, strict=True):
        per_gt = np.full(len(target["labels"]), -1, np.int64)
        per_gt[gts] = queries
        assigned.append(per_gt)
    return np.concatenate(assigned) if assigned else np.zeros(0, np.int64)


def instability(previous: np.ndarray | None, current: np.ndarray) -> float | None:
    """Fraction of GT whose matched query changed since the previous epoch (None for the first epoch)."""
    if previous is None or len(current) == 0:
        return None
    return float((previous != current).mean())
