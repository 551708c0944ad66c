"""``python -m models.evaluate CHECKPOINT [--val-json F --val-images DIR] [--limit N]``: COCO AP of a trained model.

Without --val-json / --val-images it evaluates on the validation split the checkpoint was trained with (the
embedded dataset is regenerated if missing). Prints one json line: AP, AP50, AP75, APs, APm, APl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from models.config import Config
from models.data import CocoDetection, DataError, DigitsConfig, check_coco, ensure_digits_dataset
from models.engine import evaluate
from models.train import load


def val_set(cfg: Config, val_json: str = "", val_images: str = "") -> CocoDetection:
    """The validation set: the given COCO json + image folder, or the one of ``cfg`` (a checkpoint's config)."""
    if bool(val_json) != bool(val_images):
        raise DataError("--val-json and --val-images go together")
    if not val_json and cfg.val_json:
        val_json, val_images = cfg.val_json, cfg.val_images
    if val_json:
        check_coco(val_json)
        return CocoDetection(val_images, val_json, cfg.image_size)
    root = Path(cfg.data)
    paths = ensure_digits_dataset(root, cfg.num_train, cfg.num_val, cfg=DigitsConfig.for_image(cfg.image_size))
    return CocoDetection(root / "val", paths["val"], cfg.image_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint.pth written by models.train")
    parser.add_argument("--val-json", default="")
    parser.add_argument("--val-images", default="")
    parser.add_argument("--limit", type=int, default=0, help="evaluate on the first N images (0: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    model, _ = load(args.checkpoint)
    try:
        dataset = val_set(model.cfg, args.val_json, args.val_images)
    except DataError as exc:
        print(f"models.evaluate: {exc}", file=sys.stderr)
        return 2
    with torch.no_grad():
        print(json.dumps(evaluate(model, dataset, args.batch_size, args.limit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
