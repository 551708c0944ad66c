"""``python -m models.export CHECKPOINT --out model.onnx``: the thin DN-DETR for inference as ONNX.

The graph takes ``images`` (B, 3, H, W) with B, H and W dynamic (H and W multiples of 32) and returns the last
decoder layer's ``logits`` (B, num_queries, num_classes) and ``boxes`` (B, num_queries, 4) normalized
(cx, cy, w, h). The deformable attention exports as standard ops (``dnops.reference.ms_deform_attn_gather``); the
denoising queries are a training-time input and are not part of it. After writing the file, the command runs it
in onnxruntime on images of the embedded dataset, at the model's size and at another size and batch, against
PyTorch, and exits non-zero if they differ by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.data import ensure_digits_dataset
from models.train import load


class Detector(torch.nn.Module):
    """images (B, 3, H, W) -> (logits, boxes) of the last decoder layer."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out["logits"][-1], out["boxes"][-1]


def export(model: torch.nn.Module, path: str | Path) -> Path:
    """Writes ``model`` (eval mode) to ``path`` with dynamic batch, height and width."""
    detector = Detector(model).eval()
    # an example large enough that no feature level is 1 pixel wide: the exporter would fix such a size
    size = max(128, model.cfg.image_size)
    example = torch.rand(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    height, width = torch.export.Dim("height32", min=2, max=256), torch.export.Dim("width32", min=2, max=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes, not the user's concern
        torch.onnx.export(
            detector,
            (example,),
            str(path),
            dynamo=True,
            input_names=["images"],
            output_names=["logits", "boxes"],
            dynamic_shapes={"images": {0: batch, 2: 32 * height, 3: 32 * width}},
        )
    return Path(path)


def check(model: torch.nn.Module, path: str | Path, images: list[np.ndarray]) -> float:
    """Largest absolute difference between onnxruntime and PyTorch over the batches made of ``images``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    detector = Detector(model).eval()
    size = model.cfg.image_size
    batches = [
        np.stack(images),
        np.stack([np.asarray(Image.fromarray(i).resize((size + 32, size))) for i in images[:1]]),
    ]
    worst = 0.0
    for batch in batches:
        pixels = torch.from_numpy(batch.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            want = detector(pixels)
        got = session.run(None, {"images": pixels.numpy()})
        worst = max(worst, *(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True)))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=Path("model.onnx"))
    parser.add_argument("--images", type=int, default=4, help="embedded-dataset images to check it on")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args(argv)
    model, _ = load(args.checkpoint)
    export(model, args.out)
    paths = ensure_digits_dataset(model.cfg.data)
    folder = paths["val"].parent.parent / "val"
    size = model.cfg.image_size
    files = sorted(folder.glob("*.png"))[: args.images]
    images = [np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in files]
    worst = check(model, args.out, images)
    print(f"wrote {args.out}; onnxruntime vs PyTorch on {len(images)} images: max abs difference {worst:.2e}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
