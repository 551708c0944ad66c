"""Multi-scale deformable attention: the definition every backend is tested against, on top of F.grid_sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dnops.validation import check_ms_deform_attn_args


def _in_float(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float16 / bfloat16 computed in float32 (the result is rounded once at the end); other dtypes as they are."""
    return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


def _finite_locations(locations: torch.Tensor) -> torch.Tensor:
    """Locations past [-1, 2] read nothing (no corner of any level lies there), as NaN ones do in the kernels;
    grid_sample would turn them into NaN (inf, and 3e38 doubled) and NaN would spread, into the gradients too.
    Clamping moves them to equally empty places with a zero gradient, as the kernels give."""
    return torch.where(locations.isnan(), -1.0, locations).clamp(-1.0, 2.0)


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The softmax over the L * P weights of each (query, head) of (N, Lq, M, L, P) logits."""
    return logits.flatten(-2).softmax(-1).view_as(logits)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    attention_logits: bool = False,
) -> torch.Tensor:
    """Bilinear sampling of every level at every (x, y) location, weighted and summed over levels and points.

    Args:
        value: (N, S, M, D), S = sum over levels of H_l * W_l.
        spatial_shapes: (L, 2) int64 rows (H_l, W_l).
        level_start_index: (L,) int64, exclusive cumsum of H_l * W_l.
        sampling_locations: (N, Lq, M, L, P, 2) normalized (x, y); outside [0, 1] reads zeros.
        attention_weights: (N, Lq, M, L, P); with ``attention_logits`` these are logits and the softmax over
            the L * P weights of each (query, head) is part of the op.

    Returns:
        (N, Lq, M * D). float16 / bfloat16 are computed in float32 and rounded once at the end.
    """
    check_ms_deform_attn_args(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, values_when_compiling=True
    )
    out_dtype = value.dtype
    value, sampling_locations, attention_weights = _in_float(value, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    if attention_logits:
        attention_weights = softmax_rows(attention_weights)
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    sampling_locations = _finite_locations(sampling_locations)
    # grid_sample(align_corners=False) maps -1 / +1 to the outer pixel edges: exactly x * W - 0.5 in pixels.
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (N*M, D, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * p)
    out = (stacked * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous().to(out_dtype)


def ms_deform_attn_points(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    points_per_level: list[int],
    attention_logits: bool = False,
    sampling: str = "bilinear",
) -> torch.Tensor:
    """The op with a point count per level (RT-DETR v2, D-FINE, DEIM) and either sampling, level by level: the
    definition those cases are tested against.

    Args:
        value: (N, S, M, D).
        spatial_shapes, level_start_index: as ``ms_deform_attn``.
        sampling_locations: (N, Lq, M, sum_l P_l, 2) normalized (x, y), level-major (level 0's P_0 points first).
        attention_weights: (N, Lq, M, sum_l P_l); with ``attention_logits`` logits, softmaxed over all sum_l P_l.
        points_per_level: (P_0, ..., P_{L-1}).
        sampling: "bilinear" (grid_sample's, corners outside the map read 0) or "discrete": the one pixel
            (clamp(floor(x * W_l + 0.5), 0, W_l - 1), clamp(floor(y * H_l + 0.5), 0, H_l - 1)) with weight 1, no
            gradient to the locations (autograd sees none: zero). NaN locations read as -1 (discrete: the first
            pixel; bilinear: nothing).

    Returns:
        (N, Lq, M * D); float16 / bfloat16 computed in float32 and rounded once.
    """
    out_dtype = value.dtype
    value, sampling_locations, attention_weights = _in_float(value, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    if attention_logits:
        attention_weights = attention_weights.softmax(-1)
    sampling_locations = _finite_locations(sampling_locations)
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    out = value.new_zeros(n, lq, m, d)
    first = 0
    for (h, w), v, p in zip(shapes, value_levels, points_per_level, strict=True):
        loc = sampling_locations[:, :, :, first : first + p]  # (N, Lq, M, P, 2)
        weights = attention_weights[:, :, :, first : first + p]
        if sampling == "bilinear":
            image = v.flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
            grid = (2 * loc - 1).transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
            picked = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            picked = picked.view(n, m, d, lq, p).permute(0, 3, 1, 4, 2)  # (N, Lq, M, P, D)
        else:
            ix = (loc[..., 0] * w + 0.5).floor().clamp(0, w - 1).long()
            iy = (loc[..., 1] * h + 0.5).floor().clamp(0, h - 1).long()
            rows = (iy * w + ix).permute(0, 2, 1, 3).reshape(n, m, lq * p, 1).expand(-1, -1, -1, d)
            picked = torch.gather(v.transpose(1, 2), 2, rows).view(n, m, lq, p, d).permute(0, 2, 1, 3, 4)
        out = out + (picked * weights.unsqueeze(-1)).sum(3)
        first += p
    return out.reshape(n, lq, m * d).to(out_dtype)


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    attention_logits: bool = False,
    sampling: str = "bilinear",
    points_per_level: list[int] | None = None,
) -> torch.Tensor:
    """The same op written with one gather of corner rows instead of a grid_sample per level: every size it needs
    (H_l, W_l, level starts) is read from the tensors as data, never as Python numbers, so a traced or exported
    graph stays correct for any spatial_shapes given as its input (ONNX export uses it), and no tensor of it has a
    rank above 5 (CoreML's limit): levels and points are walked as one axis of K = sum_l P_l points, each reading
    its level's size and start through a (K,) level table.

    Args:
        sampling_locations: (N, Lq, M, L, P, 2), or (N, Lq, M, sum_l P_l, 2) level-major with ``points_per_level``.
        attention_weights: (N, Lq, M, L, P), or (N, Lq, M, sum_l P_l); with ``attention_logits`` softmaxed over
            the points of a (query, head).
        sampling: "bilinear", or "discrete": the one pixel of ``ms_deform_attn_points``' rule per point.

    Returns:
        As ``ms_deform_attn``; it holds the (N, M, Lq * K * 4, D) gathered corners in memory."""
    out_dtype = value.dtype
    value, sampling_locations, attention_weights = _in_float(value, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    if points_per_level is None:
        num_levels, p = sampling_locations.shape[3:5]
        points_per_level = [p] * num_levels
        sampling_locations, attention_weights = sampling_locations.flatten(3, 4), attention_weights.flatten(3, 4)
    lq, k = sampling_locations.shape[1], sampling_locations.shape[3]
    if attention_logits:
        attention_weights = attention_weights.softmax(-1)
    sampling_locations = _finite_locations(sampling_locations)
    level = torch.tensor(
        [lvl for lvl, count in enumerate(points_per_level) for _ in range(count)], device=value.device
    )  # (K,)
    size = spatial_shapes.flip(-1).to(sampling_locations.dtype)[level]  # (K, 2): (W_l, H_l) of each point
    start = level_start_index.to(sampling_locations.dtype)[level]  # (K,)
    rows_of = value.transpose(1, 2)  # (N, M, S, D)
    if sampling == "discrete":
        xy = torch.minimum((sampling_locations * size + 0.5).floor().clamp(min=0), size - 1)  # (N, Lq, M, K, 2)
        row = start + xy[..., 1] * size[:, 0] + xy[..., 0]
        index = row.to(torch.int64).permute(0, 2, 1, 3).reshape(n, m, lq * k)
        rows = torch.gather(rows_of, 2, index.unsqueeze(-1).expand(-1, -1, -1, d)).view(n, m, lq, k, d)
        weight = attention_weights.permute(0, 2, 1, 3).unsqueeze(-1)  # (N, M, Lq, K, 1)
        out = (rows * weight).sum(3).permute(0, 2, 1, 3).reshape(n, lq, m * d)
        return out if out.dtype == out_dtype else out.to(out_dtype)
    pixel = sampling_locations * size - 0.5  # (N, Lq, M, K, 2)
    origin = pixel.floor()
    frac = pixel - origin
    dx = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=pixel.dtype, device=pixel.device)  # the four corners
    dy = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=pixel.dtype, device=pixel.device)
    fx, fy = frac[..., 0:1], frac[..., 1:2]  # (N, Lq, M, K, 1)
    x = origin[..., 0:1] + dx  # (N, Lq, M, K, 4)
    y = origin[..., 1:2] + dy
    width, height = size[:, 0:1], size[:, 1:2]  # (K, 1)
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)  # NaN locations compare False: outside
    bilinear = torch.where(dx.bool(), fx, 1 - fx) * torch.where(dy.bool(), fy, 1 - fy)
    weight = torch.where(inside, bilinear * attention_weights.unsqueeze(-1), torch.zeros_like(bilinear))
    row = torch.where(inside, start.unsqueeze(-1) + y * width + x, torch.zeros_like(bilinear))
    # (N, M, Lq * K * 4) row indices into each (image, head)'s (S, D) values
    index = row.to(torch.int64).permute(0, 2, 1, 3, 4).reshape(n, m, lq * k * 4)
    rows = torch.gather(rows_of, 2, index.unsqueeze(-1).expand(-1, -1, -1, d))
    weight = weight.permute(0, 2, 1, 3, 4).reshape(n, m, lq, k * 4, 1)
    out = (rows.view(n, m, lq, k * 4, d) * weight).sum(3)  # (N, M, Lq, D)
    out = out.permute(0, 2, 1, 3).reshape(n, lq, m * d)
    # no .to() when the dtype is already right: torch 2.11's Dynamo returns zero gradients for a vjp (the compat
    # extension interface's traced backward) whose function ends in a no-op .to()
    return out if out.dtype == out_dtype else out.to(out_dtype)
