"""Input builders and an independent loop implementation of multi-scale deformable attention."""

from __future__ import annotations

import math

import torch


def make_inputs(
    n=2,
    shapes=((4, 5), (2, 3)),
    lq=3,
    m=2,
    d=4,
    p=2,
    dtype=torch.float64,
    low=-0.1,
    high=1.1,
    requires_grad=False,
    device="cpu",
):
    """Random MSDA inputs; locations uniform in [low, high] so some corners fall outside the maps."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cumsum(sizes, 0) - sizes
    s = int(sizes.sum())
    nl = len(shapes)
    value = torch.randn(n, s, m, d, dtype=dtype, device=device)
    loc = torch.rand(n, lq, m, nl, p, 2, dtype=dtype, device=device) * (high - low) + low
    weights = torch.rand(n, lq, m, nl, p, dtype=dtype, device=device)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    for t in (value, loc, weights):
        t.requires_grad_(requires_grad)
    return value, spatial_shapes, level_start_index, loc, weights


def loop_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The op's definition written literally, one sample and one corner at a time (float64)."""
    value = value.double()
    loc = sampling_locations.double()
    aw = attention_weights.double()
    n, _, m, d = value.shape
    _, lq, _, nl, p, _ = loc.shape
    out = torch.zeros(n, lq, m, d, dtype=torch.float64)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for level in range(nl):
                    h, w = (int(x) for x in spatial_shapes[level])
                    start = int(level_start_index[level])
                    for point in range(p):
                        x = float(loc[b, q, head, level, point, 0]) * w - 0.5
                        y = float(loc[b, q, head, level, point, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yi in (y0, y0 + 1):
                            for xi in (x0, x0 + 1):
                                if 0 <= xi < w and 0 <= yi < h:
                                    wgt = (1 - abs(x - xi)) * (1 - abs(y - yi)) * float(aw[b, q, head, level, point])
                                    out[b, q, head] += wgt * value[b, start + yi * w + xi, head]
    return out.reshape(n, lq, m * d)


def onnx_max_rank(path: str) -> int:
    """The largest rank of any tensor of an ONNX file, after onnx's shape inference (CoreML converts up to 5)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(onnx.load(path))
    values = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return max(len(v.type.tensor_type.shape.dim) for v in values)
