"""No device sync in a steady-state call: every op (each GPU backend), module and adapter, forward and backward, on
fake CUDA tensors (tests/host_syncs.py), stopping at the first op that would make the host wait for a GPU; the GPU
test runs the same calls on a real GPU under ``torch.cuda.set_sync_debug_mode("error")``.

Where the original's interface hands over host values as tensors (a ``spatial_shapes`` tensor that ultralytics and
RT-DETR split by), the case passes them as the original's callers do; the reference backend reads level sizes on the
host to split value (it is the oracle, not a GPU path)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

import dnops
from dnops import _backend
from tests.host_syncs import FakeGPU, HostSync, RealGPU, fake_gpu, steady_state
from tests.msda_utils import make_inputs

Case = Callable[[FakeGPU], Callable[[], object]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def _msda(**kw) -> list[torch.Tensor]:
    return list(make_inputs(n=2, d=8, dtype=torch.float32, requires_grad=True, **kw))


def _targets(batch: int = 3, per_image: tuple[int, ...] = (3, 0, 5), classes: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"labels": torch.randint(0, classes, (k,), generator=g), "boxes": 0.1 + 0.5 * torch.rand(k, 4, generator=g)}
        for k in per_image[:batch]
    ]


@case
def ms_deform_attn(gpu):
    args = gpu.to(_msda())
    return lambda: dnops.ms_deform_attn(*args)


@case
def ms_deform_attn_int32_levels(gpu):
    value, shapes, starts, loc, weights = _msda()
    args = gpu.to([value, shapes.int(), starts.int(), loc, weights])
    return lambda: dnops.ms_deform_attn(*args)


@case
def ms_deform_attn_logits_discrete(gpu):
    args = gpu.to(_msda())
    return lambda: dnops.ms_deform_attn(*args, True, sampling="discrete")


@case
def ms_deform_attn_points_per_level(gpu):
    value, shapes, starts, _, _ = _msda()
    loc = torch.rand(2, 3, 2, 5, 2, requires_grad=True)
    weights = torch.rand(2, 3, 2, 5, requires_grad=True)
    args = gpu.to([value, shapes, starts, loc, weights])
    return lambda: dnops.ms_deform_attn(*args, points_per_level=[3, 2])


@case
def dn_self_attention(gpu):
    q, k, v = gpu.to([torch.randn(2, 2, 17, 8, requires_grad=True) for _ in range(3)])
    return lambda: dnops.dn_self_attention(q, k, v, 12, 4)


@case
def dn_queries(gpu):
    targets = _targets()
    labels, boxes = gpu.to([torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets])])
    counts = [len(t["labels"]) for t in targets]
    return lambda: dnops.dn_queries(labels, boxes, counts, num_classes=7, mode="cdn", dn_number=10)


@case
def dn_attn_mask(gpu):
    return lambda: dnops.dn_attn_mask(20, 4, 30, "cuda")


@case
def nn_msdeformattn(gpu):
    module = gpu.to(dnops.nn.MSDeformAttn(32, 2, 4, 2))
    value, shapes, starts, _, _ = make_inputs(n=2, d=8, dtype=torch.float32)
    query, ref, flat = gpu.to([torch.randn(2, 5, 32), torch.rand(2, 5, 2, 2), torch.randn(2, value.shape[1], 32)])
    shapes, starts = gpu.to([shapes, starts])
    return lambda: module(query, ref, flat, shapes, starts)


@case
def nn_dn_multihead_attention(gpu):
    module = gpu.to(dnops.nn.DNMultiheadAttention(32, 4))
    x = gpu.to(torch.randn(22, 2, 32, requires_grad=True))
    return lambda: module(x, x, x, dn=(12, 4))[0]


@case
def nn_dn_multihead_attention_made_mask(gpu):
    module = gpu.to(dnops.nn.DNMultiheadAttention(32, 4))
    x = gpu.to(torch.randn(22, 2, 32, requires_grad=True))
    return lambda: module(x, x, x, attn_mask=dnops.dn_attn_mask(12, 4, 10, "cuda"))[0]


@case
def deformable_detr_core_pytorch(gpu):
    from dnops.compat import deformable_detr

    value, shapes, _, loc, weights = _msda()
    value, shapes, loc, weights = gpu.to([value, shapes, loc, weights])
    return lambda: deformable_detr.ms_deform_attn_core_pytorch(value, shapes, loc, weights)


@case
def compiled_extension_functions(gpu):
    from dnops.compat import multi_scale_deformable_attention as ext

    args = gpu.to([t.detach() for t in _msda()])

    def call():
        out = ext.ms_deform_attn_forward(*args, 64)
        return ext.ms_deform_attn_backward(*args, torch.ones_like(out), 64)

    return call


@case
def mmcv_module(gpu):
    from dnops.compat import mmcv

    module = gpu.to(mmcv.MultiScaleDeformableAttention(32, 4, 2, 2, batch_first=True))
    value, shapes, starts, _, _ = make_inputs(n=2, d=8, dtype=torch.float32)
    query, ref, flat = gpu.to([torch.randn(2, 5, 32), torch.rand(2, 5, 2, 2), torch.randn(2, value.shape[1], 32)])
    shapes, starts = gpu.to([shapes, starts])
    return lambda: module(query, value=flat, reference_points=ref, spatial_shapes=shapes, level_start_index=starts)


@case
def mmdet_cdn_query_generator(gpu):
    from dnops.compat import mmdet

    module = gpu.to(mmdet.CdnQueryGenerator(7, 32, 30, 0.5, 1.0, {"dynamic": True, "num_dn_queries": 10}))
    samples = []
    for t in _targets():
        pixels = t["boxes"] * 64
        gt = SimpleNamespace(bboxes=gpu.to(torch.cat([pixels[:, :2], pixels[:, :2] + pixels[:, 2:]], 1)))
        gt.labels = gpu.to(t["labels"])
        samples.append(SimpleNamespace(gt_instances=gt, img_shape=(64, 80)))
    return lambda: module(samples)[:2]


@case
def detrex_generate_dn_queries(gpu):
    from dnops.compat import detrex

    module = gpu.to(detrex.GenerateDNQueries(30, 8, 32, 3, 0.2, 0.4, True))
    targets = gpu.to(_targets())
    return lambda: module([t["labels"] for t in targets], [t["boxes"] for t in targets])[:2]


@case
def detrex_prepare_for_cdn(gpu):
    from dnops.compat import detrex

    label_enc = gpu.to(torch.nn.Embedding(7, 32))
    targets = gpu.to(_targets())
    return lambda: detrex.prepare_for_cdn(None, targets, 10, 0.5, 1.0, 30, 7, 32, label_enc)[:2]


@case
def maskdino_prepare_for_dn(gpu):
    from dnops.compat import maskdino

    decoder = SimpleNamespace(
        training=True, dn_num=10, noise_scale=0.4, num_classes=7, hidden_dim=32, num_queries=30
    )  # fmt: skip
    decoder.label_enc = gpu.to(torch.nn.Embedding(7, 32))
    targets = gpu.to(_targets())
    return lambda: maskdino.prepare_for_dn(decoder, targets, None, None, 3)[:2]


@case
def dn_detr_prepare_for_dn(gpu):
    from dnops.compat import dn_detr

    enc = gpu.to(torch.nn.Embedding(8, 31))
    anchors = gpu.to(torch.rand(30, 4))
    targets = gpu.to(_targets())
    return lambda: dn_detr.prepare_for_dn((targets, 3, 0.2, 0.4, 1), anchors, 3, True, 30, 7, 32, enc)[:2]


@case
def dino_prepare_for_cdn(gpu):
    from dnops.compat import dino

    enc = gpu.to(torch.nn.Embedding(8, 32))
    targets = gpu.to(_targets())
    return lambda: dino.prepare_for_cdn((targets, 10, 0.5, 1.0), True, 30, 7, 32, enc)[:2]


@case
def rtdetr_denoising_group(gpu):
    from dnops.compat import rtdetr

    embed = gpu.to(torch.nn.Embedding(8, 32, padding_idx=7))
    targets = gpu.to(_targets())
    return lambda: rtdetr.get_contrastive_denoising_training_group(targets, 7, 30, embed, 10, 0.5, 1.0)[:2]


@case
def dfine_denoising_group(gpu):
    from dnops.compat import dfine

    embed = gpu.to(torch.nn.Embedding(8, 32, padding_idx=7))
    targets = gpu.to(_targets())
    return lambda: dfine.get_contrastive_denoising_training_group(targets, 7, 30, embed, 10, 0.5, 1.0)[:2]


@case
def rtdetr_v2_deformable_core(gpu):
    from dnops.compat import rtdetr

    value, _, _, _, _ = _msda()
    loc, weights = torch.rand(2, 3, 2, 5, 2, requires_grad=True), torch.rand(2, 3, 2, 5, requires_grad=True)
    value, loc, weights = gpu.to([value, loc, weights])
    return lambda: rtdetr.deformable_attention_core_func_v2(value, [[4, 5], [2, 3]], loc, weights, [3, 2])


@case
def dfine_channel_major_levels(gpu):
    from dnops.compat import rtdetr

    levels = gpu.to([torch.randn(2, 2, 8, 20, requires_grad=True), torch.randn(2, 2, 8, 6, requires_grad=True)])
    loc, weights = gpu.to([torch.rand(2, 3, 2, 4, 2, requires_grad=True), torch.rand(2, 3, 2, 4, requires_grad=True)])
    return lambda: rtdetr.deformable_attention_core_func_v2(levels, [[4, 5], [2, 3]], loc, weights, [2, 2])


@case
def transformers_module(gpu):
    from dnops.compat import transformers

    module = transformers.MultiScaleDeformableAttention()
    value, shapes, starts, loc, weights = gpu.to(_msda())
    return lambda: module(value, shapes, [(4, 5), (2, 3)], starts, loc, weights, 64)


@case
def ultralytics_deformable_core(gpu):
    from dnops.compat import ultralytics

    value, _, _, loc, weights = gpu.to(_msda())
    return lambda: ultralytics.multi_scale_deformable_attn_pytorch(value, [(4, 5), (2, 3)], loc, weights)


@case
def ultralytics_cdn_group(gpu):
    from dnops.compat import ultralytics

    targets = _targets()
    batch = {
        "cls": torch.cat([t["labels"] for t in targets]),
        "bboxes": torch.cat([t["boxes"] for t in targets]),
        "batch_idx": torch.cat([torch.full((len(t["labels"]),), i) for i, t in enumerate(targets)]),
    }
    batch = gpu.to(batch)
    batch["gt_groups"] = [len(t["labels"]) for t in targets]
    embed = gpu.to(torch.randn(7, 32, requires_grad=True))
    return lambda: ultralytics.get_cdn_group(batch, 7, 30, embed, 10, 0.5, 1.0, True)[:2]


@case
def rfdetr_deformable_core(gpu):
    from dnops.compat import rfdetr

    value, shapes, _, loc, weights = _msda()
    channel_major = value.detach().permute(0, 2, 3, 1).requires_grad_()
    value, shapes, loc, weights = gpu.to([channel_major, shapes, loc, weights.detach().flatten(3).requires_grad_()])
    return lambda: rfdetr.ms_deform_attn_core_pytorch(value, shapes, loc, weights, [(4, 5), (2, 3)])


# C++ that fills a host buffer (copied from pinned memory): fake tensors have no memory to fill; the GPU test runs it
HOST_BUFFERS = {"dn_detr_prepare_for_dn": "its fused C++ step writes its index maps into a host buffer"}
GPU_BACKENDS = [b for b in ("cuda", "triton") if b != "triton" or _backend.triton_available()]
OPS = {"ms_deform_attn", "dn_self_attention", "dn_queries"}


def _runs(name: str) -> list:
    """The backends a case runs under: each GPU backend dnops has here (forced: an op without that kind of kernel
    runs its default), or the default choice where it has none."""
    return [b for b in GPU_BACKENDS if any(_backend.available(op, "cuda")[b] for op in OPS)] or [None]


PARAMS = [pytest.param(name, backend, id=f"{name}-{backend or 'default'}") for name in CASES for backend in _runs(name)]


@pytest.mark.parametrize(("name", "backend"), PARAMS)
def test_no_host_sync_in_a_steady_state_call(name, backend, backend_env):
    if name in HOST_BUFFERS:
        pytest.skip(HOST_BUFFERS[name])
    if backend is not None:
        backend_env(backend)
    with fake_gpu() as gpu:
        steady_state(gpu, CASES[name](gpu))


def test_a_planted_sync_is_found(monkeypatch):
    module = importlib.import_module("dnops.ops.ms_deform_attn")  # dnops.ops.ms_deform_attn is the function
    check = module.check_ms_deform_attn_args
    monkeypatch.setattr(
        module, "check_ms_deform_attn_args", lambda value, *a, **k: value.sum().item() or check(value, *a, **k)
    )
    with fake_gpu() as gpu, pytest.raises(HostSync, match=r"_local_scalar_dense.* at dnops/ops/ms_deform_attn.py"):
        steady_state(gpu, CASES["ms_deform_attn"](gpu))


@pytest.mark.parametrize(
    "plant",
    [
        lambda x: x.nonzero(),
        lambda x: x[x > 0],
        lambda x: x.cpu(),
        lambda x: torch.tensor([1.0]).to(x.device),
        lambda x: x.repeat_interleave(x.long().abs()),
        lambda x: x.tolist(),
        lambda x: bool(x.sum() > 0),
    ],
    ids=["nonzero", "mask", "cpu", "h2d", "repeat_interleave", "tolist", "bool"],
)
def test_every_kind_of_sync_is_found(plant):
    with fake_gpu() as gpu:
        x = gpu.to(torch.randn(4))
        with pytest.raises(HostSync):
            gpu.check(lambda: plant(x))


def test_the_reference_reads_level_sizes_on_the_host(backend_env):
    backend_env("reference")
    with fake_gpu() as gpu, pytest.raises(HostSync, match="value read on the host"):
        steady_state(gpu, CASES["ms_deform_attn"](gpu))


@pytest.mark.cuda
@pytest.mark.parametrize(("name", "backend"), PARAMS)
def test_no_host_sync_on_the_gpu(name, backend, backend_env):
    """The same calls on the GPU, under torch's sync debug mode (a warm-up call first: tables made once)."""
    if backend is not None:
        backend_env(backend)
    gpu = RealGPU()
    steady_state(gpu, CASES[name](gpu))
