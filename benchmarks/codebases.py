"""The denoising of the codebases that compile their own op, on dnops against their own code: mmdetection's DINO
``CdnQueryGenerator`` (the installed package), detrex's ``GenerateDNQueries`` and DINO-project ``prepare_for_cdn``,
MaskDINO's ``prepare_for_dn`` (their transcriptions in originals/). One call each at B=16 images of 30 GT (the
quick run: 2 of 4), the codebases' default settings (mmdet: 100 DN queries, 900 matching; detrex DN-DETR: 5
groups, 300 queries; detrex DINO: dn_number 100, 900 queries; MaskDINO: dn_num 100, 300 queries), 80 classes,
hidden 256; the dispatched ops and device syncs of each are counted."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from types import SimpleNamespace

import torch

from benchmarks.suites import Bench, Target

CLASSES, HIDDEN = 80, 256


def _targets(batch: int, per_image: int, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        centre = torch.rand(per_image, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(per_image, 2, generator=g) * 0.2 + 0.05
        labels = torch.randint(0, CLASSES, (per_image,), generator=g)
        out.append({"labels": labels.to(device), "boxes": torch.cat([centre, size], 1).to(device)})
    return out


def _mmdet_samples(targets: list[dict]) -> list[SimpleNamespace]:
    """mmdet's data samples (img_shape, pixel x1y1x2y2 boxes) of the same GT in 640 x 640 images."""
    samples = []
    for t in targets:
        cxcy, wh = t["boxes"][:, :2] * 640, t["boxes"][:, 2:] * 640
        instances = SimpleNamespace(bboxes=torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1), labels=t["labels"])
        samples.append(SimpleNamespace(img_shape=(640, 640), gt_instances=instances))
    return samples


def codebase_dn_benches(target: Target) -> Iterator[Bench]:
    import originals
    from dnops.compat import detrex, maskdino

    batch, per_image = (2, 4) if target.quick else (16, 30)
    case = f"B={batch} {per_image} GT"
    device = target.device
    targets = _targets(batch, per_image, device)
    torch.manual_seed(0)

    if importlib.util.find_spec("mmdet") is None:
        bench = Bench("codebase_dn", case, "CdnQueryGenerator", "mmdet")
        bench.impls["mmdet"] = "skipped: mmdet is not installed (requirements-detectors.txt)"
        yield bench
    else:
        from dnops.compat import provide
        from dnops.compat.mmdet import CdnQueryGenerator

        provide("mmcv._ext")  # mmcv-lite has no compiled _ext; mmdet imports mmcv.ops
        from mmdet.models.layers.transformer.dino_layers import CdnQueryGenerator as Original

        cfg = {"dynamic": True, "num_dn_queries": 100}
        original = Original(CLASSES, HIDDEN, 900, 0.5, 1.0, cfg).to(device)
        ours = CdnQueryGenerator.from_module(original)
        samples = _mmdet_samples(targets)
        bench = Bench("codebase_dn", case, "CdnQueryGenerator", "mmdet", count_ops=True)
        bench.impls["mmdet"] = lambda i: original(samples)
        bench.impls["dnops"] = lambda i: ours(samples)
        yield bench

    labels, boxes = [t["labels"] for t in targets], [t["boxes"] for t in targets]
    original = originals.DetrexGenerateDNQueries(300, CLASSES + 1, HIDDEN, 5, 0.2, 0.4, True).to(device)
    ours = detrex.GenerateDNQueries(300, CLASSES + 1, HIDDEN, 5, 0.2, 0.4, True).to(device)
    ours.load_state_dict(original.state_dict())
    bench = Bench("codebase_dn", case, "GenerateDNQueries", "detrex", count_ops=True)
    # the original noises its inputs in place: each call gets copies (for both sides)
    bench.impls["detrex"] = lambda i: original([t.clone() for t in labels], [t.clone() for t in boxes])
    bench.impls["dnops"] = lambda i: ours([t.clone() for t in labels], [t.clone() for t in boxes])
    yield bench

    label_enc = torch.nn.Embedding(CLASSES, HIDDEN).to(device)
    args = (targets, 100, 0.5, 1.0, 900, CLASSES, HIDDEN, label_enc)
    bench = Bench("codebase_dn", case, "DINO prepare_for_cdn", "detrex", count_ops=True)
    bench.impls["detrex"] = lambda i: originals.detrex_prepare_for_cdn(None, *args)
    bench.impls["dnops"] = lambda i: detrex.prepare_for_cdn(None, *args)
    yield bench

    decoder = SimpleNamespace(
        training=True,
        dn_num=100,
        noise_scale=0.4,
        num_classes=CLASSES,
        label_enc=torch.nn.Embedding(CLASSES, HIDDEN).to(device),
        hidden_dim=HIDDEN,
        num_queries=300,
    )
    bench = Bench("codebase_dn", case, "prepare_for_dn", "MaskDINO", count_ops=True)
    bench.impls["MaskDINO"] = lambda i: originals.maskdino_prepare_for_dn(decoder, targets, None, None, batch)
    bench.impls["dnops"] = lambda i: maskdino.prepare_for_dn(decoder, targets, None, None, batch)
    yield bench
