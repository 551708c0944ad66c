"""Benchmark shapes and input builders: Deformable-DETR, DN-DETR and DINO training shapes (docs/benchmarks.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ---- multi-scale deformable attention ---------------------------------------------------------------------


@dataclass(frozen=True)
class MSDACase:
    name: str
    n: int
    shapes: tuple[tuple[int, int], ...]
    lq: int | None  # None: Lq = S (encoder)
    m: int = 8
    d: int = 32
    p: int = 4


ENC800 = ((100, 167), (50, 84), (25, 42), (13, 21))
MSDA_CASES = {
    "enc800": MSDACase("enc800", 1, ENC800, None),
    "enc800-b4": MSDACase("enc800-b4", 4, ENC800, None),
    "enc512": MSDACase("enc512", 2, ((64, 64), (32, 32), (16, 16), (8, 8)), None),
    "dec": MSDACase("dec", 1, ENC800, 1100),
    "tiny": MSDACase("tiny", 1, ((8, 10), (4, 5)), 30, m=2, d=8, p=2),
}


def msda_inputs(
    case: MSDACase, law: str = "realistic", dtype=torch.float32, device="cpu", requires_grad=False, geometry_dtype=None
):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights): value in ``dtype``, the
    locations and weights in ``geometry_dtype`` (default ``dtype``; float32 with a half value is what an AMP model
    passes).

    law "uniform": locations uniform in [0, 1]; "realistic": each query's reference point plus N(0, 2 pixels)
    offsets per level, as a trained deformable encoder samples. Encoder queries (Lq = S) have their own pixel
    centre as reference point, in level order, as Deformable-DETR's encoder; decoder queries a uniform one.
    """
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(case.shapes, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    s = int(sizes.sum())
    lq = s if case.lq is None else case.lq
    nl = len(case.shapes)
    value = torch.randn(case.n, s, case.m, case.d, generator=g)
    if law == "uniform":
        loc = torch.rand(case.n, lq, case.m, nl, case.p, 2, generator=g)
    elif law == "realistic":
        if case.lq is None:
            centres = [
                torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"), -1)
                for h, w in case.shapes
            ]
            ref = (
                torch.cat([c.reshape(-1, 2) for c in centres])
                .view(1, lq, 1, 1, 1, 2)
                .expand(case.n, -1, -1, -1, -1, -1)
            )
        else:
            ref = torch.rand(case.n, lq, 1, 1, 1, 2, generator=g)
        wh = shapes.flip(1).to(torch.float32).view(1, 1, 1, nl, 1, 2)
        loc = ref + torch.randn(case.n, lq, case.m, nl, case.p, 2, generator=g) * 2.0 / wh
    else:
        raise ValueError(law)
    weights = torch.rand(case.n, lq, case.m, nl * case.p, generator=g).softmax(-1).view(case.n, lq, case.m, nl, case.p)
    geometry = geometry_dtype or dtype
    tensors = [
        t.to(device=device, dtype=dt).requires_grad_(requires_grad)
        for t, dt in ((value, dtype), (loc, geometry), (weights, geometry))
    ]
    return tensors[0], shapes.to(device), starts.to(device), tensors[1], tensors[2]


@dataclass(frozen=True)
class RTCase:
    """A real-time DETR decoder's cross-attention: point counts per level, Lq = matching + DN queries."""

    name: str
    n: int
    shapes: tuple[tuple[int, int], ...]
    points: tuple[int, ...]
    lq: int
    m: int = 8
    d: int = 32


RT_CASES = {
    # D-FINE-L at 640 px: strides 8, 16, 32; 300 queries + 200 DN queries; points [3, 6, 3]
    "dfine-l": RTCase("dfine-l", 4, ((80, 80), (40, 40), (20, 20)), (3, 6, 3), 500),
    # a DEIM-nano-like decoder: two levels, head dim 8, six points each
    "deim-nano": RTCase("deim-nano", 4, ((40, 40), (20, 20)), (6, 6), 400, m=8, d=8),
    "rt-tiny": RTCase("rt-tiny", 1, ((8, 8), (4, 4)), (2, 3), 30, m=2, d=8),
}


def rt_inputs(
    case: RTCase, method: str = "default", dtype=torch.float32, device="cpu", requires_grad=False, geometry_dtype=None
):
    """(value (N, S, M, D), spatial shapes as a list, sampling_locations (N, Lq, M, sum P, 2), attention_weights
    (N, Lq, M, sum P), points): uniform reference points plus N(0, 2 pixels) offsets per level, weights softmaxed;
    value in ``dtype``, locations and weights in ``geometry_dtype`` (default ``dtype``).
    ``method="discrete"``: the locations take no gradient (the originals freeze their offsets)."""
    g = torch.Generator().manual_seed(0)
    s = sum(h * w for h, w in case.shapes)
    total = sum(case.points)
    value = torch.randn(case.n, s, case.m, case.d, generator=g)
    size = torch.tensor([[w, h] for (h, w), p in zip(case.shapes, case.points, strict=True) for _ in range(p)])
    ref = torch.rand(case.n, case.lq, 1, 1, 2, generator=g)
    loc = ref + torch.randn(case.n, case.lq, case.m, total, 2, generator=g) * 2.0 / size.to(torch.float32)
    weights = torch.randn(case.n, case.lq, case.m, total, generator=g).softmax(-1)
    geometry = geometry_dtype or dtype
    value = value.to(device=device, dtype=dtype)
    loc, weights = (t.to(device=device, dtype=geometry) for t in (loc, weights))
    value.requires_grad_(requires_grad)
    weights.requires_grad_(requires_grad)
    loc.requires_grad_(requires_grad and method == "default")
    return value, [list(hw) for hw in case.shapes], loc, weights, list(case.points)


# ---- denoising queries --------------------------------------------------------------------------------------

COCO_COUNTS = [3, 7, 12, 5, 30, 1, 9, 0]


def dn_counts(batch: int) -> list[int]:
    return [COCO_COUNTS[i % len(COCO_COUNTS)] for i in range(batch)]


def dn_inputs(batch: int, num_classes: int = 91, device="cpu"):
    g = torch.Generator().manual_seed(0)
    counts = dn_counts(batch)
    k = sum(counts)
    labels = torch.randint(0, num_classes, (k,), generator=g)
    wh = 0.05 + 0.4 * torch.rand(k, 2, generator=g)
    cxcy = wh / 2 + (1 - wh) * torch.rand(k, 2, generator=g)
    return labels.to(device), torch.cat([cxcy, wh], 1).to(device), counts


# ---- DN self-attention ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DNAttnCase:
    name: str
    groups: int
    group_size: int
    num_queries: int
    batch: int = 2
    heads: int = 8
    head_dim: int = 32

    @property
    def pad_size(self) -> int:
        return self.groups * self.group_size

    @property
    def width(self) -> int:
        return self.pad_size + self.num_queries


DN_ATTN_CASES = {
    "dn-detr": DNAttnCase("dn-detr", 5, 20, 300),
    "dino": DNAttnCase("dino", 10, 20, 900),
    "big-dn": DNAttnCase("big-dn", 10, 50, 300),
    # RT-DETR / D-FINE / DEIM: num_denoising 100 over 10 GT -> 10 groups of [10 positives | 10 negatives], 300 queries
    "rt-detr": DNAttnCase("rt-detr", 10, 20, 300, batch=4),
}


def dn_attn_inputs(case: DNAttnCase, dtype=torch.float32, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, case.heads, case.width, case.head_dim)
    return [torch.randn(shape, generator=g).to(device, dtype).requires_grad_(requires_grad) for _ in range(3)]
