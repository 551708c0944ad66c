"""The embedded digits dataset and the COCO loader."""

import json

import numpy as np
import torch

from models.data import CocoDetection, DigitsConfig, collate, ensure_digits_dataset, make_digits_dataset

CFG = DigitsConfig(image_size=64, max_digits=4, min_scale=12, max_scale=24, seed=3)


def test_generation_is_deterministic(tmp_path):
    a = make_digits_dataset(tmp_path / "a", num_train=5, num_val=2, cfg=CFG)
    b = make_digits_dataset(tmp_path / "b", num_train=5, num_val=2, cfg=CFG)
    assert a["train"].read_text() == b["train"].read_text()
    assert (tmp_path / "a/train/000003.png").read_bytes() == (tmp_path / "b/train/000003.png").read_bytes()
    c = make_digits_dataset(tmp_path / "c", num_train=5, num_val=2, cfg=DigitsConfig(image_size=64, seed=4))
    assert c["train"].read_text() != a["train"].read_text()


def test_loader_boxes_cover_the_ink(tmp_path):
    paths = ensure_digits_dataset(tmp_path, num_train=6, num_val=2, cfg=CFG)
    data = CocoDetection(tmp_path / "train", paths["train"])
    assert len(data) == 6 and data.num_classes == 10
    coco = json.loads(paths["train"].read_text())
    assert len(coco["annotations"]) >= 6
    total = 0
    for i in range(len(data)):
        image, target = data[i]
        assert image.shape == (3, 64, 64) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.shape == (len(labels), 4) and ((boxes >= 0) & (boxes <= 1)).all()
        assert labels.dtype == torch.int64 and (labels >= 0).all() and (labels < 10).all()
        ink = image[0].numpy() > 32 / 255
        covered = np.zeros_like(ink)
        for cx, cy, w, h in (boxes * 64).tolist():
            covered[round(cy - h / 2) : round(cy + h / 2), round(cx - w / 2) : round(cx + w / 2)] = True
        assert not (ink & ~covered).any(), "ink outside every box"
        total += len(labels)
    assert total == len(coco["annotations"])
    images, targets = collate([data[0], data[1]])
    assert images.shape == (2, 3, 64, 64) and len(targets) == 2


def test_ensure_reuses_existing(tmp_path):
    paths = ensure_digits_dataset(tmp_path, num_train=3, num_val=1, cfg=CFG)
    stamp = paths["train"].stat().st_mtime_ns
    ensure_digits_dataset(tmp_path, num_train=3, num_val=1, cfg=CFG)
    assert paths["train"].stat().st_mtime_ns == stamp
