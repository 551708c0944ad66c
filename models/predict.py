"""``python -m models.predict IMAGE --checkpoint RUN/checkpoint.pth [--out pred.png]``: draw predicted boxes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from models.engine import predict
from models.train import load


def draw_predictions(
    model: torch.nn.Module, image_path: str | Path, out: str | Path, threshold: float = 0.3, names=None
) -> list[dict]:
    """Runs ``model`` on the image, draws the detections scoring >= ``threshold`` into the PNG ``out``;
    returns them as dicts (label, score, box (x0, y0, x1, y1) in pixels). The image is resized to the
    model's training size and the boxes are drawn on the original."""
    image = Image.open(image_path).convert("RGB")
    w, h = image.size
    size = model.cfg.image_size
    pixels = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    det = predict(model, torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous())[0]
    keep = det["scores"] >= threshold
    found = []
    canvas = image.copy()
    pen = ImageDraw.Draw(canvas)
    for score, label, (cx, cy, bw, bh) in zip(
        det["scores"][keep].tolist(), det["labels"][keep].tolist(), det["boxes"][keep].tolist(), strict=True
    ):
        box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
        name = names[label] if names else str(label)
        pen.rectangle(box, outline=(255, 64, 64), width=2)
        pen.text((box[0] + 2, box[1] + 1), f"{name} {score:.2f}", fill=(255, 255, 0))
        found.append({"label": name, "score": score, "box": box})
    canvas.save(out)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("image")
    p.add_argument("--checkpoint", default="runs/dn/checkpoint.pth")
    p.add_argument("--out", default="pred.png")
    p.add_argument("--threshold", type=float, default=0.3)
    args = p.parse_args(argv)
    model, names = load(args.checkpoint)
    found = draw_predictions(model, args.image, args.out, args.threshold, names)
    for det in found:
        print(f"{det['label']} {det['score']:.3f} {tuple(round(v, 1) for v in det['box'])}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
