"""dnops.compat.dn_detr / dino adapters against re-implementations of the published algorithms, and the
model-side helpers of dnops.dn."""

import pytest
import torch

from dnops import _backend
from dnops.compat import dino, dn_detr
from dnops.dn import dn_concat, dn_loss_pairs, dn_positive_index, dn_split, inverse_sigmoid
from dnops.ops.dn_attn_mask import dn_attn_mask
from dnops.ops.dn_queries import dn_queries
from originals import (
    dino_prepare_for_cdn,
    dn_deformable_detr_prepare_for_dn,
    dn_detr_prepare_for_dn,
    dn_dino_deformable_detr_prepare_for_dn,
    dn_dino_deformable_detr_prepare_for_loss,
)
from tests.dn_utils import make_gt, to_xyxy

NUM_CLASSES, HIDDEN, QUERIES = 9, 16, 12


def targets_for(counts, seed=0):
    labels, boxes, counts = make_gt(counts, num_classes=NUM_CLASSES, seed=seed, centered=True)
    out, start = [], 0
    for c in counts:
        out.append({"labels": labels[start : start + c], "boxes": boxes[start : start + c]})
        start += c
    return out


@pytest.fixture
def modules():
    torch.manual_seed(0)
    return torch.nn.Embedding(NUM_CLASSES + 1, HIDDEN - 1), torch.nn.Embedding(NUM_CLASSES + 1, HIDDEN)


def assert_same_outputs(ours, theirs, box_tol: float | None = None) -> None:
    """prepare_for_dn's four outputs equal the original's: the queries, the mask and every mask_dict entry."""
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1], rtol=box_tol, atol=box_tol)
    assert torch.equal(ours[2], theirs[2])
    assert ours[3].keys() == theirs[3].keys()
    for key, value in theirs[3].items():
        if key == "know_idx":
            assert [t.tolist() for t in ours[3][key]] == [t.tolist() for t in value]
        elif key == "known_lbs_bboxes":
            for a, b in zip(ours[3][key], value, strict=True):
                assert torch.equal(a, b)
        else:
            assert torch.equal(ours[3][key], value) if isinstance(value, torch.Tensor) else ours[3][key] == value, key


COUNTS = [[3, 0, 5], [1], [0, 0], [4, 4]]
# prepare_for_dn's two paths: one call into the C++ extension, and the public ops (no extension, or an override)
DN_PATHS = ["cpu", "reference"] if _backend.HAS_C else ["reference"]


@pytest.mark.parametrize("path", DN_PATHS)
@pytest.mark.parametrize("counts", COUNTS)
def test_prepare_for_dn_equals_original_without_noise(counts, path, modules):
    label_enc, _ = modules
    embed = torch.randn(QUERIES, 4)
    args = ((targets_for(counts), 5, 0.0, 0.0, 1), embed, len(counts), True, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    with _backend.use_backend(path):
        ours = dn_detr.prepare_for_dn(*args)
    theirs = dn_detr_prepare_for_dn(*args)
    assert_same_outputs(ours, theirs)
    # the label embedding (DN slots and matching queries) trains label_enc as the original's does
    weights = torch.randn(ours[0].shape)
    grads = [torch.autograd.grad((out[0] * weights).sum(), label_enc.weight)[0] for out in (ours, theirs)]
    torch.testing.assert_close(grads[0], grads[1])


def test_prepare_for_dn_inference_and_noise_bounds(modules):
    label_enc, _ = modules
    embed = torch.randn(QUERIES, 4)
    ours = dn_detr.prepare_for_dn(2, embed, 3, False, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    theirs = dn_detr_prepare_for_dn(2, embed, 3, False, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])
    assert ours[2] is None and ours[3] is None
    targets = targets_for([6, 2])
    label, bbox, mask, mask_dict = dn_detr.prepare_for_dn(
        (targets, 5, 0.2, 0.4, 1), embed, 2, True, QUERIES, NUM_CLASSES, HIDDEN, label_enc
    )
    ref = dn_detr_prepare_for_dn((targets, 5, 0.2, 0.4, 1), embed, 2, True, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    assert label.shape == ref[0].shape and bbox.shape == ref[1].shape and torch.equal(mask, ref[2])
    # every DN box moved by at most 0.4 * w / 2 (centre) and 0.4 * w (size) from its GT
    gt = torch.cat([t["boxes"] for t in targets])
    boxes = bbox.transpose(0, 1)[mask_dict["batch_idx"].repeat(5), mask_dict["map_known_indice"]].sigmoid()
    gt = gt.repeat(5, 1)
    span = torch.cat([gt[:, 2:] / 2, gt[:, 2:]], 1) * 0.4
    assert ((boxes - gt).abs() <= span + 1e-4).all()


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("mode", ["dn", "cdn"])
def test_originals_generation_and_mask_match_the_fused_ops(counts, mode):
    # the "gen+mask" baseline of the dn_queries benchmarks computes what dnops.dn_queries + dn_attn_mask return
    targets = targets_for(counts)
    if mode == "dn":
        args = ((targets, 5, 0.0, 0.0, 1), torch.zeros(QUERIES, 4), len(counts), True, QUERIES, NUM_CLASSES, HIDDEN)
        labels, boxes, mask, _ = dn_detr_prepare_for_dn(*args, None)
    else:
        labels, boxes, mask, _ = dino_prepare_for_cdn(
            (targets, 100, 0.0, 0.0), True, QUERIES, NUM_CLASSES, HIDDEN, None
        )
    gt_labels = torch.cat([t["labels"] for t in targets])
    gt_boxes = torch.cat([t["boxes"] for t in targets])
    dn = dn_queries(
        gt_labels, gt_boxes, counts, num_classes=NUM_CLASSES, mode=mode, label_noise_ratio=0.0, box_noise_scale=0.0
    )
    assert torch.equal(labels, dn.labels)
    torch.testing.assert_close(boxes, dn.boxes)
    assert torch.equal(mask, dn_attn_mask(dn.pad_size, dn.group_size, QUERIES))


@pytest.mark.skipif(not _backend.HAS_C, reason="needs dnops._C")
@pytest.mark.parametrize("num_patterns", [1, 3])
def test_prepare_for_dn_paths_agree_with_noise(num_patterns, modules):
    # the same torch seed gives the same noise on both paths, so they must agree exactly, gradients included
    label_enc, _ = modules
    embed = torch.randn(QUERIES, 4, requires_grad=True)
    # box noise 3: many noised boxes leave [0, 1] and are clamped, where inverse_sigmoid's eps decides the value
    args = ((targets_for([3, 0, 7, 1]), 4, 0.5, 3.0, num_patterns), embed, 4, True, QUERIES, NUM_CLASSES, HIDDEN)
    outs = []
    for path in ("cpu", "reference"):
        torch.manual_seed(7)
        with _backend.use_backend(path):
            outs.append(dn_detr.prepare_for_dn(*args, label_enc))
    (label, bbox, mask, meta), (label_r, bbox_r, mask_r, meta_r) = outs
    assert bbox.shape == (meta["pad_size"] + QUERIES * num_patterns, 4, 4)
    assert (bbox == inverse_sigmoid(torch.zeros(1))).any()
    torch.testing.assert_close(label, label_r, rtol=0, atol=0)
    torch.testing.assert_close(bbox, bbox_r, rtol=0, atol=1e-6)
    assert torch.equal(mask, mask_r) and meta.keys() == meta_r.keys() and meta["pad_size"] == meta_r["pad_size"]
    for key in ("known_indice", "batch_idx", "map_known_indice"):
        assert torch.equal(meta[key], meta_r[key]), key
    assert all(torch.equal(a, b) for a, b in zip(meta["known_lbs_bboxes"], meta_r["known_lbs_bboxes"], strict=True))
    assert [t.tolist() for t in meta["know_idx"]] == [t.tolist() for t in meta_r["know_idx"]]
    weights = torch.randn(label.shape), torch.randn(bbox.shape)
    grads = [
        torch.autograd.grad((lab * weights[0]).sum() + (box * weights[1]).sum(), [label_enc.weight, embed])
        for lab, box in ((label, bbox), (label_r, bbox_r))
    ]
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.cuda
def test_prepare_for_dn_on_cuda_equals_cpu(modules):
    # the C++ path on a GPU (dnops' CUDA kernels, the index maps copied from the host) against the CPU run
    label_enc, _ = modules
    embed = torch.randn(QUERIES, 4)
    targets = targets_for([3, 0, 5])
    args = ((targets, 5, 0.3, 0.6, 2), embed, 3, True, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    on_gpu = (
        ([{k: v.cuda() for k, v in t.items()} for t in targets], 5, 0.3, 0.6, 2),
        embed.cuda(),
        *args[2:7],
        torch.nn.Embedding.from_pretrained(label_enc.weight.detach().cuda()),
    )
    torch.manual_seed(3)
    cpu = dn_detr.prepare_for_dn(*args)
    torch.manual_seed(3)
    gpu = dn_detr.prepare_for_dn(*on_gpu)
    torch.testing.assert_close(cpu[0], gpu[0].cpu(), rtol=0, atol=0)
    # boxes agree within 1e-6 across backends; inverse_sigmoid's slope (up to ~1/eps) can scale that near 0 and 1
    torch.testing.assert_close(cpu[1], gpu[1].cpu(), rtol=1e-5, atol=1e-3)
    assert torch.equal(cpu[2], gpu[2].cpu())
    for key in ("known_indice", "batch_idx", "map_known_indice"):
        assert torch.equal(cpu[3][key], gpu[3][key].cpu()), key


@pytest.mark.parametrize("backend", ["cpu", "reference"])  # the C++ path and the Python path raise alike
def test_prepare_for_dn_bad_inputs_raise(modules, backend_env, backend):
    if backend == "cpu" and not _backend.HAS_C:
        pytest.skip("needs dnops._C")
    backend_env(backend)
    label_enc, _ = modules
    embed = torch.randn(QUERIES, 4)
    targets = targets_for([2, 1])
    with pytest.raises(ValueError, match="batch_size is 3 but there are 2 targets"):
        dn_detr.prepare_for_dn((targets, 5, 0.2, 0.4, 1), embed, 3, True, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    with pytest.raises(ValueError, match="label_enc needs num_classes \\+ 1 = 11 rows, has 10"):
        dn_detr.prepare_for_dn((targets, 5, 0.2, 0.4, 1), embed, 2, True, QUERIES, 10, HIDDEN, label_enc)
    with pytest.raises(ValueError, match="one labels and one boxes tensor per image"):
        dn_detr.prepare_for_dn(([], 5, 0.2, 0.4, 1), embed, 0, True, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    targets[0]["labels"] = targets[0]["labels"] + NUM_CLASSES
    with pytest.raises(ValueError, match="labels must be in \\[0, num_classes=9\\)"):
        dn_detr.prepare_for_dn((targets, 5, 0.2, 0.4, 1), embed, 2, True, QUERIES, NUM_CLASSES, HIDDEN, label_enc)


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("dn_number", [100, 3])
def test_prepare_for_cdn_equals_original_without_noise(counts, dn_number, modules):
    _, label_enc = modules
    args = ((targets_for(counts), dn_number, 0.0, 0.0), True, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    ours, theirs = dino.prepare_for_cdn(*args), dino_prepare_for_cdn(*args)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])
    assert torch.equal(ours[2], theirs[2])
    assert ours[3] == theirs[3]


def test_prepare_for_cdn_noise_and_post_process(modules):
    _, label_enc = modules
    targets = targets_for([5, 2])
    label, bbox, mask, meta = dino.prepare_for_cdn(
        (targets, 100, 0.5, 1.0), True, QUERIES, NUM_CLASSES, HIDDEN, label_enc
    )
    ref = dino_prepare_for_cdn((targets, 100, 0.5, 1.0), True, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    assert label.shape == ref[0].shape and bbox.shape == ref[1].shape and torch.equal(mask, ref[2])
    assert meta == ref[3]
    assert dino.prepare_for_cdn(None, False, QUERIES, NUM_CLASSES, HIDDEN, label_enc) == (None,) * 4
    layers = torch.randn(6, 2, meta["pad_size"] + QUERIES, NUM_CLASSES)
    coords = torch.rand(6, 2, meta["pad_size"] + QUERIES, 4)
    cls, crd = dino.dn_post_process(layers, coords, meta, True, lambda a, b: [{"l": x} for x in a[:-1]])
    assert cls.shape[2] == QUERIES and torch.equal(
        meta["output_known_lbs_bboxes"]["pred_logits"], layers[-1, :, : meta["pad_size"]]
    )
    assert len(meta["output_known_lbs_bboxes"]["aux_outputs"]) == 5
    mask_dict = {"pad_size": 4}
    cls, _ = dn_detr.dn_post_process(layers[:, :, :16], coords[:, :, :16], mask_dict)
    assert cls.shape[2] == 12 and mask_dict["output_known_lbs_bboxes"][0].shape[2] == 4


def test_adapters_run_on_meta_device_free_code_paths(modules):
    # device-agnostic: nothing calls .cuda(); the adapters follow the inputs' device
    label_enc, _ = modules
    out = dn_detr.prepare_for_dn(
        (targets_for([2]), 2, 0.2, 0.4, 1), torch.randn(QUERIES, 4), 1, True, QUERIES, NUM_CLASSES, HIDDEN, label_enc
    )
    assert out[0].device.type == "cpu" and out[2].device.type == "cpu"


def test_helpers():
    labels, boxes, counts = make_gt([3, 0, 2], num_classes=NUM_CLASSES)
    dn = dn_queries(labels, boxes, counts, num_classes=NUM_CLASSES, mode="cdn", dn_number=4, seed=1)
    b, s, g = dn_positive_index(dn, counts)
    mask = (dn.gt_index >= 0) & ~dn.negative
    assert len(b) == int(mask.sum()) and mask[b, s].all() and torch.equal(dn.gt_index[b, s], g)
    logits = torch.randn(2, 3, dn.pad_size, NUM_CLASSES)
    pred_boxes = torch.rand(2, 3, dn.pad_size, 4)
    pl, pb, tl_, tb = dn_loss_pairs(dn, counts, logits, pred_boxes, labels, boxes)
    assert pl.shape == (2, len(b), NUM_CLASSES) and torch.equal(pl, logits[:, b, s]) and torch.equal(tl_, labels[g])
    assert torch.equal(tb, boxes[g]) and torch.equal(pb, pred_boxes[:, b, s])
    cat = dn_concat(torch.zeros(3, dn.pad_size, 5), torch.ones(7, 5))
    assert cat.shape == (3, dn.pad_size + 7, 5)
    a, c = dn_split(cat, dn.pad_size, dim=1)
    assert (a == 0).all() and (c == 1).all()
    assert torch.equal(inverse_sigmoid(torch.tensor([0.5])), torch.tensor([0.0]))


# ---- DN-Deformable-DETR's nine-argument prepare_for_dn (models/dn_dab_deformable_detr) ----------------------------


@pytest.mark.parametrize("path", DN_PATHS)
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("num_patterns", [1, 2])
def test_deformable_prepare_for_dn_equals_original_without_noise(counts, path, num_patterns, modules):
    label_enc, _ = modules
    matching = QUERIES * num_patterns
    tgt_weight = torch.randn(matching, HIDDEN - 1, requires_grad=True)
    anchors = torch.randn(matching, 4, requires_grad=True)
    dn_args = (targets_for(counts), 5, 0.0, 0.0, num_patterns)
    args = (dn_args, tgt_weight, anchors, len(counts), True, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    with _backend.use_backend(path):
        ours = dn_detr.prepare_for_dn(*args)
    theirs = dn_deformable_detr_prepare_for_dn(*args)
    assert ours[0].shape == theirs[0].shape == (len(counts), ours[3]["pad_size"] + matching, HIDDEN)  # batch-first
    assert_same_outputs(ours, theirs)
    weights = torch.randn(ours[0].shape)
    for inputs in ([label_enc.weight], [tgt_weight], [anchors]):
        out = [o[0] if inputs[0] is not anchors else o[1] for o in (ours, theirs)]
        w = weights if inputs[0] is not anchors else torch.randn(ours[1].shape)
        grads = [torch.autograd.grad((o * w).sum(), inputs, allow_unused=True, retain_graph=True)[0] for o in out]
        if grads[1] is None:
            assert grads[0] is None or not grads[0].any()
        else:
            torch.testing.assert_close(grads[0], grads[1])


def test_deformable_prepare_for_dn_inference_noise_and_bad_shapes(modules):
    label_enc, _ = modules
    tgt_weight, anchors = torch.randn(QUERIES, HIDDEN - 1), torch.rand(QUERIES, 4)
    args = (tgt_weight, anchors, 3, False, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    ours, theirs = dn_detr.prepare_for_dn(1, *args), dn_deformable_detr_prepare_for_dn(1, *args)
    for a, b in zip(ours, theirs, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    # with noise: the DN part's boxes stay within the noise bounds of their GT, the matching part is untouched
    targets = targets_for([3, 4])
    noisy = dn_detr.prepare_for_dn((targets, 4, 0.5, 0.4, 1), tgt_weight, anchors, 2, True, QUERIES, NUM_CLASSES,
                                   HIDDEN, label_enc)  # fmt: skip
    pad = noisy[3]["pad_size"]
    assert pad == 16 and torch.equal(noisy[0][:, pad:, :-1], tgt_weight.expand(2, -1, -1))
    assert torch.equal(noisy[1][:, pad:], anchors.expand(2, -1, -1))
    with pytest.raises(ValueError, match="tgt_weight must be"):
        dn_detr.prepare_for_dn(1, tgt_weight[:, :-1], *args[1:])
    with pytest.raises(TypeError, match="dn_args must be"):
        dn_detr.prepare_for_dn((targets, 4, 0.5, 0.4), *args[:3], True, *args[4:])


# ---- models/dn_dab_dino_deformable_detr's prepare_for_dn: a contrastive flag, optional matching part ------------


@pytest.mark.parametrize("path", DN_PATHS)
@pytest.mark.parametrize("counts", [[3, 0, 5], [1], [0, 0], [4, 2], [3, 2]])
@pytest.mark.parametrize("contrastive", [False, True])
@pytest.mark.parametrize("scalar", [3, 100])
@pytest.mark.parametrize("two_stage", [False, True])
def test_dino_variant_prepare_for_dn_equals_original_without_noise(path, counts, contrastive, scalar, two_stage):
    torch.manual_seed(0)
    label_enc = torch.nn.Embedding(NUM_CLASSES + 1, HIDDEN - 1)
    tgt_weight = None if two_stage else torch.randn(QUERIES, HIDDEN - 1)
    anchors = None if two_stage else torch.randn(QUERIES, 4)
    dn_args = (targets_for(counts), scalar, 0.0, 0.0, 1, contrastive)
    args = (dn_args, tgt_weight, anchors, len(counts), True, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
    with _backend.use_backend(path):
        ours = dn_detr.prepare_for_dn(*args)
    theirs = dn_dino_deformable_detr_prepare_for_dn(*args)
    assert_same_outputs(ours, theirs, box_tol=1e-5)  # the xyxy round trip moves the last bits
    grads = [torch.autograd.grad(o[0].square().sum(), label_enc.weight, allow_unused=True)[0] for o in (ours, theirs)]
    torch.testing.assert_close(grads[0], grads[1])


def test_dino_variant_noise_and_inference():
    torch.manual_seed(0)
    label_enc = torch.nn.Embedding(NUM_CLASSES + 1, HIDDEN - 1)
    targets = targets_for([3, 5])
    out = dn_detr.prepare_for_dn((targets, 4, 0.0, 1.0, 1, True), None, None, 2, True, QUERIES, NUM_CLASSES, HIDDEN,
                                 label_enc)  # fmt: skip
    mask_dict = out[3]
    assert mask_dict["pad_size"] == 4 * 10 and out[0].shape == (2, 40, HIDDEN)  # DN part only (two-stage)
    # label num_classes: image 0's copies (slots 3..5) and the batch-wide second half (image 1's entries 2..9)
    neg_embed = torch.cat([label_enc.weight[NUM_CLASSES], torch.ones(1)])
    assert torch.allclose(out[0][0, 3], neg_embed) and torch.allclose(out[0][1, 2], neg_embed)
    assert not torch.allclose(out[0][1, 1], neg_embed) and torch.allclose(out[1].new_zeros(4), out[1][0, 6])
    for args in ((1, None, None), (1, torch.randn(QUERIES, HIDDEN - 1), torch.rand(QUERIES, 4))):
        ours = dn_detr.prepare_for_dn(*args, 2, False, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
        theirs = dn_dino_deformable_detr_prepare_for_dn(*args, 2, False, QUERIES, NUM_CLASSES, HIDDEN, label_enc)
        for a, b in zip(ours, theirs, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def _dino_variant(counts, scalar, label_noise, box_noise, original=False, seed=0):
    torch.manual_seed(seed)
    label_enc = torch.nn.Embedding(NUM_CLASSES + 1, HIDDEN - 1)
    dn_args = (targets_for(counts), scalar, label_noise, box_noise, 1, True)
    fn = dn_dino_deformable_detr_prepare_for_dn if original else dn_detr.prepare_for_dn
    return fn(dn_args, None, None, len(counts), True, QUERIES, NUM_CLASSES, HIDDEN, label_enc), label_enc


def _corner_moves(query_boxes, gt_boxes, scale):
    """|corner shift| / (half the side * scale) per entry (N,): < 1 for near noise, in [1, 2) for far noise."""
    noised = torch.sigmoid(query_boxes)
    half = torch.cat([gt_boxes[:, 2:], gt_boxes[:, 2:]], 1) / 2
    return ((to_xyxy(noised) - to_xyxy(gt_boxes)).abs() / (half * scale)).amax(1)


def test_dino_variant_box_loss_sees_positives_only():
    """The repository's prepare_for_loss takes its box targets from the batch-wide first half of each group: with
    the adapter's queries every one of them is a near-noised query, as with the original's (GT counts [3, 2])."""
    (label, bbox, _, mask_dict), _ = _dino_variant([3, 2], 3, 0.0, 0.4)
    mask_dict["output_known_lbs_bboxes"] = (label[None, ..., :1], bbox[None])  # the decoder returns its input
    _, known_bboxs, _, coord, num_tgt = dn_dino_deformable_detr_prepare_for_loss(mask_dict)
    assert num_tgt == 15 and coord.shape == (1, 15, 4)
    assert (_corner_moves(coord[0], known_bboxs, 0.4) < 1 + 1e-4).all()
    # the far-noised queries exist: the second half of each group, which the box loss leaves out
    far = torch.cat([torch.arange(5, 10) + 10 * g for g in range(3)])
    entries = mask_dict["known_lbs_bboxes"][1]
    queries = bbox[mask_dict["batch_idx"][mask_dict["known_indice"]], mask_dict["map_known_indice"]]
    assert (_corner_moves(queries[far], entries[far], 0.4) > 1 - 1e-4).all()


def test_dino_variant_noise_law_equals_the_original():
    """Per slot of the layout: the share of labels num_classes (0.6 for image 0's copies, which the label noise
    flips with 0.4 to a class in [0, num_classes); 0 for positives; 1 for negatives) and the largest corner shift
    (near: mean 0.8, far: mean 1.8) agree with the original's over 1000 groups."""

    def stats(original):
        # a scalar >= 100 counts DN queries: 6000 // 6 (image 0's entries) = 1000 groups
        (label, bbox, _, mask_dict), label_enc = _dino_variant([3, 2], 6000, 0.4, 0.4, original=original, seed=1)
        idx = (mask_dict["batch_idx"][mask_dict["known_indice"]], mask_dict["map_known_indice"])
        num_classes_row = torch.cat([label_enc.weight[NUM_CLASSES], torch.ones(1)])
        negative = (label[idx] == num_classes_row).all(1).float().view(1000, 10)
        move = _corner_moves(bbox[idx], mask_dict["known_lbs_bboxes"][1], 0.4).view(1000, 10)
        return negative.mean(0), move.mean(0), move.min(0).values

    ours, theirs = stats(False), stats(True)
    torch.testing.assert_close(ours[0], theirs[0], atol=0.1, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=0.05, rtol=0)
    # the batch-wide halves, not each image's copies: entries 0..4 near (min shift < 0.5), 5..9 far (min shift >= 1)
    assert (ours[2][:5] < 0.5).all() and (ours[2][5:] > 1 - 1e-4).all()
    assert (theirs[2][:5] < 0.5).all() and (theirs[2][5:] > 1 - 1e-4).all()


@pytest.mark.parametrize("path", DN_PATHS)
def test_dino_variant_bad_inputs_raise(path):
    label_enc = torch.nn.Embedding(NUM_CLASSES + 1, HIDDEN - 1)
    tgt_weight, anchors = torch.randn(QUERIES, HIDDEN - 1), torch.rand(QUERIES, 4)
    targets = targets_for([2, 1])

    def call(targets, batch_size, tgt_weight=tgt_weight, anchors=anchors):
        dn_args = (targets, 3, 0.2, 0.4, 1, True)
        return dn_detr.prepare_for_dn(dn_args, tgt_weight, anchors, batch_size, True, QUERIES, NUM_CLASSES, HIDDEN,
                                      label_enc)  # fmt: skip

    with _backend.use_backend(path):
        with pytest.raises(ValueError, match="one labels and one boxes tensor per image, got no targets"):
            call([], 0)
        with pytest.raises(ValueError, match="batch_size is 3 but there are 2 targets"):
            call(targets, 3)
        with pytest.raises(ValueError, match="tgt_weight must be \\(num_queries \\* num_patterns, 15\\)"):
            call(targets, 2, tgt_weight=tgt_weight[:, 1:])
        with pytest.raises(ValueError, match="embedweight must be \\(num_queries \\* num_patterns, 4\\)"):
            call(targets, 2, anchors=anchors[1:])
        targets[1]["labels"] = targets[1]["labels"] + NUM_CLASSES
        with pytest.raises(ValueError, match="labels must be in \\[0, num_classes=9\\)"):
            call(targets, 2)


def test_prepare_for_cdn_without_targets_raises(modules):
    _, label_enc = modules
    with pytest.raises(ValueError, match="prepare_for_cdn: need one labels and one boxes tensor per image"):
        dino.prepare_for_cdn(([], 100, 0.5, 1.0), True, QUERIES, NUM_CLASSES, HIDDEN, label_enc)


def test_prepare_for_dn_inference_returns_fresh_tensors():
    from dnops.compat import dn_detr

    embed, enc = torch.nn.Embedding(15, 4), torch.nn.Embedding(11, 15)
    for batch, patterns in ((1, 1), (3, 2)):
        label, bbox, _, _ = dn_detr.prepare_for_dn(patterns, embed.weight, batch, False, 15, 10, 16, enc)
        before = embed.weight.detach().clone(), enc.weight.detach().clone()
        with torch.no_grad():
            label.add_(1.0)
            bbox.add_(1.0)
        assert torch.equal(embed.weight, before[0]) and torch.equal(enc.weight, before[1])
        assert 0 not in label.stride() and 0 not in bbox.stride()
