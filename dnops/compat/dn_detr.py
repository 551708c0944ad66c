"""DN-DETR's ``prepare_for_dn`` / ``dn_post_process`` (the dn_components.py of each model in DN-DETR) on dnops.

``prepare_for_dn`` takes both signatures the repository has: eight arguments (models/DN_DAB_DETR and
models/dn_dab_deformable_detr_deformable_encoder_only: sequence-first queries, the matching part from label_enc)
and nine (models/dn_dab_deformable_detr, DN-Deformable-DETR, and models/dn_dab_dino_deformable_detr: a learned
``tgt_weight`` for the matching part, batch-first queries; the latter's dn_args end with a contrastive flag).
Same return structures (the query tensors, the dense bool mask, mask_dict keys), but device-agnostic and fused:
the noise comes from dnops.dn_queries (counter-based, so the random numbers differ from the original's
torch.rand draws; the distributions are the same), and with the C++ extension the whole eight-argument training
branch is one call of its op (csrc/dn_queries/dn_detr_prepare.cpp). ``dn_post_process`` is the same in every model.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dnops import _backend
from dnops.compat._dn_targets import queries_from_targets
from dnops.dn import dn_box_queries, dn_positive_index, flatten_targets, inverse_sigmoid
from dnops.ops.dn_attn_mask import dn_attn_mask
from dnops.ops.dn_queries import generate


def prepare_for_dn(*args, **kwargs):
    """DN-DETR's prepare_for_dn, in either signature:

    ``(dn_args, embedweight, batch_size, training, num_queries, num_classes, hidden_dim, label_enc)``: returns
    (input_query_label (W, B, hidden_dim), input_query_bbox (W, B, 4), attn_mask (W, W) or None, mask_dict or None);

    ``(dn_args, tgt_weight, embedweight, batch_size, training, num_queries, num_classes, hidden_dim, label_enc)``
    (DN-Deformable-DETR): tgt_weight (num_queries * num_patterns, hidden_dim - 1) is the matching queries' learned
    content and embedweight (num_queries * num_patterns, 4) their anchors; returns the same, batch-first:
    (B, W, hidden_dim), (B, W, 4).

    dn_args: (targets, scalar, label_noise_scale, box_noise_scale, num_patterns) in training, num_patterns
    otherwise; W = pad_size + num_queries * num_patterns. With nine arguments dn_args may end with a
    ``contrastive`` flag (models/dn_dab_dino_deformable_detr, see _prepare_dino_variant), and tgt_weight /
    embedweight may be None there (two-stage: the queries are the DN part, W = pad_size).
    """
    if len(args) + len(kwargs) == 9 or "tgt_weight" in kwargs:
        return _prepare_deformable(*args, **kwargs)
    return _prepare(*args, **kwargs)


def _prepare_deformable(
    dn_args, tgt_weight, embedweight, batch_size, training, num_queries, num_classes, hidden_dim, label_enc
):
    """models/dn_dab_deformable_detr's prepare_for_dn: the DN part as the eight-argument one makes it, the
    matching part [tgt_weight | 0] (label_enc joins the graph with weight 0 even without DN queries, as in the
    original) and embedweight as they are, batch-first."""
    if training and len(dn_args) == 6:
        return _prepare_dino_variant(
            dn_args, tgt_weight, embedweight, batch_size, num_queries, num_classes, hidden_dim, label_enc
        )
    if training and len(dn_args) != 5:
        raise TypeError(
            "prepare_for_dn: dn_args must be (targets, scalar, label_noise_scale, box_noise_scale, num_patterns"
            f"[, contrastive]), got {len(dn_args)} entries"
        )
    num_patterns = max(int(dn_args[4] if training else dn_args), 1)
    if tgt_weight is None or embedweight is None:  # models/dn_dab_dino_deformable_detr's two-stage inference
        return None, None, None, None
    matching = num_queries * num_patterns
    _check_matching(tgt_weight, embedweight, matching, hidden_dim)
    tgt = _learned_content(tgt_weight, label_enc)
    if not training:
        return tgt.repeat(batch_size, 1, 1), embedweight.repeat(batch_size, 1, 1), None, None
    targets, scalar, label_noise_scale, box_noise_scale, _ = dn_args
    dn_part = (targets, scalar, label_noise_scale, box_noise_scale, 1)
    label, bbox, attn_mask, mask_dict = _prepare(
        dn_part, embedweight, batch_size, True, matching, num_classes, hidden_dim, label_enc
    )
    pad = mask_dict["pad_size"]
    label = torch.cat([label[:pad].transpose(0, 1), tgt.expand(batch_size, -1, -1)], 1)
    return label, bbox.transpose(0, 1).contiguous(), attn_mask, mask_dict


def _prepare_dino_variant(
    dn_args, tgt_weight, embedweight, batch_size, num_queries, num_classes, hidden_dim, label_enc
):
    """models/dn_dab_dino_deformable_detr's training branch: dn_args ends with a ``contrastive`` flag, each image's
    GT come in [positives | copies labelled num_classes] (copies only when contrastive), the box noise moves the
    corners (xyxy), the label noise flips with the full ratio, a scalar of 100 or more counts DN queries rather
    than groups, and without tgt_weight / embedweight (two-stage) the queries are the DN part alone. Batch-first.

    Reproduces the original's layout, bug included: its negatives (far box noise, label num_classes) are the
    second half of each group's entries over the whole batch, not each image's copies. With GT counts [3, 2] the
    entries of a group are [3 GT, 3 copies | 2 GT, 2 copies] and the negatives its last five: image 0's last copy
    and all of image 1's entries; image 0's first two copies get near noise and keep their label num_classes
    unless the label noise flips it. The repository's prepare_for_loss takes the box targets from the first half
    by the same indexing, so its box loss sees near-noised queries only. dnops.dn_queries' own CDN layout (each
    image's negatives) is unaffected."""
    targets, scalar, label_noise_scale, box_noise_scale, num_patterns, contrastive = dn_args
    matching = num_queries * max(int(num_patterns), 1)
    _check_targets(targets, batch_size, label_enc, num_classes)
    if tgt_weight is not None and embedweight is not None:
        _check_matching(tgt_weight, embedweight, matching, hidden_dim)
    labels, boxes, counts = flatten_targets(targets)
    entries = [2 * c if contrastive else c for c in counts]  # the original's known_num
    single_pad = max(entries)
    groups = int(scalar)
    groups = 1 if single_pad == 0 else groups // single_pad if groups >= 100 else groups
    groups = max(groups, 1)
    flip, scale = max(float(label_noise_scale), 0.0), max(float(box_noise_scale), 0.0)
    if contrastive:  # the original's entries: each image's GT, then a copy of them
        labels = torch.cat([torch.cat([t["labels"], t["labels"]]) for t in targets]).long()
        boxes = torch.cat([torch.cat([t["boxes"], t["boxes"]]) for t in targets])
    # every entry of every group one independent draw in dnops' CDN layout: its positive slot holds it with near
    # noise, its negative slot with far noise
    out_labels, out_boxes, _, _ = generate(
        labels, boxes, entries, groups, single_pad, True, num_classes, flip, scale, None
    )
    device = labels.device
    # per slot of the original's layout (group i, entry j of image b): the dnops slot it takes (-1: padding), whether
    # it is a negative (batch-wide second half) and whether it is an image's copy; made on the host from the counts
    maps = torch.zeros((3, batch_size, groups, single_pad), dtype=torch.long)
    maps[0] = -1
    half, first = sum(counts), 0  # half: the original's len(boxes) // 2
    for b, (c, n) in enumerate(zip(counts, entries, strict=True)):
        j = torch.arange(n)
        far = (first + j >= half).long()
        maps[0, b, :, :n] = j + far * single_pad + 2 * single_pad * torch.arange(groups)[:, None]
        maps[1, b, :, :n] = far
        maps[2, b, :, c:n] = 1
        first += n
    slots, far, copy = maps.view(3, batch_size, -1).to(device).unbind(0)
    valid = slots >= 0
    index = slots.clamp(min=0)
    dn_labels = out_labels.gather(1, index)
    if contrastive:
        # a copy's label is num_classes before the label noise, which then flips it like any entry: drawn here as
        # the original draws it (dnops' slot flipped the GT label, which the copy does not carry)
        copy_labels = torch.full_like(dn_labels, num_classes)
        if flip > 0:
            drawn = torch.randint(0, num_classes, dn_labels.shape, device=device)
            copy_labels = torch.where(torch.rand(dn_labels.shape, device=device) < flip, drawn, copy_labels)
        dn_labels = torch.where(far > 0, num_classes, torch.where(copy > 0, copy_labels, dn_labels))
    dn_boxes = out_boxes.gather(1, index[..., None].expand(-1, -1, 4)).to(label_enc.weight.dtype)
    label_embed = F.embedding(dn_labels, label_enc.weight)
    label_embed = torch.cat([label_embed, label_embed.new_ones(*label_embed.shape[:2], 1)], -1) * valid[..., None]
    bbox_embed = inverse_sigmoid(dn_boxes) * valid[..., None]
    pad_size = groups * single_pad
    if tgt_weight is not None and embedweight is not None:
        tgt = _learned_content(tgt_weight, label_enc)
        label_embed = torch.cat([label_embed, tgt.expand(batch_size, -1, -1)], 1)
        bbox_embed = torch.cat([bbox_embed, embedweight.expand(batch_size, -1, -1)], 1)
    attn_mask = dn_attn_mask(pad_size, single_pad, matching, device=device)
    # mask_dict over the GT as the original extends them (each image's GT, then its copies labelled num_classes)
    gt_labels, gt_boxes = labels, boxes
    if contrastive:
        gt_labels = torch.cat([torch.cat([t["labels"], torch.full_like(t["labels"], num_classes)]) for t in targets])
    known = sum(entries)
    within = torch.cat([torch.arange(n, device=device) for n in entries])
    mask_dict = {
        "known_indice": torch.arange(known, device=device).repeat(groups),
        "batch_idx": torch.cat([torch.full((n,), b, device=device) for b, n in enumerate(entries)]),
        "map_known_indice": torch.cat([within + single_pad * i for i in range(groups)]),
        "known_lbs_bboxes": (gt_labels.repeat(groups), gt_boxes.repeat(groups, 1)),
        "know_idx": list(within.unsqueeze(1).split(entries)),
        "pad_size": pad_size,
        "scalar": groups,
        "contrastive": contrastive,
    }
    return label_embed, bbox_embed, attn_mask, mask_dict


def _check_targets(targets, batch_size, label_enc, num_classes) -> None:
    """The training branch's inputs, checked before anything is indexed (also under torch.compile)."""
    if not isinstance(targets, list | tuple) or not targets:
        raise ValueError("prepare_for_dn: need one labels and one boxes tensor per image, got no targets")
    if batch_size != len(targets):
        raise ValueError(f"prepare_for_dn: batch_size is {batch_size} but there are {len(targets)} targets")
    if label_enc.weight.shape[0] <= num_classes:
        raise ValueError(
            f"prepare_for_dn: label_enc needs num_classes + 1 = {num_classes + 1} rows, has {label_enc.weight.shape[0]}"
        )


def _check_matching(tgt_weight, embedweight, matching, hidden_dim) -> None:
    for name, t, width in (("tgt_weight", tgt_weight, hidden_dim - 1), ("embedweight", embedweight, 4)):
        if t.dim() != 2 or tuple(t.shape) != (matching, width):
            raise ValueError(
                f"prepare_for_dn: {name} must be (num_queries * num_patterns, {width}) = ({matching}, {width}), got "
                f"{tuple(t.shape)}"
            )


def _learned_content(tgt_weight: torch.Tensor, label_enc: torch.nn.Embedding) -> torch.Tensor:
    """The nine-argument variants' matching queries: [tgt_weight | 0 indicator], plus label_enc's first weight
    times 0 so that label_enc is in the graph even without DN queries (as the originals do)."""
    return torch.cat([tgt_weight, tgt_weight.new_zeros(tgt_weight.shape[0], 1)], 1) + label_enc.weight[0, 0] * 0


def _prepare(dn_args, embedweight, batch_size, training, num_queries, num_classes, hidden_dim, label_enc):
    """models/DN_DAB_DETR's prepare_for_dn (see prepare_for_dn)."""
    if training:
        targets, scalar, label_noise_scale, box_noise_scale, num_patterns = dn_args
    else:
        num_patterns = dn_args
    num_patterns = max(int(num_patterns), 1)
    device = embedweight.device
    matching = num_queries * num_patterns
    if not training:
        tgt = label_enc.weight[num_classes].to(embedweight.dtype)
        tgt = torch.cat([tgt, tgt.new_zeros(1)]).expand(batch_size, matching, -1)
        anchors = _anchors(embedweight, num_patterns, batch_size)
        # fresh tensors, as the original's repeat gives: expanded views would alias the embedding weights
        tgt, anchors = (t.clone(memory_format=torch.contiguous_format) for t in (tgt, anchors))
        return tgt.transpose(0, 1), anchors.transpose(0, 1), None, None

    groups = int(scalar)
    # the C++ path checks the same, with the same words; checked here first so that both paths raise alike
    _check_targets(targets, batch_size, label_enc, num_classes)
    labels, boxes = [t["labels"] for t in targets], [t["boxes"] for t in targets]
    counts = [len(x) for x in labels]
    # under torch.compile the constants are made in the graph (Dynamo warns on, and skips, an lru_cache)
    make = _constants.__wrapped__ if torch.compiler.is_compiling() else _constants
    constants = make(num_classes, label_enc.weight.shape[1], matching, batch_size, embedweight.dtype, device)
    noise = max(float(label_noise_scale), 0.0), max(float(box_noise_scale), 0.0)
    # under torch.compile the public ops: the fused op builds its index maps on the host, which fake tensors lack
    if _backend.is_compiled(_backend.choose("dn_queries", device)) and not torch.compiler.is_compiling():
        # The adapter's cost is its ~30 dispatches and the Python between them, not arithmetic: in C++ they cost
        # a fraction (same ops, same autograd graph, the same seed draw as dnops.dn_queries; docs/kernels.md).
        outputs = torch.ops.dnops._dn_detr_prepare.default(
            labels,
            boxes,
            label_enc.weight,
            embedweight,
            *constants,
            num_patterns,
            num_classes,
            groups,
            *noise,
            _backend.draw_seed(),
        )
    else:
        outputs = _prepare_on_ops(
            targets, label_enc.weight, embedweight, constants, num_patterns, num_classes, groups, noise
        )
    input_query_label, input_query_bbox, attn_mask, maps, known_labels, known_boxes = outputs
    known = sum(counts)
    known_indice, batch_idx, map_known_indice, within = maps.split([known * groups, known, known * groups, known])
    mask_dict = {
        "known_indice": known_indice,
        "batch_idx": batch_idx,
        "map_known_indice": map_known_indice,
        "known_lbs_bboxes": (known_labels, known_boxes),
        # one split of a column view rather than one slice per image: each is a dispatch on the step's critical path
        "know_idx": list(within.unsqueeze(1).split(counts)),
        "pad_size": groups * (max(counts) if counts else 0),
    }
    return input_query_label, input_query_bbox, attn_mask, mask_dict


def _prepare_on_ops(targets, weight, anchors, constants, num_patterns, num_classes, groups, noise):
    """What the fused op (csrc/dn_queries/dn_detr_prepare.cpp) returns, on the public ops (without the C++
    extension, or with another DNOPS_BACKEND): (input_query_label, input_query_bbox, attn_mask, index maps, known
    labels, boxes)."""
    gt_labels, gt_boxes, counts, dn = queries_from_targets(targets, "dn", num_classes, *noise, num_groups=groups)
    zero_row, indicator, matching_index = constants
    weight = weight.to(anchors.dtype)
    table = torch.cat(
        [torch.cat([weight[:num_classes], zero_row, weight[num_classes : num_classes + 1]]), indicator], 1
    )
    input_query_label = F.embedding(torch.cat([dn.labels.t(), matching_index]), table)
    refpoint = _anchors(anchors, num_patterns, len(counts))
    input_query_bbox = torch.cat([dn_box_queries(dn).to(anchors.dtype), refpoint], 1).transpose(0, 1)
    attn_mask = dn_attn_mask(dn.pad_size, dn.group_size, matching_index.shape[0], device=anchors.device)
    # group-major like DN-DETR's maps: the first group's entries are each GT's image and its row within the image
    batch_idx, slot_idx, gt_idx = dn_positive_index(dn, counts, anchors.device)
    known = len(gt_labels)
    maps = torch.cat([gt_idx, batch_idx[:known], slot_idx, slot_idx[:known]])
    return input_query_label, input_query_bbox, attn_mask, maps, gt_labels.repeat(groups), gt_boxes.repeat(groups, 1)


def _anchors(embedweight: torch.Tensor, num_patterns: int, batch_size: int) -> torch.Tensor:
    """(B, num_queries * num_patterns, 4): the anchors once per pattern (a view for one pattern), for every image."""
    return embedweight.expand(num_patterns, -1, -1).reshape(-1, embedweight.shape[1]).expand(batch_size, -1, -1)


@functools.lru_cache(maxsize=16)
def _constants(num_classes, width, matching, batch_size, dtype, device):
    """(zero row (1, width), indicator column (num_classes + 2, 1), matching rows' index (matching, B)): inputs of
    every step's lookup that never change, made once per layout instead of three ops per step."""
    zero_row = torch.zeros(1, width, dtype=dtype, device=device)
    indicator = torch.zeros(num_classes + 2, 1, dtype=dtype, device=device)
    indicator[:num_classes] = 1
    matching_index = torch.full((matching, batch_size), num_classes + 1, dtype=torch.int64, device=device)
    return zero_row, indicator, matching_index


def dn_post_process(outputs_class, outputs_coord, mask_dict):
    """Splits (layers, B, W, C) decoder outputs: returns the matching part and stores the DN part in
    mask_dict['output_known_lbs_bboxes'] = (class, coord), as DN-DETR does."""
    if mask_dict and mask_dict["pad_size"] > 0:
        pad = mask_dict["pad_size"]
        mask_dict["output_known_lbs_bboxes"] = (outputs_class[:, :, :pad, :], outputs_coord[:, :, :pad, :])
        outputs_class, outputs_coord = outputs_class[:, :, pad:, :], outputs_coord[:, :, pad:, :]
    return outputs_class, outputs_coord
