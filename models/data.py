"""COCO-format detection data: a loader for any COCO json + image folder, and an embedded default dataset.

The default dataset is generated on first use with a fixed seed, nothing downloaded: scenes of a few
handwritten digits (scikit-learn's bundled 8x8 digits, real data, 10 classes) at random scales and positions,
written as PNG images with COCO json train / val splits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DIGIT_NAMES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class DigitsConfig:
    image_size: int = 128
    min_digits: int = 1
    max_digits: int = 6
    min_scale: int = 14  # pixels, side of a pasted digit
    max_scale: int = 48
    max_overlap: float = 0.2  # IoU above which a new digit is placed elsewhere
    seed: int = 0

    @classmethod
    def for_image(cls, image_size: int) -> DigitsConfig:
        """The default scenes drawn on a canvas of ``image_size``: digit sizes scaled with the canvas (14 to 48
        pixels at 128), so a smaller canvas holds the same scenes, not fewer and larger digits."""
        factor = image_size / cls.image_size
        return cls(image_size, min_scale=round(cls.min_scale * factor), max_scale=round(cls.max_scale * factor))


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / float(aw * ah + bw * bh - inter)


def _scene(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, cfg: DigitsConfig):
    """One grayscale canvas (uint8) and its boxes (x, y, w, h) and labels."""
    size = cfg.image_size
    canvas = np.zeros((size, size), dtype=np.float32)
    boxes: list[tuple[int, int, int, int]] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(cfg.min_digits, cfg.max_digits + 1))):
        for _attempt in range(20):
            side = int(rng.integers(cfg.min_scale, cfg.max_scale + 1))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if all(_iou((x, y, side, side), b) <= cfg.max_overlap for b in boxes):
                break
        else:
            continue
        k = int(rng.integers(len(digits)))
        glyph = Image.fromarray((digits[k] * (255.0 / 16.0)).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        patch = np.asarray(glyph, dtype=np.float32)
        ys, xs = np.nonzero(patch > 32)
        if len(xs) == 0:
            continue
        canvas[y : y + side, x : x + side] = np.maximum(canvas[y : y + side, x : x + side], patch)
        # the box is the glyph's ink, not the pasted square
        x0, y0, x1, y1 = x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1
        boxes.append((int(x0), int(y0), int(x1 - x0), int(y1 - y0)))
        classes.append(int(labels[k]))
    return canvas.astype(np.uint8), boxes, classes


class DataError(ValueError):
    """A dataset that cannot be trained on, with what is wrong and in which file."""


def make_digits_dataset(
    root: str | Path, num_train: int = 2000, num_val: int = 400, cfg: DigitsConfig = DigitsConfig()
):
    """Writes root/{train,val}/*.png and root/annotations/{train,val}.json (COCO format); returns the json paths.

    Deterministic for a given config: the same seed writes the same images and annotations.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    data = load_digits()
    rng = np.random.default_rng(cfg.seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    paths = {}
    ann_id = 1
    for split, count in (("train", num_train), ("val", num_val)):
        shutil.rmtree(root / split, ignore_errors=True)  # no images of an earlier, larger generation stay behind
        (root / split).mkdir()
        coco = {
            "images": [],
            "annotations": [],
            "categories": [{"id": d + 1, "name": name} for d, name in enumerate(DIGIT_NAMES)],
        }
        for image_id in range(1, count + 1):
            canvas, boxes, classes = _scene(rng, data.images, data.target, cfg)
            name = f"{image_id:06d}.png"
            Image.fromarray(canvas).save(root / split / name)
            coco["images"].append(
                {"id": image_id, "file_name": name, "width": cfg.image_size, "height": cfg.image_size}
            )
            for box, cls in zip(boxes, classes, strict=True):
                coco["annotations"].append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cls + 1,
                        "bbox": list(box),
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
                ann_id += 1
        paths[split] = root / "annotations" / f"{split}.json"
        paths[split].write_text(json.dumps(coco))
    _params_path(root).write_text(json.dumps(_params(num_train, num_val, cfg)))
    return paths


def _params_path(root: Path) -> Path:
    return root / "annotations" / "params.json"


def _params(num_train: int, num_val: int, cfg: DigitsConfig) -> dict:
    return {"num_train": num_train, "num_val": num_val, "cfg": dataclasses.asdict(cfg)}


def ensure_digits_dataset(
    root: str | Path, num_train: int | None = None, num_val: int | None = None, cfg: DigitsConfig | None = None
) -> dict[str, Path]:
    """The embedded dataset under ``root``: generated on first use (with ``cfg``), and again when a split size given
    differs from the one it was made with. Sizes not given take what is there (2000 / 400 for a new one)."""
    root = Path(root)
    paths = {split: root / "annotations" / f"{split}.json" for split in ("train", "val")}
    given = {k: v for k, v in (("num_train", num_train), ("num_val", num_val)) if v is not None}
    made_with = {}
    if all(p.exists() for p in paths.values()):
        try:
            made_with = json.loads(_params_path(root).read_text())
        except (OSError, ValueError):
            made_with = {}
        if all(made_with.get(k) == v for k, v in given.items()):
            return paths
    sizes = {k: made_with[k] for k in ("num_train", "num_val") if k in made_with} | given
    return make_digits_dataset(root, **sizes, **({} if cfg is None else {"cfg": cfg}))


def check_coco(path: str | Path) -> None:
    """Raises DataError naming ``path`` and the entry when a COCO json cannot be trained on: unreadable, missing
    or empty sections, annotations of unknown images or categories, boxes that are not 4 finite numbers."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path}: needs a '{key}' list (COCO format)")
    if not data["categories"]:
        raise DataError(f"{path}: 'categories' is empty")
    if any(not isinstance(c, dict) or "id" not in c for c in data["categories"]):
        raise DataError(f"{path}: every category needs an 'id'")
    if any(not isinstance(i, dict) or "id" not in i or "file_name" not in i for i in data["images"]):
        raise DataError(f"{path}: every image needs an 'id' and a 'file_name'")
    images = {i["id"] for i in data["images"]}
    categories = {c["id"] for c in data["categories"]}
    for n, ann in enumerate(data["annotations"]):
        where = f"{path}: annotation {ann.get('id', f'#{n}') if isinstance(ann, dict) else f'#{n}'}"
        if not isinstance(ann, dict):
            raise DataError(f"{where}: must be an object")
        if ann.get("image_id") not in images:
            raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in categories:
            raise DataError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        bbox = ann.get("bbox")
        numbers = isinstance(bbox, list) and len(bbox) == 4 and all(type(v) in (int, float) for v in bbox)
        if not numbers or not all(math.isfinite(v) for v in bbox):
            raise DataError(f"{where}: bbox must be 4 finite numbers [x, y, width, height], got {bbox!r}")


class CocoDetection(torch.utils.data.Dataset):
    """Any COCO json + image folder as (image (3, H, W) float in [0, 1], target).

    With ``size``, every image is resized to (size, size) so that images of any shapes batch together (boxes are
    normalized, so they are unchanged; orig_size keeps the file's size for evaluation).

    target: labels (n,) int64 in [0, num_classes) (categories sorted by id), boxes (n, 4) normalized
    (cx, cy, w, h), image_id, orig_size (h, w). Crowd annotations and empty boxes are dropped.
    """

    def __init__(self, images: str | Path, annotations: str | Path, size: int | None = None) -> None:
        from pycocotools.coco import COCO

        check_coco(annotations)
        self.images = Path(images)
        self.size = size
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports its progress on stdout
            self.coco = COCO(str(annotations))
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.label_of = {cat: i for i, cat in enumerate(self.cat_ids)}

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = Image.open(self.images / info["file_name"]).convert("RGB")
        w, h = image.size
        anns = [
            a
            for a in self.coco.imgToAnns[image_id]
            if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0
        ]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.stack(
            [(xywh[:, 0] + xywh[:, 2] / 2) / w, (xywh[:, 1] + xywh[:, 3] / 2) / h, xywh[:, 2] / w, xywh[:, 3] / h], 1
        )
        target = {
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "boxes": boxes.clamp(0.0, 1.0),
            "image_id": image_id,
            "orig_size": (h, w),
        }
        if self.size is not None and (w, h) != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return pixels, target


def collate(batch):
    """(images (B, 3, H, W), list of targets); images of one dataset share a size."""
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)
