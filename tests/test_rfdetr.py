"""Roboflow's RF-DETR on dnops, inside the installed package (requirements-detectors.txt): models built by rfdetr's own
builder (random weights, nothing downloaded), routed with dnops.compat.rfdetr.use_dnops, against their unrouted
twins."""

from __future__ import annotations

import copy
import io
import logging
import warnings

import pytest
import torch

pytest.importorskip("rfdetr", reason="requirements-detectors.txt is not installed")

from rfdetr.config import RFDETRNanoConfig, TrainConfig  # noqa: E402
from rfdetr.models import build_model_from_config  # noqa: E402
from rfdetr.models.lwdetr import build_criterion_from_config  # noqa: E402

from dnops.compat import rfdetr as rf  # noqa: E402
from tests.msda_utils import onnx_max_rank  # noqa: E402

logging.getLogger("rf-detr").setLevel(logging.ERROR)


def configs(**model) -> tuple[RFDETRNanoConfig, TrainConfig]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "initialised from scratch": what a test wants
        return RFDETRNanoConfig(pretrain_weights=None, device="cpu", **model), TrainConfig(
            dataset_dir=".", output_dir="."
        )


def build(dtype: torch.dtype = torch.float32, **model) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model_from_config(*configs(**model)).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the pixel centres the initial offsets put every point on (a kink of bilinear)
        for name, p in net.named_parameters():
            if "sampling_offsets" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return net


def twins(dtype: torch.dtype = torch.float32, **model) -> tuple[torch.nn.Module, torch.nn.Module]:
    original = build(dtype, **model)
    routed = copy.deepcopy(original)
    assert rf.use_dnops(routed) == 2  # the Nano decoder's two cross-attentions
    return original, routed


def images(dtype: torch.dtype = torch.float32, batch: int = 2, size: int = 384) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=dtype)


def targets(dtype: torch.dtype) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (3, 0):
        centre, size = torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(0, 90, (n,), generator=g), "boxes": torch.cat([centre, size], 1).to(dtype)})
    return out


def test_use_dnops_routes_once_and_keeps_the_state_dict():
    original, routed = twins()
    assert rf.use_dnops(routed) == 0
    assert routed.state_dict().keys() == original.state_dict().keys()
    assert all(rf.recognise(m) is None for m in routed.modules())


def test_eval_outputs_equal_float64():
    original, routed = twins(torch.float64)
    x = images(torch.float64)
    original.eval(), routed.eval()
    with torch.no_grad():
        want, got = original(x), routed(x)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-12)


def test_training_loss_and_every_gradient_float64():
    """rfdetr's own criterion (Hungarian matching, focal and box losses over every decoder layer and the encoder
    proposals), on a batch with an image without GT."""
    original, routed = twins(torch.float64)
    criterion, _ = build_criterion_from_config(*configs())
    x = images(torch.float64)
    results = []
    for model in (original, routed):
        model.train()
        torch.manual_seed(4)
        losses = criterion(model(x, targets(torch.float64)), targets(torch.float64))
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, want), (loss1, got) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=0)
    assert want.keys() == got.keys()
    scale = max(g.abs().max() for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-9 * scale, msg=name)


def test_two_levels_and_a_reference_point_per_level():
    """Older configs sample two feature levels: the level walk and the rank-6 layout across levels."""
    original, routed = twins(torch.float64, projector_scale=["P3", "P5"])
    assert {m.n_levels for m in routed.modules() if hasattr(m, "n_levels")} == {2}
    x = images(torch.float64, batch=1, size=320)
    original.eval(), routed.eval()
    with torch.no_grad():
        want, got = original(x), routed(x)
    torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training(dtype):
    """rfdetr trains under bfloat16 autocast on Ampere and newer (float16 before): the routed decoder gathers the
    half-precision value as it is, with float32 geometry. The DINOv2 backbone is frozen and one query group trains
    instead of 13: torch's float16 matrix-product backward on the CPU takes a minute for them."""
    original, routed = twins(group_detr=1)
    x = images()
    outs = []
    for model in (original, routed):
        model.backbone.requires_grad_(False)
        model.train()
        torch.manual_seed(4)
        with torch.autocast("cpu", dtype=dtype):
            out = model(x, targets(torch.float32))
        (out["pred_boxes"].float().sum() + out["pred_logits"].float().sum() * 1e-3).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        outs.append(out["pred_boxes"].float())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-2)


def test_pickles_and_deep_copies_routed():
    _, routed = twins()
    buffer = io.BytesIO()
    torch.save(routed, buffer)
    buffer.seek(0)
    for model in (torch.load(buffer, weights_only=False), copy.deepcopy(routed)):
        assert rf.use_dnops(model) == 0 and sum(rf.recognise(m) is not None for m in model.modules()) == 0


@pytest.fixture(scope="module")
def exported_twins():
    original, routed = twins()
    for model in (original, routed):
        model.eval()
        model.export()  # rfdetr's export mode: levels and points folded (rank <= 5), Python level sizes
    x = images(batch=1)
    with torch.no_grad():
        want = original(x)
    return routed, x, want


def _close(got, want, atol: float = 1e-5) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(torch.as_tensor(a), b, rtol=0, atol=atol)


def test_jit_trace(exported_twins):
    routed, x, want = exported_twins
    with torch.no_grad():
        traced = torch.jit.trace(routed, x, check_trace=False)
        _close(traced(x), want)


def test_torch_export_keeps_rank_5(exported_twins):
    routed, x, want = exported_twins
    program = torch.export.export(routed, (x,))
    _close(program.module()(x), want)
    ranks = [n.meta["val"].dim() for n in program.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert max(ranks) <= 5
    assert not any("grid_sampler" in str(n.target) for n in program.graph.nodes)


def test_onnx_export_without_grid_sample(exported_twins, tmp_path):
    import onnx
    import onnxruntime

    routed, x, want = exported_twins
    path = str(tmp_path / "rfdetr.onnx")
    torch.onnx.export(routed, (x,), path, opset_version=17, dynamo=False)
    assert "GridSample" not in {n.op_type for n in onnx.load(path).graph.node}
    assert onnx_max_rank(path) <= 5
    session = onnxruntime.InferenceSession(path)
    _close(session.run(None, {session.get_inputs()[0].name: x.numpy()}), want)
