"""Argument checks shared by every backend, so a bad call fails the same way whichever kernel would run.

Checks read only metadata, plus tensor values when those live on the CPU (reading them is free there and
would cost a device sync elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"dnops.{op}: {msg}")


def check_dn_structure(pad_size: int, group_size: int, num_queries: int, op: str = "dn_attn_mask") -> None:
    if pad_size < 0:
        _fail(op, f"pad_size must be >= 0, got {pad_size}")
    if num_queries < 0:
        _fail(op, f"num_queries must be >= 0, got {num_queries}")
    if pad_size > 0 and group_size <= 0:
        _fail(op, f"group_size must be > 0 when pad_size > 0, got {group_size}")
    if pad_size > 0 and pad_size % group_size:
        _fail(op, f"pad_size ({pad_size}) must be a multiple of group_size ({group_size})")


def check_ms_deform_attn_args(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    op = "ms_deform_attn"
    named = {
        "value": (value, 4, "(N, S, M, D)"),
        "spatial_shapes": (spatial_shapes, 2, "(L, 2)"),
        "level_start_index": (level_start_index, 1, "(L,)"),
        "sampling_locations": (sampling_locations, 6, "(N, Lq, M, L, P, 2)"),
        "attention_weights": (attention_weights, 5, "(N, Lq, M, L, P)"),
    }
    for name, (t, rank, shape) in named.items():
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            _fail(op, f"{name} must have rank {rank} {shape}, got shape {tuple(t.shape)}")
    if value.dtype not in FLOAT_TYPES:
        _fail(op, f"value must be float16/bfloat16/float32/float64, got {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if named[name][0].dtype != value.dtype:
            _fail(op, f"{name} has dtype {named[name][0].dtype} but value has {value.dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        if named[name][0].dtype != torch.int64:
            _fail(op, f"{name} must be int64, got {named[name][0].dtype}")
    for name, (t, _, _) in named.items():
        if t.device != value.device:
            _fail(op, f"{name} is on {t.device} but value is on {value.device}")
    n, s, m, _ = value.shape
    nl = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2 or nl < 1:
        _fail(op, f"spatial_shapes must be (L, 2) with L >= 1, got {tuple(spatial_shapes.shape)}")
    if level_start_index.shape[0] != nl:
        _fail(op, f"level_start_index has {level_start_index.shape[0]} levels but spatial_shapes has {nl}")
    loc = sampling_locations.shape
    if loc[0] != n or loc[2] != m or loc[3] != nl or loc[5] != 2 or loc[4] < 1:
        _fail(op, f"sampling_locations must be (N={n}, Lq, M={m}, L={nl}, P>=1, 2), got {tuple(loc)}")
    if tuple(attention_weights.shape) != tuple(loc[:5]):
        _fail(op, f"attention_weights must be {tuple(loc[:5])}, got {tuple(attention_weights.shape)}")
    if spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling():
        if (spatial_shapes <= 0).any():
            _fail(op, f"spatial_shapes must be positive, got {spatial_shapes.tolist()}")
        sizes = spatial_shapes.prod(1)
        if int(sizes.sum()) != s:
            _fail(op, f"spatial_shapes cover {int(sizes.sum())} positions but value has S={s}")
        starts = torch.cumsum(sizes, 0) - sizes
        if not torch.equal(starts, level_start_index):
            _fail(op, f"level_start_index {level_start_index.tolist()} != exclusive cumsum {starts.tolist()}")


def check_dn_self_attention_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_size: int, group_size: int
) -> None:
    op = "dn_self_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            _fail(op, f"{name} must be (B, H, W, Dh), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_TYPES:
            _fail(op, f"{name} must be a floating tensor, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            _fail(op, f"q, k, v must share dtype and device, got {q.dtype}/{q.device} and {t.dtype}/{t.device}")
    if k.shape != q.shape or v.shape != q.shape:
        _fail(
            op, f"q, k, v must share one (B, H, W, Dh) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    width = q.shape[2]
    if pad_size > width:
        _fail(op, f"pad_size ({pad_size}) exceeds the sequence length W={width}")
    check_dn_structure(pad_size, group_size, width - pad_size, op)


def check_dn_queries_args(
    labels: torch.Tensor, boxes: torch.Tensor, counts: Sequence[int], num_classes: int, check_values: bool = True
) -> None:
    """``check_values=False`` skips the label range check (the C++ kernel does it while reading the labels)."""
    op = "dn_queries"
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
        _fail(
            op,
            f"labels must be a (K,) int64 tensor, got {getattr(labels, 'dtype', type(labels))} "
            f"of shape {tuple(getattr(labels, 'shape', ()))}",
        )
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        _fail(op, f"boxes must be a (K, 4) tensor, got shape {tuple(getattr(boxes, 'shape', ()))}")
    if boxes.dtype not in FLOAT_TYPES:
        _fail(op, f"boxes must be a floating tensor, got {boxes.dtype}")
    if boxes.device != labels.device:
        _fail(op, f"boxes are on {boxes.device} but labels on {labels.device}")
    if boxes.shape[0] != labels.shape[0]:
        _fail(op, f"labels ({labels.shape[0]}) and boxes ({boxes.shape[0]}) must have one row per GT")
    if any(c < 0 for c in counts):
        _fail(op, f"counts must be >= 0, got {list(counts)}")
    if sum(counts) != labels.shape[0]:
        _fail(op, f"counts sum to {sum(counts)} but there are {labels.shape[0]} GT rows")
    if num_classes < 1:
        _fail(op, f"num_classes must be >= 1, got {num_classes}")
    if check_values and labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            _fail(op, f"labels must be in [0, num_classes={num_classes}), got values in [{lo}, {hi}]")
