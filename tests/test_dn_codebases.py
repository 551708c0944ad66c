"""detrex's and MaskDINO's denoising on dnops (dnops.compat.detrex, dnops.compat.maskdino) against transcriptions of
the originals (originals/; detrex e244e6c, MaskDINO 3831d85): noise off, every output equal; noise on, the same
laws; batches without GT and images without GT as each original behaves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import originals
from dnops.compat import detrex, maskdino
from tests.dn_utils import make_gt, to_xyxy

NC, HIDDEN, QUERIES = 9, 16, 12
COUNTS = [[3, 5], [0, 4, 1], [2], [0, 0]]


def targets_for(counts, seed=0, dtype=torch.float32):
    labels, boxes, counts = make_gt(counts, num_classes=NC, seed=seed, dtype=dtype, centered=True)
    return [{"labels": t, "boxes": b} for t, b in zip(labels.split(counts), boxes.split(counts), strict=True)]


def assert_same(got, want, box_index=()):
    """Outputs equal: tensors (the noised boxes' to float32 rounding: dnops' box arithmetic is float32), dicts and
    lists entry by entry, ints and Nones exactly."""
    if isinstance(want, dict):
        assert set(got) == set(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, () if i not in box_index else (i,))
    elif isinstance(want, torch.Tensor):
        assert got.shape == want.shape and got.device == want.device
        if want.dtype == torch.bool or not want.is_floating_point():
            assert got.dtype == want.dtype and torch.equal(got, want)
        else:
            tol = 1e-5 if box_index else 1e-12
            torch.testing.assert_close(got.to(want.dtype), want, rtol=tol, atol=tol)
    else:
        assert got == want


def _stats_dn(boxes_logit, clean, lam):
    """DN-DETR's box law: |d cx| / (w / 2 * lam) and |d w| / (w * lam), each U[0, 1) in the mean."""
    noised = boxes_logit.sigmoid()
    center = ((noised[:, :2] - clean[:, :2]) / (clean[:, 2:] / 2 * lam)).abs()
    size = ((noised[:, 2:] - clean[:, 2:]) / (clean[:, 2:] * lam)).abs()
    return center.mean().item(), size.mean().item(), max(center.max().item(), size.max().item())


# ---- detrex GenerateDNQueries -----------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", COUNTS, ids=str)
@pytest.mark.parametrize("with_indicator", [False, True])
def test_generate_dn_queries_equals_detrex_noise_off(counts, with_indicator):
    theirs = originals.DetrexGenerateDNQueries(QUERIES, NC + 1, HIDDEN, 4, 0.0, 0.0, with_indicator)
    ours = detrex.GenerateDNQueries(QUERIES, NC + 1, HIDDEN, 4, 0.0, 0.0, with_indicator)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    targets = targets_for(counts)
    args = ([t["labels"] for t in targets], [t["boxes"] for t in targets])
    want = theirs(*[[t.clone() for t in a] for a in args])  # the original noises its inputs in place
    assert_same(ours(*args), want, box_index=(1,))


def test_generate_dn_queries_noise_has_detrex_law():
    """DN-DETR's law over 40 groups of 300 GT: labels redrawn with label_noise_prob, centres and sizes moved by
    U(-1, 1) * lam * (half) size; the same statistics as detrex's (its torch.rand draws, dnops' Philox draws)."""
    k, groups, lam = 300, 40, 0.4
    targets = targets_for([k], seed=3)
    stats = []
    for cls in (originals.DetrexGenerateDNQueries, detrex.GenerateDNQueries):
        gen = cls(QUERIES, NC, NC, groups, 0.3, lam)
        gen.label_encoder.weight.data = torch.eye(NC)
        torch.manual_seed(1)
        label, box, mask, g, m = gen([targets[0]["labels"].clone()], [targets[0]["boxes"].clone()])
        assert (g, m, tuple(mask.shape)) == (groups, k, (groups * k + QUERIES,) * 2)
        flipped = (label[0].argmax(-1).view(groups, k) != targets[0]["labels"]).double().mean().item()
        stats.append((flipped, *_stats_dn(box[0], targets[0]["boxes"].repeat(groups, 1), lam)))
    (f0, c0, s0, max0), (f1, c1, s1, max1) = stats
    assert abs(f1 - f0) < 0.015 and abs(f1 - 0.3 * (1 - 1 / NC)) < 0.015
    assert abs(c1 - c0) < 0.01 and abs(c1 - 0.5) < 0.01 and abs(s1 - s0) < 0.01 and abs(s1 - 0.5) < 0.01
    assert max0 < 1 + 1e-4 and max1 < 1 + 1e-4


# ---- detrex DINO prepare_for_cdn / dn_post_process ----------------------------------------------------------------


@pytest.mark.parametrize("counts", COUNTS, ids=str)
@pytest.mark.parametrize("dn_number", [100, 10, 0])
def test_prepare_for_cdn_equals_detrex_noise_off(counts, dn_number):
    label_enc = torch.nn.Embedding(NC, HIDDEN)
    targets = targets_for(counts)
    args = (targets, dn_number, 0.0, 0.0, QUERIES, NC, HIDDEN, label_enc)
    want = originals.detrex_prepare_for_cdn(None, *args)
    got = detrex.prepare_for_cdn(None, *args)
    assert_same(got, want, box_index=(1,))
    if max(counts) == 0 or dn_number == 0:
        assert got == (None, None, None, None)


def test_prepare_for_cdn_noise_has_detrex_law_and_post_process():
    """Over 50 groups of 200 GT: flips with label_noise_ratio / 2, positives' corners within the half-size times the
    scale, negatives' between 1 and 2 of it, as detrex's; dn_post_process splits as detrex's."""
    k = 200
    targets = targets_for([k], seed=5)
    label_enc = torch.nn.Embedding(NC, NC)
    label_enc.weight.data = torch.eye(NC)
    clean = targets[0]["boxes"]
    stats = []
    for fn in (originals.detrex_prepare_for_cdn, detrex.prepare_for_cdn):
        torch.manual_seed(2)
        label, box, _, meta = fn(None, targets, 50 * k, 0.5, 0.4, QUERIES, NC, NC, label_enc)
        assert meta == {"single_padding": 2 * k, "dn_num": 50}
        flipped = (label[0].argmax(-1).view(50, 2, k) != targets[0]["labels"]).double().mean().item()
        half = torch.cat([clean[:, 2:]] * 2, 1) / 2
        move = ((to_xyxy(box[0].sigmoid()).view(50, 2, k, 4) - to_xyxy(clean)) / (half * 0.4)).abs().amax(-1)
        stats.append((flipped, move[:, 0].mean().item(), move[:, 0].max().item(), move[:, 1].min().item()))
    (f0, pos0, posmax0, negmin0), (f1, pos1, posmax1, negmin1) = stats
    assert abs(f1 - f0) < 0.01 and abs(f1 - 0.25 * (1 - 1 / NC)) < 0.01
    assert abs(pos1 - pos0) < 0.01 and posmax0 < 1 + 1e-4 and posmax1 < 1 + 1e-4
    assert negmin0 > 1 - 1e-4 and negmin1 > 1 - 1e-4
    model = SimpleNamespace(aux_loss=True, _set_aux_loss=originals.detrex_set_aux_loss)
    outputs = (torch.randn(3, 1, 2 * k * 50 + QUERIES, NC), torch.rand(3, 1, 2 * k * 50 + QUERIES, 4))
    metas = [dict(meta), dict(meta)]
    got = detrex.dn_post_process(model, *outputs, metas[0])
    want = originals.detrex_dn_post_process(model, *outputs, metas[1])
    assert_same(got, want)
    assert_same(metas[0], metas[1])
    assert detrex.dn_post_process(model, *outputs, None)[0] is outputs[0]


# ---- MaskDINO prepare_for_dn / dn_post_process ------------------------------------------------------------------


def _decoder(noise_scale, dn_num=100, training=True):
    torch.manual_seed(0)
    return SimpleNamespace(
        training=training,
        dn_num=dn_num,
        noise_scale=noise_scale,
        num_classes=NC,
        label_enc=torch.nn.Embedding(NC, HIDDEN),
        hidden_dim=HIDDEN,
        num_queries=QUERIES,
        _set_aux_loss=originals.maskdino_set_aux_loss,
    )


@pytest.mark.parametrize("counts", COUNTS, ids=str)
@pytest.mark.parametrize("dn_num", [100, 9, 4])
@pytest.mark.parametrize("matching", [False, True], ids=["dn-only", "with-tgt"])
def test_maskdino_prepare_for_dn_equals_original_noise_off(counts, dn_num, matching):
    """Every output and mask_dict entry (devices included: map_known_indice on the CPU); Nones without GT or when an
    image has more GT than dn_num."""
    decoder = _decoder(0.0, dn_num)
    targets = targets_for(counts)
    tgt = torch.randn(QUERIES, HIDDEN) if matching else None
    refpoint = torch.randn(QUERIES, 4) if matching else None
    want = originals.maskdino_prepare_for_dn(decoder, targets, tgt, refpoint, len(counts))
    got = maskdino.prepare_for_dn(decoder, targets, tgt, refpoint, len(counts))
    assert_same(got, want, box_index=(1,))
    if max(counts) == 0 or dn_num // max(counts) == 0:
        assert got == (None, None, None, None)


def test_maskdino_outside_training():
    decoder = _decoder(0.4, training=False)
    tgt, refpoint = torch.randn(QUERIES, HIDDEN), torch.randn(QUERIES, 4)
    for args in ((tgt, refpoint), (None, None)):
        want = originals.maskdino_prepare_for_dn(decoder, targets_for([2]), *args, 3)
        assert_same(maskdino.prepare_for_dn(decoder, targets_for([2]), *args, 3), want)


def test_maskdino_noise_has_the_original_law_and_post_process():
    k, lam = 300, 0.4
    decoder = _decoder(lam, dn_num=40 * k)
    decoder.label_enc.weight.data = torch.eye(NC, HIDDEN)  # a slot's embedding is its label's one-hot
    targets = targets_for([k], seed=6)
    stats = []
    for fn in (originals.maskdino_prepare_for_dn, maskdino.prepare_for_dn):
        torch.manual_seed(3)
        label, box, _, mask_dict = fn(decoder, targets, None, None, 1)
        assert (mask_dict["scalar"], mask_dict["pad_size"]) == (40, 40 * k)
        flipped = (label[0, :, :NC].argmax(-1).view(40, k) != targets[0]["labels"]).double().mean().item()
        stats.append((flipped, *_stats_dn(box[0], targets[0]["boxes"].repeat(40, 1), lam)))
    (f0, c0, s0, max0), (f1, c1, s1, max1) = stats
    assert abs(f1 - f0) < 0.015 and abs(f1 - 0.2 * (1 - 1 / NC)) < 0.015
    assert abs(c1 - c0) < 0.01 and abs(s1 - s0) < 0.01 and max0 < 1 + 1e-4 and max1 < 1 + 1e-4
    width = 40 * k + QUERIES
    outputs = (torch.randn(4, 1, width, NC), torch.rand(4, 1, width, 4), torch.randn(4, 1, width, 8, 8))
    dicts = [dict(mask_dict), dict(mask_dict)]
    assert_same(
        maskdino.dn_post_process(decoder, *outputs[:2], dicts[0], outputs[2]),
        originals.maskdino_dn_post_process(decoder, *outputs[:2], dicts[1], outputs[2]),
    )
    assert_same(dicts[0], dicts[1])
    with pytest.raises(ValueError, match="pad_size'\\] must be > 0, got 0"):
        maskdino.dn_post_process(decoder, *outputs[:2], {"pad_size": 0}, outputs[2])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generators_on_cuda_equal_the_originals_noise_off():
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets_for([3, 0, 5])]
    decoder = _decoder(0.0)
    decoder.label_enc = decoder.label_enc.cuda()
    assert_same(
        maskdino.prepare_for_dn(decoder, targets, None, None, 3),
        originals.maskdino_prepare_for_dn(decoder, targets, None, None, 3),
        box_index=(1,),
    )
    label_enc = torch.nn.Embedding(NC, HIDDEN).cuda()
    args = (targets, 100, 0.0, 0.0, QUERIES, NC, HIDDEN, label_enc)
    assert_same(detrex.prepare_for_cdn(None, *args), originals.detrex_prepare_for_cdn(None, *args), box_index=(1,))
