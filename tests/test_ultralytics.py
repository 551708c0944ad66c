"""ultralytics' RT-DETR on dnops, inside the installed package (requirements-detectors.txt): models built by
ultralytics' own code, routed with dnops.compat.ultralytics.use_dnops, against their unrouted twins."""

from __future__ import annotations

import copy
import io
import os
import tempfile

import pytest
import torch

os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="dnops-yolo-"))
pytest.importorskip("ultralytics", reason="requirements-detectors.txt is not installed")

import ultralytics.models.utils.ops as ul_ops  # noqa: E402
from ultralytics.nn.tasks import RTDETRDetectionModel  # noqa: E402

import originals  # noqa: E402
from dnops.compat import ultralytics as ul  # noqa: E402
from dnops.nn import DNMultiheadAttention  # noqa: E402
from tests.gpu_utils import deterministic  # noqa: E402
from tests.msda_utils import onnx_max_rank  # noqa: E402

NC = 80


def package_get_cdn_group():
    """ultralytics' own function, also once a routed model replaced it with the dispatcher."""
    return getattr(ul_ops.get_cdn_group, "__wrapped__", ul_ops.get_cdn_group)


@pytest.fixture
def float64_default():
    # the package makes its denoising buffers in the default dtype: a float64 model needs it float64
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def build(dtype: torch.dtype = torch.float32, seed: int = 0) -> RTDETRDetectionModel:
    torch.manual_seed(seed)
    model = RTDETRDetectionModel("rtdetr-l.yaml", nc=NC, verbose=False).to(dtype)
    model.nc = NC  # as its trainer sets it before the first loss
    # off the pixel centres the initial offsets put every point on (a kink of bilinear sampling), and scores spread
    # far enough apart that the top-k of the inference output does not hinge on rounding
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sampling_offsets" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
            if "score_head" in name and name.endswith("weight"):  # zero at initialisation: every score ties
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def twins(dtype: torch.dtype = torch.float32) -> tuple[RTDETRDetectionModel, RTDETRDetectionModel]:
    original = build(dtype)
    routed = copy.deepcopy(original)
    assert ul.use_dnops(routed) == 13  # 6 x (MSDeformAttn, self_attn) + the decoder's denoising
    return original, routed


def make_batch(images: torch.Tensor, counts: list[int], seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    k = sum(counts)
    centre = torch.rand(k, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(k, 2, generator=g) * 0.3 + 0.05
    return {
        "img": images,
        "cls": torch.randint(0, NC, (k, 1), generator=g).to(images.dtype),
        "bboxes": torch.cat([centre, size], 1).to(images.dtype),
        "batch_idx": torch.cat([torch.full((n,), float(b)) for b, n in enumerate(counts)]).to(images.dtype),
    }


def quiet(model: RTDETRDetectionModel, num_dn: int | None = None) -> None:
    head = model.model[-1]
    head.label_noise_ratio, head.box_noise_scale = 0.0, 0.0
    if num_dn is not None:
        head.num_denoising = num_dn


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_use_dnops_routes_each_part_once_and_keeps_the_state_dict():
    original, routed = twins()
    assert ul.use_dnops(routed) == 0
    assert routed.state_dict().keys() == original.state_dict().keys()
    layers = [m for m in routed.modules() if hasattr(m, "cross_attn")]
    assert len(layers) == 6 and all(type(m.self_attn) is DNMultiheadAttention for m in layers)
    assert all(ul.recognise(m) is None for m in routed.modules())
    assert type(routed.model[-1]).__mro__[1] is type(original.model[-1])
    # the encoder's AIFI attention sees no DN mask: left alone
    assert sum(type(m) is torch.nn.MultiheadAttention for m in routed.modules()) == 1


def test_eval_outputs_equal_float64(float64_default):
    original, routed = twins(torch.float64)
    images = torch.rand(2, 3, 320, 320)
    original.eval(), routed.eval()
    with torch.no_grad():
        want, got = original(images), routed(images)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("counts", [[3, 0, 2], [0, 7, 2]], ids=["no-gt-image", "more-gt-than-num-dn"])
def test_training_loss_and_every_gradient_float64(float64_default, counts):
    # noise off: the denoising group is the original's exactly, and with num_dn = 4 an image of 7 GT denoises a
    # subset of 4 drawn by torch.randperm in both (the same draws from the same seed, on the CPU)
    original, routed = twins(torch.float64)
    quiet(original, 4), quiet(routed, 4)
    images = torch.rand(3, 3, 256, 256)
    losses = []
    for model in (original, routed):
        model.train()
        torch.manual_seed(5)
        loss, items = model.loss(make_batch(images, counts))
        loss.backward()
        losses.append((loss, items))
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-12, atol=0)
    want, got = grads(original), grads(routed)
    assert want.keys() == got.keys()
    scale = max(g.abs().max() for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-9 * scale, msg=name)


def test_denoising_group_equals_the_package_noise_off():
    embed = torch.randn(NC, 16, requires_grad=True)
    images = torch.zeros(4, 3, 8, 8)
    batch = make_batch(images, [2, 0, 9, 3])
    batch = {"cls": batch["cls"].long().view(-1), "bboxes": batch["bboxes"], "batch_idx": batch["batch_idx"].long()}
    batch["gt_groups"] = [2, 0, 9, 3]
    for num_dn in (100, 5):
        torch.manual_seed(3)
        want = package_get_cdn_group()(batch, NC, 30, embed, num_dn, 0.0, 0.0, True)
        torch.manual_seed(3)
        got = ul.get_cdn_group(batch, NC, 30, embed, num_dn, 0.0, 0.0, True)
        for a, b in zip(got[:3], want[:3], strict=True):
            assert a.dtype == b.dtype and a.device == b.device
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert got[3].keys() == want[3].keys()
        for key in want[3]:
            if isinstance(want[3][key], list) and isinstance(want[3][key][0], torch.Tensor):
                assert len(got[3][key]) == len(want[3][key])
                for a, b in zip(got[3][key], want[3][key], strict=True):
                    assert a.device.type == "cpu" and torch.equal(a, b), key
            else:
                assert got[3][key] == want[3][key], key
    assert ul.get_cdn_group(batch, NC, 30, embed, 100, training=False) == (None, None, None, None)
    empty = {**batch, "gt_groups": [0, 0, 0, 0]}
    assert ul.get_cdn_group(empty, NC, 30, embed, 100, training=True) == (None, None, None, None)


def test_denoising_noise_has_the_package_law():
    """Label flips and corner moves, positives and negatives apart, over 20 groups of 600 GT: the same frequencies and
    displacement laws as the package's (its torch.rand draws, dnops' Philox draws)."""
    k, num_dn = 600, 12000
    g = torch.Generator().manual_seed(0)
    boxes = torch.cat([torch.rand(k, 2, generator=g) * 0.4 + 0.3, torch.full((k, 2), 0.2)], 1)
    batch = {"cls": torch.randint(0, NC, (k,), generator=g), "bboxes": boxes, "batch_idx": torch.zeros(k).long()}
    batch["gt_groups"] = [k]
    embed = torch.eye(NC)  # the embedding of a slot is its label's one-hot
    stats = []
    for fn in (package_get_cdn_group(), ul.get_cdn_group):
        torch.manual_seed(1)
        cls, bbox, _, meta = fn(batch, NC, 10, embed, num_dn, 0.5, 1.0, True)
        groups = meta["dn_num_group"]
        labels = cls[0].argmax(-1).view(groups, 2, k)
        flipped = (labels != batch["cls"]).double().mean().item()  # ratio / 2, less the flips to the same class
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        got = bbox[0].sigmoid().view(groups, 2, k, 4)
        got = torch.cat([got[..., :2] - got[..., 2:] / 2, got[..., :2] + got[..., 2:] / 2], -1)
        move = ((got - xyxy) / 0.1).abs()  # |sign * r| with half-size 0.1, no clipping at these boxes
        # a negative whose corners crossed comes back with the smallest size, its corners lost: left out (of both)
        kept = move[:, 1][(bbox[0].sigmoid().view(groups, 2, k, 4)[:, 1, :, 2:] > 1e-3).all(-1)]
        stats.append((groups, flipped, move[:, 0].mean().item(), kept.mean().item(), kept.min().item()))
    (g0, f0, pos0, neg0, negmin0), (g1, f1, pos1, neg1, negmin1) = stats
    assert g0 == g1 == 20
    assert abs(f1 - f0) < 0.01 and abs(f1 - 0.25 * (1 - 1 / NC)) < 0.01
    assert abs(pos1 - pos0) < 0.01 and abs(pos1 - 0.5) < 0.01  # U[0, 1)
    assert abs(neg1 - neg0) < 0.01 and 1.3 < neg1 < 1.5  # U[1, 2), its largest moves crossing more often
    assert negmin0 >= 1 - 1e-4 and negmin1 >= 1 - 1e-4


def test_rank6_layout_of_earlier_versions():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (3, 4)]
    value = torch.randn(2, 42, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    loc = (torch.rand(2, 7, 4, 2, 3, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(2, 7, 4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    want = originals.ultralytics_83_multi_scale_deformable_attn_pytorch(value, shapes, loc, weights)
    got = ul.multi_scale_deformable_attn_pytorch(value, shapes, loc, weights)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    folded = ul.multi_scale_deformable_attn_pytorch(value, shapes, loc.flatten(3, 4), weights.flatten(3, 4))
    torch.testing.assert_close(folded, want, rtol=0, atol=1e-12)
    upstream = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad(got, (value, loc, weights), upstream),
        torch.autograd.grad(want, (value, loc, weights), upstream),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training(dtype):
    original, routed = twins()
    images = torch.rand(2, 3, 256, 256)
    losses = []
    for model in (original, routed):
        quiet(model)
        model.train()
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=dtype):
            loss, _ = model.loss(make_batch(images, [3, 2]))
        (loss * 2**-12).backward()  # a loss scale, as GradScaler's after a backoff: float16 overflows at 1 in both
        assert all(torch.isfinite(g).all() for g in grads(model).values())
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) < 0.05 * abs(losses[0])


def test_deterministic_training_repeats_bit_for_bit():
    _, routed = twins()
    images = torch.rand(2, 3, 256, 256)
    runs = []
    with deterministic():
        for _ in range(2):
            routed.zero_grad(set_to_none=True)
            routed.train()
            torch.manual_seed(5)
            loss, _ = routed.loss(make_batch(images, [3, 2]))
            loss.backward()
            runs.append(grads(routed))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_pickles_deep_copies_and_stays_routed(monkeypatch):
    _, routed = twins()
    buffer = io.BytesIO()
    torch.save(routed, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    real = ul.get_cdn_group
    for model in (loaded, copy.deepcopy(routed)):
        assert ul.use_dnops(model) == 0
        calls = []
        monkeypatch.setattr(ul, "get_cdn_group", lambda *a, calls=calls, **k: calls.append(1) or real(*a, **k))
        model.train()
        model.loss(make_batch(torch.rand(2, 3, 256, 256), [2, 1]))
        assert calls == [1]


@pytest.mark.parametrize("opset", [12, 17])
def test_onnx_export_without_grid_sample(tmp_path, opset):
    import onnx
    import onnxruntime

    _, routed = twins()
    routed.eval()
    routed.model[-1].export = True  # the head's export mode: the (bs, 300, 6) predictions alone
    images = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        want = routed(images)
    path = str(tmp_path / "rtdetr.onnx")
    torch.onnx.export(routed, (images,), path, opset_version=opset, dynamo=False)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "GridSample" not in ops
    assert onnx_max_rank(path) <= 5
    session = onnxruntime.InferenceSession(path)
    (got,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    assert_same_detections(torch.from_numpy(got)[0], want[0])


def assert_same_detections(got: torch.Tensor, want: torch.Tensor) -> None:
    """(300, 6) [cx, cy, w, h, score, class] rows, ordered by score: at random weights many scores lie within
    float32 rounding of each other, and onnxruntime's rounding orders those rows (and picks the last ones) otherwise.
    The scores agree as sorted lists, and each row whose score stands apart from its neighbours is the same row."""
    torch.testing.assert_close(got[:, 4].sort().values, want[:, 4].sort().values, rtol=0, atol=1e-5)
    scores = want[:, 4]
    gap = (scores[:, None] - scores[None, :]).abs() + torch.eye(len(scores)) * 1e9
    apart = gap.min(1).values > 2e-5
    assert apart.sum() >= 10  # enough rows stand apart for the comparison to mean something
    for row in want[apart]:
        assert (got - row).abs().max(1).values.min() < 1e-4, row


def test_trains_through_the_package_trainer(tmp_path, monkeypatch):
    """``RTDETR(...).train()`` builds a network of its own in its trainer: use_dnops on the wrapper routes that one (a
    callback), and one epoch of ultralytics' own training loop on two generated images runs the denoising on dnops."""
    import numpy as np
    from PIL import Image
    from ultralytics import RTDETR

    import dnops.compat

    monkeypatch.setenv("YOLO_OFFLINE", "1")
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for i in range(2):
            pixels = (np.random.default_rng(i).random((64, 64, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "images" / split / f"{i}.jpg")
            (tmp_path / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.3 0.3\n1 0.3 0.3 0.2 0.2\n")
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames:\n  0: a\n  1: b\n")
    calls = []
    real = ul.get_cdn_group
    monkeypatch.setattr(ul, "get_cdn_group", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = RTDETR("rtdetr-l.yaml")
    assert dnops.compat.use_dnops(model).routed == 13
    model.train(
        data=str(data),
        epochs=1,
        imgsz=64,
        batch=2,
        device="cpu",
        workers=0,
        plots=False,
        val=False,
        amp=False,
        project=str(tmp_path),
        name="run",
        exist_ok=True,
        verbose=False,
    )
    assert calls, "the trainer's own network ran dnops' denoising group"
    assert all(ul.recognise(m) is None for m in model.trainer.model.modules())
