"""ultralytics' RT-DETR (``pip install ultralytics``) on dnops: ``use_dnops(model)``.

Three parts of a model built by ultralytics (``RTDETRDetectionModel``, or the ``ultralytics.RTDETR`` wrapper) run on
dnops after ``use_dnops(model)``, in place, parameters and state_dict unchanged:

- every ``MSDeformAttn`` (the decoder's cross-attention): its forward, ultralytics' own code, calls this module's
  ``multi_scale_deformable_attn_pytorch`` (``dnops.ms_deform_attn``) instead of grid_sample per level; both layouts
  ultralytics has used are taken: levels and points folded into one axis (8.4 and later, rank <= 5 for CoreML) and
  the rank-6 one before;
- every decoder layer's ``self_attn`` becomes a ``DNMultiheadAttention``: block-sparse under the denoising mask,
  nn.MultiheadAttention's own path otherwise (in evaluation, with no mask);
- ``get_cdn_group``, which ``RTDETRDecoder.forward`` imports from ``ultralytics.models.utils.ops`` on every call,
  becomes this module's version (``dnops.dn_queries`` and ``dnops.dn_attn_mask``) for the routed decoders: the
  package's function is replaced by a dispatcher that runs the original for every other caller.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dnops.compat._levels import level_tensors
from dnops.compat._rebind import calls_global, is_rebound, rebound_class, routed_class
from dnops.compat.rtdetr import is_decoder_layer
from dnops.nn.dn_mha import DNMultiheadAttention
from dnops.ops.dn_attn_mask import dn_attn_mask
from dnops.ops.dn_queries import generate
from dnops.ops.ms_deform_attn import ms_deform_attn

_FUNCTION = "multi_scale_deformable_attn_pytorch"
_OPS_MODULE = "ultralytics.models.utils.ops"


def multi_scale_deformable_attn_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: Sequence[Sequence[int]] | torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """ultralytics' ``multi_scale_deformable_attn_pytorch`` (``ultralytics/nn/modules/utils.py``) on
    dnops.ms_deform_attn.

    Args:
        value: (bs, S, M, D).
        value_spatial_shapes: [(H_0, W_0), ..., (H_{L-1}, W_{L-1})], a list (or an (L, 2) tensor, read on the host
            as the original reads it for its split sizes: a device sync when it lives on a GPU).
        sampling_locations: (bs, Lq, M, L * P, 2), levels and points folded level-major (ultralytics 8.4 and later),
            or (bs, Lq, M, L, P, 2) (earlier versions).
        attention_weights: (bs, Lq, M, L * P) or (bs, Lq, M, L, P), as the locations.

    Returns:
        (bs, Lq, M * D). The folded layout is the op's own on a view (one point count for every level); exported, the
        graph stays at rank <= 5 as ultralytics' does.
    """
    if isinstance(value_spatial_shapes, torch.Tensor):
        value_spatial_shapes = value_spatial_shapes.tolist()  # a host read, as the original's split sizes are
    shapes, starts = level_tensors(value_spatial_shapes, value.device)
    if sampling_locations.dim() == 6:
        return ms_deform_attn(value, shapes, starts, sampling_locations, attention_weights)
    levels = len(value_spatial_shapes)
    points = [int(sampling_locations.shape[3]) // levels] * levels  # a model constant, also while tracing
    return ms_deform_attn(value, shapes, starts, sampling_locations, attention_weights, points_per_level=points)


def _on_dnops(original: object) -> object:
    return multi_scale_deformable_attn_pytorch


# The routed decoders' label embeddings, by id: the dispatcher that replaces ultralytics' get_cdn_group runs dnops'
# version for a call whose class_embed is one of them (a routed decoder registers its own on every forward, so a deep
# copy or an unpickled model is routed too).
_ROUTED_EMBEDS: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def get_cdn_group(
    batch: dict[str, Any] | None,
    num_classes: int,
    num_queries: int,
    class_embed: torch.Tensor,
    num_dn: int = 100,
    cls_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
    training: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict[str, Any] | None]:
    """ultralytics' ``get_cdn_group`` (``ultralytics/models/utils/ops.py``, 8.4) on dnops.dn_queries.

    Args:
        batch: {"cls": (K,) int64, "bboxes": (K, 4) cxcywh in [0, 1], "batch_idx": (K,), "gt_groups": [n_b, ...]}
            with the GT ordered by image, or None.
        class_embed: (num_classes, hidden), the label embedding's weight.
        num_dn: the DN queries' budget: max_nums = min(max(gt_groups), num_dn) slots per half group, num_dn //
            max_nums groups of [positives | negatives].

    Returns:
        (padding_cls (bs, T, hidden), padding_bbox (bs, T, 4) in logit space, attn_mask (T + num_queries,) * 2 bool,
        dn_meta {"dn_pos_idx": per image a CPU (groups * n_b,) tensor of positive slots, group-major, "dn_gt_idx": per
        image a CPU (n_b,) tensor of the GT (indices into the batch) its slots reconstruct, "dn_num_group",
        "dn_num_split": [T, num_queries]}) with T = 2 * max_nums * groups; four Nones when not training, num_dn <= 0,
        batch is None or no image has GT.

    As the original: an image with more than max_nums GT denoises a random subset of max_nums of them, redrawn per
    call (``torch.randperm`` per such image, in image order, here on the CPU: no device sync); labels flip with
    probability cls_noise_ratio / 2 to a class in [0, num_classes); corners move by sign * r * half-size *
    box_noise_scale, r in [0, 1) for positives and [1, 2) for negatives, clipped to [0, 1]; boxes go to logit space
    with ``torch.logit(eps=1e-6)`` (a size whose corners crossed as the smallest size); padding slots hold a zero
    embedding and a zero box. With box_noise_scale <= 0 the original leaves the boxes in box space (no logit), and so
    does this function. The noise comes from dnops.dn_queries' counter-based Philox (the same law as torch.rand's
    draws, other numbers). Unlike the original, the outputs are in class_embed's dtype (the original's are in the
    default dtype, so a float64 model fails there) and nothing is read back from the device.
    """
    if not training or num_dn <= 0 or batch is None:
        return None, None, None, None
    counts = [int(n) for n in batch["gt_groups"]]
    max_nums = min(max(counts), num_dn)
    if max_nums == 0:
        return None, None, None, None
    groups = num_dn // max_nums
    device, dtype = class_embed.device, class_embed.dtype
    labels, boxes = batch["cls"], batch["bboxes"]
    gt_idx = torch.arange(sum(counts), dtype=torch.int64)
    if max(counts) > max_nums:
        offsets = itertools.accumulate([0, *counts[:-1]])
        gt_idx = torch.cat(
            [torch.randperm(n)[:max_nums].sort().values + o for n, o in zip(counts, offsets, strict=True)]
        )
        index = gt_idx.to(labels.device)
        labels, boxes = labels[index], boxes[index]
        counts = [min(n, max_nums) for n in counts]
    flip = float(cls_noise_ratio) * 0.5 if cls_noise_ratio > 0 else 0.0
    scale = float(box_noise_scale) if box_noise_scale > 0 else 0.0
    boxes = boxes.to(device=device, dtype=dtype)
    out_labels, out_boxes, slot_gt, _ = generate(
        labels.to(device).long(), boxes, counts, groups, max_nums, True, num_classes, flip, scale, None
    )
    valid = (slot_gt >= 0)[..., None]
    if scale > 0:
        out_boxes = torch.logit(out_boxes, eps=1e-6)
    else:
        out_boxes = boxes[slot_gt.clamp(min=0)]  # the GT exactly, left in box space as the original leaves it
    padding_bbox = torch.where(valid, out_boxes, torch.zeros_like(out_boxes))
    embedded = nn.functional.embedding(out_labels.clamp(max=num_classes - 1), class_embed)
    padding_cls = torch.where(valid, embedded, torch.zeros_like(embedded))
    pad_size = 2 * max_nums * groups
    attn_mask = dn_attn_mask(pad_size, 2 * max_nums, num_queries, device=device)
    slots = torch.arange(groups)[:, None] * (2 * max_nums) + torch.arange(max_nums)  # each group's positive slots
    pos_idx = [slots[:, :n].flatten() for n in counts]
    dn_meta = {
        "dn_pos_idx": pos_idx,
        "dn_gt_idx": list(gt_idx.split(counts)),
        "dn_num_group": groups,
        "dn_num_split": [pad_size, num_queries],
    }
    return padding_cls, padding_bbox, attn_mask, dn_meta


class _CdnDispatcher:
    """What ``ultralytics.models.utils.ops.get_cdn_group`` becomes once a model is routed: dnops' version for the
    routed decoders' calls, the package's own (``__wrapped__``) for every other."""

    def __init__(self, original: Any) -> None:
        self.__wrapped__ = original
        self.__name__ = "get_cdn_group"
        self.__doc__ = original.__doc__

    def __call__(self, batch: Any, num_classes: int, num_queries: int, class_embed: torch.Tensor, *args, **kw):
        if _ROUTED_EMBEDS.get(id(class_embed)) is class_embed:
            return get_cdn_group(batch, num_classes, num_queries, class_embed, *args, **kw)
        return self.__wrapped__(batch, num_classes, num_queries, class_embed, *args, **kw)


def _install_dispatcher() -> None:
    import importlib

    ops = importlib.import_module(_OPS_MODULE)
    if not isinstance(ops.get_cdn_group, _CdnDispatcher):
        ops.get_cdn_group = _CdnDispatcher(ops.get_cdn_group)


def _routed_decoder_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    embed = self.denoising_class_embed.weight
    if not torch.compiler.is_compiling():
        _ROUTED_EMBEDS[id(embed)] = embed
    return type(self).__mro__[1].forward(self, *args, **kwargs)


def _decoder_forward(cls: type) -> Any:
    """The routed decoder's forward; making its class (on routing, or on loading a pickled routed model in another
    process) installs the dispatcher its calls go through."""
    _install_dispatcher()
    return _routed_decoder_forward


def _is_ultralytics(module: nn.Module) -> bool:
    return type(module).__module__.startswith("ultralytics.")


def recognise(module: nn.Module) -> str | None:
    """The kind of routing ``module`` (an ultralytics module) takes: "ms_deform_attn", "self_attention",
    "denoising", or None."""
    if not _is_ultralytics(module):
        return None
    if calls_global(type(module), _FUNCTION) and not is_rebound(module):
        return "ms_deform_attn"
    if is_decoder_layer(module):
        return "self_attention"
    embed = getattr(module, "denoising_class_embed", None)
    if isinstance(embed, nn.Embedding) and not is_rebound(module):
        return "denoising"
    return None


def route(module: nn.Module, kind: str) -> None:
    if kind == "ms_deform_attn":
        module.__class__ = rebound_class(type(module), _FUNCTION, _on_dnops)
    elif kind == "self_attention":
        module.self_attn.__class__ = DNMultiheadAttention
    elif kind == "denoising":
        module.__class__ = routed_class(type(module), _decoder_forward)


def _route_trainer(trainer: Any) -> None:
    """The trainer's network and its EMA copy (the one validation and checkpoints use), once the trainer built them:
    ``model.train()`` of an ``ultralytics.RTDETR`` wrapper builds a network of its own (in the process that trains;
    a multi-GPU run's worker processes build theirs from the command line and are not routed)."""
    use_dnops(trainer.model)
    ema = getattr(getattr(trainer, "ema", None), "ema", None)
    if isinstance(ema, nn.Module):
        use_dnops(ema)


def use_dnops(model: nn.Module, self_attention: bool = True, denoising: bool = True) -> int:
    """Routes a model built by ultralytics (``RTDETRDetectionModel`` or the ``ultralytics.RTDETR`` wrapper) to dnops,
    in place (see the module docstring): deformable attention always, the decoder layers' self-attention with
    ``self_attention``, the denoising group with ``denoising``. Given the ``ultralytics.RTDETR`` wrapper, the network
    its ``.train()`` builds is routed as well (a callback at the trainer's ``on_pretrain_routine_end``). Returns how
    many modules were routed (0: none, or already routed).

    The routed self-attention returns (output, None): ultralytics' decoder layer leaves ``need_weights`` at its
    default, which for nn.MultiheadAttention is True (its attention weights, which the layer drops) and for
    DNMultiheadAttention False.
    """
    skip = {"self_attention"} if not self_attention else set()
    skip |= {"denoising"} if not denoising else set()
    callbacks = getattr(model, "callbacks", None)
    if isinstance(callbacks, dict) and "on_pretrain_routine_end" in callbacks:
        # the ultralytics.RTDETR wrapper: its .train() builds a new network in the trainer, routed there too
        if _route_trainer not in callbacks["on_pretrain_routine_end"]:
            model.add_callback("on_pretrain_routine_end", _route_trainer)
    routed = 0
    for module in list(model.modules()):
        kind = recognise(module)
        if kind is not None and kind not in skip:
            route(module, kind)
            routed += 1
    return routed
