"""mmcv's multi-scale deformable attention and mmdetection's DINO denoising on dnops, inside the installed packages
(requirements-detectors.txt: mmcv-lite 2.1.0, mmcv's Python code without its compiled ``_ext``, and mmdet 3.3.0)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dnops.compat import mmcv as dnops_mmcv
from dnops.compat import provide
from dnops.compat.mmdet import CdnQueryGenerator
from tests.msda_utils import make_inputs

# Installed by `make test` (requirements-detectors.txt); test-compat's torch 2.11 environment, like the lent GPU's, has
# neither package.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mmcv") is None or importlib.util.find_spec("mmdet") is None,
    reason="requirements-detectors.txt is not installed (mmcv-lite, mmdet)",
)
ROOT = Path(__file__).resolve().parent.parent
NC = 7


@pytest.fixture(scope="module")
def mmcv_ops():
    """mmcv.ops.multi_scale_deform_attn, importable once dnops provides ``mmcv._ext``."""
    provide("mmcv._ext")
    from mmcv.ops import multi_scale_deform_attn

    return multi_scale_deform_attn


@pytest.fixture(scope="module")
def mmdet_layers(mmcv_ops):
    from mmdet.models.layers.transformer import dino_layers

    return dino_layers


def test_mmcv_without_ext_imports_after_provide():
    """The failure mmcv's users report, and the one call that answers it: mmcv.ops and mmdetection's DINO import,
    mmcv's Function runs on dnops, and an op dnops does not serve says so when called."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    plain = subprocess.run([sys.executable, "-c", "import mmcv.ops"], capture_output=True, text=True, env=env)
    assert plain.returncode != 0 and "No module named 'mmcv._ext'" in plain.stderr
    code = (
        "import dnops, torch\n"
        "dnops.compat.provide('mmcv._ext')\n"
        "import mmcv.ops\n"
        "from mmdet.models.detectors import DINO\n"
        "print(mmcv.ops.multi_scale_deform_attn.ext_module.ms_deform_attn_forward.__module__)\n"
        "try:\n"
        "    mmcv.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)\n"
        "except NotImplementedError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()[:2]
    assert first == "dnops.compat.mmcv"
    assert second.startswith("mmcv._ext.nms: dnops provides mmcv._ext's multi-scale deformable attention")


@pytest.mark.parametrize("im2col_step", [1, 64])
@pytest.mark.parametrize("levels", [torch.int64, torch.int32], ids=str)
def test_mmcv_function_equals_its_pytorch_path(mmcv_ops, im2col_step, levels):
    """mmcv's own Function (in-place gradient buffers) on dnops against mmcv's own pure-PyTorch function: float64,
    forward and gradients, to 1e-12."""
    value, shapes, starts, loc, weights = make_inputs(n=3, d=8, requires_grad=True)
    out = mmcv_ops.MultiScaleDeformableAttnFunction.apply(
        value, shapes.to(levels), starts.to(levels), loc, weights, im2col_step
    )
    want = mmcv_ops.multi_scale_deformable_attn_pytorch(value, shapes, loc, weights)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    inputs = (value, loc, weights)
    for got, ref in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(want, inputs, grad), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_mmcv_function_float32_with_its_dtype_casts(mmcv_ops):
    """mmcv casts locations and weights to value's dtype before the op (float64 ones here, float32 value)."""
    value, shapes, starts, loc, weights = make_inputs(n=2, d=8)
    value = value.float().requires_grad_()
    loc, weights = loc.requires_grad_(), weights.requires_grad_()
    out = mmcv_ops.MultiScaleDeformableAttnFunction.apply(value, shapes, starts, loc, weights, 64)
    assert out.dtype == torch.float32
    want = mmcv_ops.multi_scale_deformable_attn_pytorch(value.double(), shapes, loc.float().double(), weights)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert loc.grad.dtype == torch.float64 and value.grad.dtype == torch.float32


def test_provide_after_import_repoints_mmcvs_module(mmcv_ops):
    """An mmcv whose compiled _ext lacks the op for the device: provide() after mmcv.ops was imported points its
    multi_scale_deform_attn at dnops (the ops of a compiled _ext, where one loads, stay its own)."""
    previous = mmcv_ops.ext_module
    try:
        provided = provide("mmcv._ext")
        assert mmcv_ops.ext_module is provided and sys.modules["mmcv._ext"] is provided
        assert provided.ms_deform_attn_backward is dnops_mmcv.ms_deform_attn_backward
    finally:
        mmcv_ops.ext_module = previous


def test_ext_backward_adds_into_the_callers_buffers():
    value, shapes, starts, loc, weights = make_inputs(n=2, d=4)
    grad_out = torch.randn(2, loc.shape[1], value.shape[2] * value.shape[3], dtype=torch.float64)
    buffers = [torch.ones_like(t) for t in (value, loc, weights)]
    assert dnops_mmcv.ms_deform_attn_backward(value, shapes, starts, loc, weights, grad_out, *buffers, 64) is None
    inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    out = dnops_mmcv.multi_scale_deformable_attn_pytorch(inputs[0], shapes, inputs[1], inputs[2])
    for buffer, want in zip(buffers, torch.autograd.grad(out, inputs, grad_out), strict=True):
        torch.testing.assert_close(buffer, want + 1, rtol=1e-12, atol=1e-12)


def _module_inputs(batch_first, ref_dim, dtype=torch.float64):
    shapes = torch.tensor([[6, 5], [3, 4]])
    starts = torch.tensor([0, 30])
    nq, nv, bs, dims = 7, 42, 2, 32
    q_shape, v_shape = ((bs, nq, dims), (bs, nv, dims)) if batch_first else ((nq, bs, dims), (nv, bs, dims))
    query = torch.randn(q_shape, dtype=dtype)
    value = torch.randn(v_shape, dtype=dtype)
    ref = torch.rand(bs, nq, 2, ref_dim, dtype=dtype) * 0.8 + 0.1
    if ref_dim == 4:
        ref[..., 2:] *= 0.3
    mask = torch.zeros(bs, nv, dtype=torch.bool)
    mask[1, -7:] = True
    return {
        "query": query,
        "value": value,
        "query_pos": torch.randn(q_shape, dtype=dtype),
        "key_padding_mask": mask,
        "reference_points": ref,
        "spatial_shapes": shapes,
        "level_start_index": starts,
    }


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("value_proj_ratio", [1.0, 0.5])
def test_mmcv_module_drop_in(mmcv_ops, batch_first, ref_dim, value_proj_ratio):
    """dnops.compat.mmcv.MultiScaleDeformableAttention against mmcv's: the same parameters drawn from the same seed,
    state_dict keys, and float64 output and every parameter gradient (mmcv's runs its PyTorch path on the CPU)."""
    kwargs = dict(embed_dims=32, num_heads=4, num_levels=2, num_points=3, batch_first=batch_first, dropout=0.0)
    kwargs["value_proj_ratio"] = value_proj_ratio
    torch.manual_seed(3)
    theirs = mmcv_ops.MultiScaleDeformableAttention(**kwargs).double()
    torch.manual_seed(3)
    ours = dnops_mmcv.MultiScaleDeformableAttention(**kwargs).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], tensor), key
    with torch.no_grad():  # off mmcv's initial values, where every point sits on the same grid
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours.load_state_dict(theirs.state_dict())
    inputs = _module_inputs(batch_first, ref_dim)
    want, got = theirs(**inputs), ours(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    theirs_grads = torch.autograd.grad(want, list(theirs.parameters()), grad)
    ours_grads = torch.autograd.grad(got, list(ours.parameters()), grad)
    for g0, g1 in zip(theirs_grads, ours_grads, strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)
    identity = torch.randn_like(inputs["query"])
    torch.testing.assert_close(
        ours(**inputs, identity=identity), theirs(**inputs, identity=identity), rtol=1e-12, atol=1e-12
    )


def test_mmcv_module_bad_reference_points():
    layer = dnops_mmcv.MultiScaleDeformableAttention(embed_dims=32, num_heads=4, num_levels=2, num_points=2)
    inputs = _module_inputs(False, 2, torch.float32)
    inputs["reference_points"] = torch.rand(2, 7, 2, 3)
    with pytest.raises(ValueError, match="Last dim of reference_points must be 2 or 4, but get 3"):
        layer(**inputs)
    with pytest.raises(ValueError, match="embed_dims must be divisible by num_heads, but got 30 and 4"):
        dnops_mmcv.MultiScaleDeformableAttention(embed_dims=30, num_heads=4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mmcv_module_on_cuda_runs_its_function_on_dnops(mmcv_ops):
    torch.manual_seed(3)
    theirs = mmcv_ops.MultiScaleDeformableAttention(embed_dims=32, num_heads=4, num_levels=2, num_points=3)
    ours = dnops_mmcv.MultiScaleDeformableAttention(embed_dims=32, num_heads=4, num_levels=2, num_points=3)
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.cuda().eval(), ours.cuda().eval()
    inputs = {k: v.float().cuda() if v.is_floating_point() else v.cuda() for k, v in _module_inputs(False, 2).items()}
    torch.testing.assert_close(theirs(**inputs), ours(**inputs), rtol=1e-5, atol=1e-5)


# ---- mmdetection's CdnQueryGenerator ---------------------------------------------------------------------------


def _samples(counts, dtype=torch.float32, seed=0):
    """mmdet's data samples as CdnQueryGenerator reads them: img_shape (h, w), gt_instances.bboxes (pixels x1y1x2y2)
    and .labels."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, n in enumerate(counts):
        h, w = 480 + 32 * i, 640 - 16 * i
        xy = torch.rand(n, 2, generator=g, dtype=dtype) * torch.tensor([w * 0.7, h * 0.7], dtype=dtype)
        wh = (torch.rand(n, 2, generator=g, dtype=dtype) * 0.25 + 0.02) * torch.tensor([w, h], dtype=dtype)
        instances = SimpleNamespace(bboxes=torch.cat([xy, xy + wh], 1), labels=torch.randint(0, NC, (n,), generator=g))
        samples.append(SimpleNamespace(img_shape=(h, w), gt_instances=instances))
    return samples


def _pair(mmdet_layers, group_cfg, label_noise=0.5, box_noise=1.0):
    theirs = mmdet_layers.CdnQueryGenerator(NC, 16, 30, label_noise, box_noise, group_cfg)
    ours = CdnQueryGenerator(NC, 16, 30, label_noise, box_noise, group_cfg)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


GROUP_CFGS = [
    {"dynamic": True, "num_dn_queries": 100},
    {"dynamic": True, "num_dn_queries": 7},
    {"dynamic": False, "num_groups": 3},
]


@pytest.mark.parametrize("group_cfg", GROUP_CFGS, ids=["dynamic100", "dynamic7", "static3"])
@pytest.mark.parametrize("counts", [[3, 5], [0, 4, 1], [0, 0], [12]], ids=str)
def test_cdn_query_generator_equals_mmdets_noise_off(mmdet_layers, group_cfg, counts):
    """Noise off (mmdetection asserts positive scales: 1e-30 moves nothing and flips nothing): every output and
    dn_meta entry equal to the package's in float64 (the boxes to float32 rounding), batches without GT and with an
    image without GT. dnops' queries take the embedding's dtype (the package's, the default dtype)."""
    theirs, ours = _pair(mmdet_layers, group_cfg, 1e-30, 1e-30)
    theirs.double(), ours.double()
    samples = _samples(counts, torch.float64)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the package's query buffers take the default dtype, not the embedding's
    try:
        want = theirs(samples)
    finally:
        torch.set_default_dtype(default)
    got = ours(samples)
    assert got[3] == want[3]
    assert got[2].dtype == torch.bool and torch.equal(got[2], want[2])
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)  # dnops' box arithmetic is float32 (SPEC)


def test_cdn_query_generator_same_settings_and_state(mmdet_layers):
    theirs, _ = _pair(mmdet_layers, GROUP_CFGS[0])
    ours = CdnQueryGenerator.from_module(theirs)
    assert ours.label_embedding is theirs.label_embedding and list(ours.state_dict()) == list(theirs.state_dict())
    for name in ("num_classes", "embed_dims", "num_matching_queries", "dynamic_dn_groups", "num_dn_queries"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for count in (0, 1, 7, 150):
        assert ours.get_num_groups(count) == theirs.get_num_groups(count)
    with pytest.raises(ValueError, match="label_noise_scale must be > 0, got 0"):
        CdnQueryGenerator(NC, 16, 30, label_noise_scale=0, group_cfg=GROUP_CFGS[0])(_samples([2]))
    with pytest.raises(ValueError, match="group_cfg\\['num_groups'\\] must be set"):
        CdnQueryGenerator(NC, 16, 30, group_cfg={"dynamic": False})
    with pytest.warns(UserWarning, match="'num_dn_queries' should be set"):
        CdnQueryGenerator(NC, 16, 30)


def test_cdn_query_generator_noise_has_mmdets_law(mmdet_layers):
    """Label flips and corner moves, positives and negatives apart, over 50 groups of 400 GT: the same frequencies
    and displacement laws as the package's (its torch.rand draws, dnops' Philox draws)."""
    k = 400
    samples = _samples([k], seed=4)
    xyxy = samples[0].gt_instances.bboxes / torch.tensor([640.0, 480.0, 640.0, 480.0])
    half = torch.cat([xyxy[:, 2:] - xyxy[:, :2]] * 2, 1) / 2
    labels0 = samples[0].gt_instances.labels
    stats = []
    for generator in _pair(mmdet_layers, {"num_dn_queries": 50 * k}):
        generator.label_embedding.weight.data = torch.eye(NC, 16)  # a slot's embedding is its label's one-hot
        torch.manual_seed(1)
        label, bbox, _, meta = generator(samples)
        groups = meta["num_denoising_groups"]
        flipped = (label[0, :, :NC].argmax(-1).view(groups, 2, k) != labels0).double().mean().item()
        box = bbox[0].sigmoid().view(groups, 2, k, 4)
        got = torch.cat([box[..., :2] - box[..., 2:] / 2, box[..., :2] + box[..., 2:] / 2], -1)
        move = ((got - xyxy) / half).abs()
        inside = ((got > 1e-4) & (got < 1 - 1e-4)).all(-1) & (box[..., 2:] > 2e-3).all(-1)  # not clipped
        stats.append((groups, flipped, move[:, 0].mean().item(), move[:, 1][inside[:, 1]].mean().item()))
        assert move[:, 0].max() < 1 + 1e-4 and move[:, 1][inside[:, 1]].min() > 1 - 1e-4
    (g0, f0, pos0, neg0), (g1, f1, pos1, neg1) = stats
    assert g0 == g1 == 50
    assert abs(f1 - f0) < 0.01 and abs(f1 - 0.25 * (1 - 1 / NC)) < 0.01
    assert abs(pos1 - pos0) < 0.01 and abs(pos1 - 0.5) < 0.01
    assert abs(neg1 - neg0) < 0.02
