"""Inputs a user can get wrong must raise a clear error before any kernel reads memory; second derivatives
must raise instead of silently returning zeros."""

import pytest
import torch

import dnops
from dnops import _backend
from tests.msda_utils import make_inputs

# the Triton kernels run in the interpreter here, under the conftest's rules for the triton mark
BACKENDS = ["cpu", "reference", pytest.param("triton", marks=pytest.mark.triton)]


def with_shapes(rows, s=None):
    value, _, _, loc, weights = make_inputs(n=1, shapes=((2, 3), (1, 2)), lq=2, m=1, d=2, p=1)
    shapes = torch.tensor(rows, dtype=torch.int64)
    starts = torch.tensor([0, 6], dtype=torch.int64)
    if s is not None:
        value = torch.randn(1, s, 1, 2, dtype=torch.float64)
    return value, shapes, starts, loc, weights


BAD_SHAPES = [
    ([[2**32, 2**32], [1, 2]], None, "spatial_shapes"),  # H * W = 2**64 wraps to 0 in int64
    ([[2**62, 4], [1, 2]], None, "spatial_shapes"),
    ([[2, 3], [0, 2]], None, "positive"),
    ([[2, 3], [-1, -8]], None, "positive"),
    ([[2, 3], [4, 4]], None, "spatial_shapes"),  # H * W > S
    ([[2, 3], [1, 2]], 9, "S=9"),
]


@pytest.mark.parametrize("rows,s,match", BAD_SHAPES)
def test_public_op_rejects_levels_outside_value(rows, s, match):
    with pytest.raises(ValueError, match=match):
        dnops.ms_deform_attn(*with_shapes(rows, s))


@pytest.mark.parametrize("rows,s,match", BAD_SHAPES)
def test_cpu_kernel_rejects_levels_outside_value(rows, s, match):
    # the raw op, past the Python checks: its own checks must stop it before it reads
    args = with_shapes(rows, s)
    with pytest.raises(RuntimeError, match=match if match != "spatial_shapes" else "spatial_shapes|positions"):
        torch.ops.dnops.ms_deform_attn(*args)
    with pytest.raises(RuntimeError):
        torch.ops.dnops._ms_deform_attn_backward(torch.ones(1, 2, 2, dtype=torch.float64), *args)


def test_level_check_off_the_cpu_reads_each_shapes_tensor_once(monkeypatch):
    """Off the CPU, reading spatial_shapes is a device sync: its values are read once per tensor, and again after
    an in-place change or with another level_start_index (cached=True is what a GPU tensor gets)."""
    from dnops import validation

    reads = []
    real = validation._read_levels
    monkeypatch.setattr(validation, "_read_levels", lambda *a: reads.append(1) or real(*a))
    value, shapes, starts, _, _ = make_inputs()
    s = value.shape[1]
    for _ in range(3):
        validation._check_levels(shapes, starts, s, cached=True)
    assert len(reads) == 1
    validation._check_levels(shapes, starts.clone(), s, cached=True)
    assert len(reads) == 2
    shapes[1, 0] = 2**62  # in place: the next call reads again and rejects it
    with pytest.raises(ValueError, match="spatial_shapes cover more than"):
        validation._check_levels(shapes, starts, s, cached=True)
    reads.clear()
    cpu_shapes = torch.tensor([[4, 5], [2, 3]])
    for _ in range(2):
        validation._check_levels(cpu_shapes, starts, s, cached=False)
    assert len(reads) == 2  # CPU tensors: read every time (free), never cached


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["ms_deform_attn", "dn_self_attention"])
def test_double_backward_raises(backend, op, backend_env):
    backend_env(backend)
    if op == "ms_deform_attn":
        args = make_inputs(requires_grad=True)
        out = dnops.ms_deform_attn(*args)
        inputs = [args[0], args[3], args[4]]
    else:
        inputs = [torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        out = dnops.dn_self_attention(*inputs, 6, 3)
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    second = sum(g.square().sum() for g in grads)
    if backend == "reference":
        # the reference is plain PyTorch: where PyTorch differentiates twice, so does it; else PyTorch says so
        try:
            torch.autograd.grad(second, inputs, allow_unused=True)
        except RuntimeError as exc:
            assert "not implemented" in str(exc)
        return
    with pytest.raises(RuntimeError, match=f"double backward is not supported by dnops.{op}"):
        torch.autograd.grad(second, inputs)


def test_dn_self_attention_rejects_zero_head_dim():
    q = torch.randn(1, 2, 10, 0)
    with pytest.raises(ValueError, match="Dh >= 1"):
        dnops.dn_self_attention(q, q, q, 4, 2)


# ---- DNMultiheadAttention, the DN-DETR adapter ---------------------------------------------------------------


def _mha_and_input():
    from dnops.nn import DNMultiheadAttention

    torch.manual_seed(0)
    mha = DNMultiheadAttention(16, 2).double().eval()
    parent = torch.nn.MultiheadAttention(16, 2).double().eval()
    parent.load_state_dict(mha.state_dict())
    return mha, parent, torch.randn(27, 2, 16, dtype=torch.float64)


def test_dn_mha_pickles_after_a_masked_call(tmp_path):
    mha, _, x = _mha_and_input()
    mask = dnops.dn_attn_mask(12, 4, 15)
    before = mha(x, x, x, attn_mask=mask)[0]
    torch.save(mha, tmp_path / "mha.pt")
    loaded = torch.load(tmp_path / "mha.pt", weights_only=False)
    torch.testing.assert_close(loaded(x, x, x, attn_mask=mask)[0], before)


def test_dn_mha_honours_a_mask_that_is_not_the_dn_mask():
    mha, parent, x = _mha_and_input()
    other = torch.rand(27, 27) < 0.3
    other.fill_diagonal_(False)
    got = mha(x, x, x, attn_mask=other, dn=(12, 4))[0]
    torch.testing.assert_close(got, parent(x, x, x, attn_mask=other)[0])
    dn_mask = dnops.dn_attn_mask(12, 4, 15)
    torch.testing.assert_close(mha(x, x, x, attn_mask=dn_mask, dn=(12, 4))[0], parent(x, x, x, attn_mask=dn_mask)[0])


def test_dn_mha_takes_the_mask_dict_of_the_dn_detr_adapter():
    from dnops.compat import dn_detr

    targets = [{"labels": torch.tensor([1, 2, 3]), "boxes": torch.rand(3, 4) * 0.5 + 0.2}, {"labels": torch.tensor([4]),
               "boxes": torch.rand(1, 4) * 0.5 + 0.2}]  # fmt: skip
    enc = torch.nn.Embedding(11, 15)
    _, _, mask, mask_dict = dn_detr.prepare_for_dn(
        (targets, 4, 0.2, 0.4, 1), torch.rand(15, 4), 2, True, 15, 10, 16, enc
    )
    mha, parent, _ = _mha_and_input()
    x = torch.randn(mask.shape[0], 2, 16, dtype=torch.float64)
    torch.testing.assert_close(mha(x, x, x, dn=mask_dict)[0], parent(x, x, x, attn_mask=mask)[0])


def test_dn_mha_compiles_fullgraph_with_a_mask():
    mha, parent, x = _mha_and_input()
    mask = dnops.dn_attn_mask(12, 4, 15)
    torch._dynamo.reset()
    got = torch.compile(lambda x: mha(x, x, x, attn_mask=mask)[0], fullgraph=True)(x)
    torch.testing.assert_close(got, parent(x, x, x, attn_mask=mask)[0])


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


# ---- dn_queries arguments: one rule on every backend -------------------------------------------------------------

DNQ_BACKENDS = BACKENDS


def _gt():
    labels = torch.tensor([1, 2, 0, 4])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 4)
    return labels, boxes, [3, 1]


@pytest.mark.parametrize("backend", DNQ_BACKENDS)
@pytest.mark.parametrize(
    "change,match",
    [
        ({"box_noise_scale": float("nan")}, "box_noise_scale"),
        ({"box_noise_scale": float("inf")}, "box_noise_scale"),
        ({"label_noise_ratio": float("nan")}, "label_noise_ratio"),
        ({"counts": [1.5, 2.5]}, "counts"),
        ({"counts": [[3], [1]]}, "counts"),
        ({"counts": torch.tensor([[3, 1]])}, "counts"),
        ({"counts": torch.tensor([3.0, 1.0])}, "counts"),
        ({"counts": "31"}, "counts"),
        ({"num_groups": 2**40}, "2\\*\\*31"),
        ({"mode": "cdn", "dn_number": 2**40}, "2\\*\\*31"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"nan_box": True}, "boxes must be finite"),
        ({"mode": "cdn", "nan_box": True}, "boxes must be finite"),
        ({"bad_label": True}, "labels must be in"),
    ],
    ids=str,
)
def test_dn_queries_rejects_bad_arguments_alike(backend, backend_env, change, match):
    backend_env(backend)
    labels, boxes, counts = _gt()
    change = dict(change)
    if change.pop("nan_box", False):
        boxes[2, 1] = float("nan")
    if change.pop("bad_label", False):
        labels[3] = 91
    kw = {"num_classes": 91, "counts": counts, **change}
    with pytest.raises(ValueError, match=match):
        dnops.dn_queries(labels, boxes, kw.pop("counts"), **kw)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_dn_queries_backends_agree_on_large_seeds(backend):
    labels, boxes, counts = _gt()
    outs = []
    for name in ("reference", backend):
        with _backend.use_backend(name):
            outs.append(dnops.dn_queries(labels, boxes, counts, num_classes=91, mode="cdn", seed=2**63 - 1))
    assert torch.equal(outs[1].labels, outs[0].labels)
    torch.testing.assert_close(outs[1].boxes, outs[0].boxes, rtol=0, atol=1e-6)


# ---- the reference meets the kernels' contract ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_finite_and_huge_locations_read_zero(backend, backend_env):
    backend_env(backend)
    value, shapes, starts, loc, weights = make_inputs(n=1, lq=5, m=1, p=1, requires_grad=False)
    for q, x in enumerate([float("nan"), float("inf"), -float("inf"), 3e38, -3e38]):
        loc[0, q] = x
    loc.requires_grad_()
    value.requires_grad_()
    out = dnops.ms_deform_attn(value, shapes, starts, loc, weights)
    assert torch.equal(out, torch.zeros_like(out))
    g_value, g_loc = torch.autograd.grad(out.sum(), [value, loc])
    assert torch.equal(g_loc, torch.zeros_like(g_loc)) and torch.equal(g_value, torch.zeros_like(g_value))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_reference_checks_levels(dynamic):
    from dnops import reference

    torch._dynamo.reset()
    compiled = torch.compile(reference.ms_deform_attn, dynamic=dynamic)
    value, shapes, starts, loc, weights = make_inputs(dtype=torch.float32)
    torch.testing.assert_close(compiled(value, shapes, starts, loc, weights), reference.ms_deform_attn(
        value, shapes, starts, loc, weights))  # fmt: skip
    with pytest.raises(ValueError, match="level_start_index"):
        compiled(value, shapes, torch.tensor([0, 7]), loc, weights)
    with pytest.raises(ValueError, match="S=26"):
        compiled(value, torch.tensor([[4, 5], [2, 2]]), torch.tensor([0, 20]), loc, weights)


def test_msdeformattn_rejects_more_levels_than_built_for():
    from dnops.nn import MSDeformAttn

    mod = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = torch.tensor([[4, 4], [2, 2], [1, 1]])
    starts = torch.tensor([0, 16, 20])
    with pytest.raises(ValueError, match="n_levels=2"):
        mod(torch.randn(1, 3, 16), torch.rand(1, 3, 3, 2), torch.randn(1, 21, 16), shapes, starts)
