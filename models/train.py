"""``python -m models.train [flags]``: train the thin DN-DETR, evaluate with pycocotools every epoch.

Writes ``OUT/log.json`` (a list of per-epoch dicts: epoch, steps, losses, AP, AP50, AP75, APs, APm, APl and
the matching instability IS when tracked) and ``OUT/checkpoint.pth`` every epoch, both atomically (temp file +
rename). ``--resume`` continues from the checkpoint and gives bit for bit the run that was not interrupted:
every epoch re-seeds torch from (seed, epoch, rank), so no random state is carried across epochs.

Multi-process: ``torchrun --nproc_per_node=2 -m models.train ...`` (gloo on CPU, nccl on GPU) shards the
training set with a DistributedSampler; the losses are normalised by the global GT count.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models.config import Config, parse
from models.criterion import Criterion
from models.data import CocoDetection, DataError, DigitsConfig, collate, ensure_digits_dataset
from models.engine import evaluate, instability, matching_assignment, train_one_epoch
from models.model import DNDETR


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def datasets(cfg: Config, rank: int) -> tuple[CocoDetection, CocoDetection]:
    """(train, val) sets; raises DataError, before any training, for a dataset that cannot be trained on."""
    if cfg.train_json or cfg.val_json:
        missing = [flag for flag in ("train_json", "train_images", "val_json", "val_images") if not getattr(cfg, flag)]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise DataError(
                f"a COCO dataset needs --train-json, --train-images, --val-json and --val-images; {flags} missing"
            )
        size = cfg.image_size
        return (
            CocoDetection(cfg.train_images, cfg.train_json, size),
            CocoDetection(cfg.val_images, cfg.val_json, size),
        )
    root = Path(cfg.data)
    if rank == 0:
        ensure_digits_dataset(root, cfg.num_train, cfg.num_val, cfg=DigitsConfig.for_image(cfg.image_size))
    if dist.is_initialized():
        dist.barrier()
    paths = ensure_digits_dataset(root)
    size = cfg.image_size
    return CocoDetection(root / "train", paths["train"], size), CocoDetection(root / "val", paths["val"], size)


def build(cfg: Config, num_classes: int) -> tuple[DNDETR, Criterion]:
    torch.manual_seed(cfg.seed)
    return DNDETR(cfg, num_classes), Criterion(cfg, num_classes)


def _epoch_seed(cfg: Config, epoch: int, rank: int) -> int:
    return (cfg.seed * 1_000_003 + epoch) * 1_009 + rank


def train(cfg: Config) -> list[dict]:
    """Runs the training described by ``cfg``; returns the log (rank 0; other ranks return [])."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        # temp files of a write that was killed: the write is redone whole, they are never read
        for stale in out.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
    train_set, val_set = datasets(cfg, rank)
    if len(train_set) == 0:
        raise DataError(f"the training set ({cfg.train_json or cfg.data}) has no images")
    model, criterion = build(cfg, train_set.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log: list[dict] = []
    start_epoch, total_steps = 0, 0
    checkpoint_path = out / "checkpoint.pth"
    if cfg.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, total_steps, log = state["epoch"] + 1, state["steps"], state["log"]
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if distributed else model
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, num_workers=cfg.workers
    )
    probe = None
    if cfg.track_is > 0:
        probe = collate([train_set[i] for i in range(min(cfg.track_is, len(train_set)))])
    previous = None
    if probe is not None and log and "assignment" in log[-1]:
        previous = np.asarray(log[-1]["assignment"], dtype=np.int64)
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps and total_steps >= cfg.max_steps:
            break
        sampler.set_epoch(epoch)
        torch.manual_seed(_epoch_seed(cfg, epoch, rank))
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * (0.1 if 0 < cfg.lr_drop <= epoch else 1.0)
        t0 = time.perf_counter()
        losses = train_one_epoch(
            net,
            criterion,
            loader,
            optimizer,
            cfg.clip_max_norm,
            max_steps=cfg.max_steps - total_steps if cfg.max_steps else None,
            progress=cfg.progress and rank == 0,
        )
        total_steps += losses.pop("steps")
        entry = {"epoch": epoch + 1, "steps": total_steps, "train_s": round(time.perf_counter() - t0, 2)}
        entry.update({f"loss_{k}" if k != "loss" else k: round(v, 6) for k, v in losses.items()})
        if rank == 0:
            entry.update(evaluate(model, val_set, cfg.batch_size, cfg.eval_images))
            if probe is not None:
                assignment = matching_assignment(model, probe, cfg)
                entry["IS"] = instability(previous, assignment)
                entry["assignment"] = assignment.tolist()
                previous = assignment
            log.append(entry)
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "steps": total_steps,
                "log": log,
                "config": cfg.to_dict(),
                "num_classes": train_set.num_classes,
                "class_names": [train_set.coco.cats[c]["name"] for c in train_set.cat_ids],
            }
            atomic_write(checkpoint_path, lambda p, s=state: torch.save(s, p))
            public = [{k: v for k, v in e.items() if k != "assignment"} for e in log]
            text = json.dumps(public, indent=1)
            atomic_write(out / "log.json", lambda p, t=text: p.write_text(t))
            shown = {k: v for k, v in entry.items() if k != "assignment"}
            print(json.dumps(shown), flush=True)
        if distributed:
            dist.barrier()
    if distributed:
        dist.destroy_process_group()
    return log if rank == 0 else []


def load(checkpoint: str | Path) -> tuple[DNDETR, list[str]]:
    """(the model of a checkpoint written by ``train``, in eval mode; its class names)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = DNDETR(Config(**state["config"]), state["num_classes"])
    model.load_state_dict(state["model"])
    return model.eval(), state["class_names"]


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse(argv))
    except DataError as exc:
        print(f"models.train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
