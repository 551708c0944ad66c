from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from dnops import _backend, reference
from dnops._types import DNQueries
from dnops.reference.dn_queries import dn_layout
from dnops.validation import check_counts, check_dn_queries_args, checked_gt_labels

if _backend.HAS_C:

    @torch.library.register_fake("dnops::dn_queries")
    def _(labels, boxes, counts, num_groups, max_gt, contrastive, num_classes, ratio, scale, seed, abs_size=False):
        pad = num_groups * max_gt * (2 if contrastive else 1)
        batch = len(counts)
        return (
            labels.new_empty((batch, pad)),
            boxes.new_empty((batch, pad, 4)),
            labels.new_empty((batch, pad)),
            labels.new_empty((batch, pad), dtype=torch.bool),
        )


MODES = ("dn", "cdn")
DEFAULT_LABEL_NOISE = {"dn": 0.2, "cdn": 0.5}
DEFAULT_BOX_NOISE = {"dn": 0.4, "cdn": 1.0}


def dn_queries(
    labels: torch.Tensor,
    boxes: torch.Tensor,
    counts: Sequence[int] | torch.Tensor,
    *,
    num_classes: int,
    mode: str = "dn",
    num_groups: int = 5,
    dn_number: int = 100,
    label_noise_ratio: float | None = None,
    box_noise_scale: float | None = None,
    max_dn_queries: int | None = None,
    seed: int | None = None,
) -> DNQueries:
    """Noised ground-truth queries for DN-DETR ("dn") or DINO's contrastive denoising ("cdn").

    Args:
        labels: (K,) int64 in [0, num_classes), all images' GT concatenated.
        boxes: (K, 4) normalized (cx, cy, w, h).
        counts: (B,) GT per image, preferably a host list (a device tensor costs a sync to read).
        num_classes: number of classes; also the label of padding slots.
        mode: "dn" (num_groups groups of max(counts)) or "cdn" (positive + negative halves, groups from
            dn_number as DINO computes them).
        label_noise_ratio: DN flips a label with this probability, CDN with half of it
            (defaults 0.2 / 0.5, DN-DETR's and DINO's).
        box_noise_scale: lambda of the box noise (defaults 0.4 / 1.0).
        max_dn_queries: optional cap on pad_size for crowded images (see ``dn_layout``).
        seed: Philox key; None draws one from torch's default generator.

    Returns:
        DNQueries with (B, pad) labels / gt_index / negative and (B, pad, 4) boxes, batch-first.
    """
    if _backend.exporting():
        raise RuntimeError("dnops.dn_queries is not exported: denoising queries are a training-time input")
    if mode not in MODES:
        raise ValueError(f"dnops.dn_queries: mode must be one of {MODES}, got {mode!r}")
    counts = check_counts(counts)
    ratio = DEFAULT_LABEL_NOISE[mode] if label_noise_ratio is None else float(label_noise_ratio)
    scale = DEFAULT_BOX_NOISE[mode] if box_noise_scale is None else float(box_noise_scale)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"dnops.dn_queries: label_noise_ratio must be in [0, 1], got {ratio}")
    if not 0.0 <= scale < math.inf:  # NaN fails too; comparisons trace under torch.compile, math.isfinite not
        raise ValueError(f"dnops.dn_queries: box_noise_scale must be finite and >= 0, got {scale}")
    if seed is not None and not (isinstance(seed, numbers.Integral) and 0 <= seed < 2**63):
        raise ValueError(f"dnops.dn_queries: seed must be an int in [0, 2**63), got {seed!r}")
    contrastive = mode == "cdn"
    flip = ratio * 0.5 if contrastive else ratio
    groups, max_gt = dn_layout(counts, contrastive, num_groups, dn_number, max_dn_queries)
    group_size = max_gt * (2 if contrastive else 1)
    if len(counts) * groups * group_size >= 2**31:
        raise ValueError(
            f"dnops.dn_queries: {len(counts)} images x {groups} groups x {group_size} slots is more than 2**31 "
            "DN queries: lower num_groups / dn_number, or cap them with max_dn_queries"
        )
    out = generate(labels, boxes, counts, groups, max_gt, contrastive, num_classes, flip, scale, seed)
    return DNQueries(
        *out, num_groups=groups, group_size=group_size, pad_size=groups * group_size, contrastive=contrastive
    )


def generate(
    labels: torch.Tensor,
    boxes: torch.Tensor,
    counts: list[int],
    groups: int,
    max_gt: int,
    contrastive: bool,
    num_classes: int,
    flip: float,
    scale: float,
    seed: int | None,
    abs_size: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel with an explicit layout (``groups`` groups of ``max_gt`` GT slots, twice that for contrastive)
    and label flip probability, on the chosen backend: (labels, boxes, gt_index, negative), each (B, pad[, 4]).
    For adapters whose originals lay out or flip otherwise than DN-DETR / DINO; counts as check_counts returns.
    ``abs_size``: CDN sizes whose corners crossed are their distance (D-FINE / DEIM), not 0."""
    backend = _backend.choose("dn_queries", labels.device)
    if seed is None and _backend.is_compiled(backend):
        seed = -1  # the C++ op draws its own key: under torch.compile it is drawn per call, not frozen while tracing
    elif seed is None and backend == "reference" and torch.compiler.is_compiling():
        # likewise drawn in the graph, as a 0-dim tensor: a host int drawn while tracing would be frozen into it
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    elif seed is None:
        seed = _backend.draw_seed()
    seed = seed if isinstance(seed, torch.Tensor) else int(seed)
    # the C++ kernel range-checks the labels while it reads them
    check_dn_queries_args(labels, boxes, counts, num_classes, check_values=not _backend.is_compiled(backend))
    if not _backend.is_compiled(backend):
        labels = checked_gt_labels(labels, boxes, num_classes)
    args = (labels, boxes, counts, groups, max_gt, contrastive, num_classes, flip, scale, seed, abs_size)
    if _backend.is_compiled(backend):
        # the overload itself: the packet's overload resolution is ~5 us of a ~60 us call in a training step
        return torch.ops.dnops.dn_queries.default(*args)
    if backend == "triton":
        from dnops.triton.dn_queries import dn_queries_triton

        return dn_queries_triton(*args)
    return reference.dn_queries(*args)
