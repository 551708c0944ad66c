"""Property-based tests: random valid inputs give what the reference gives, on every backend that runs here;
random invalid inputs raise a ValueError whose message names the offending argument, never a crash."""

import math

import pytest
import torch

import dnops
from dnops import _backend, reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KERNELS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]


def run(backend: str, fn, *args, **kw):
    with _backend.use_backend(backend):
        return fn(*args, **kw)


# ---- ms_deform_attn -----------------------------------------------------------------------------------------------


@st.composite
def msda_inputs(draw):
    n, lq = draw(st.integers(0, 2)), draw(st.integers(0, 5))
    shapes = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3))
    m, d, p = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    spatial = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    value = torch.randn(n, int(sizes.sum()), m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.randn(n, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    return [value, spatial, starts, loc, weights], draw(st.booleans())


@pytest.mark.parametrize("backend", KERNELS)
@SETTINGS
@given(case=msda_inputs())
def test_ms_deform_attn_equals_reference(backend, case):
    args, logits = case
    args = [t.requires_grad_() if t.is_floating_point() else t for t in args]
    out = run(backend, dnops.ms_deform_attn, *args, attention_logits=logits)
    ref = reference.ms_deform_attn(*args, logits)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    if out.numel():
        g = torch.randn_like(out)
        inputs = [args[0], args[3], args[4]]
        for x, y in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-8)


def _msda_corruptions(args):
    value, shapes, starts, loc, weights = args
    big = torch.tensor([[2**31, 2**33]] + [[1, 1]] * (shapes.shape[0] - 1))
    return [
        ("value", [value.flatten(0, 1), shapes, starts, loc, weights]),
        ("value", [value.long(), shapes, starts, loc, weights]),
        ("spatial_shapes", [value, shapes.double(), starts, loc, weights]),
        ("spatial_shapes", [value, shapes * 0, starts, loc, weights]),
        ("spatial_shapes", [value, -shapes, starts, loc, weights]),
        ("spatial_shapes", [value, big, starts, loc, weights]),
        ("spatial_shapes", [value, shapes[:, :1], starts, loc, weights]),
        ("level_start_index", [value, shapes, starts + 1, loc, weights]),
        ("level_start_index", [value, shapes, starts.short(), loc, weights]),  # int32 is accepted, int16 not
        ("sampling_locations", [value, shapes, starts, loc[..., :1], weights]),
        ("sampling_locations", [value, shapes, starts, loc.float(), weights]),
        ("attention_weights", [value, shapes, starts, loc, weights[..., :0]]),
        ("attention_weights", [value, shapes, starts, loc, weights.float()]),
    ]


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=pytest.mark.triton)])
@SETTINGS
@given(case=msda_inputs(), pick=st.integers(0, 12))
def test_ms_deform_attn_invalid_inputs_name_the_argument(backend, case, pick):
    name, bad = _msda_corruptions(case[0])[pick]
    with pytest.raises(ValueError, match=name):
        run(backend, dnops.ms_deform_attn, *bad)


# ---- dn_queries ---------------------------------------------------------------------------------------------------


@st.composite
def dnq_inputs(draw):
    counts = draw(st.lists(st.integers(0, 6), min_size=1, max_size=5))
    k = sum(counts)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    num_classes = draw(st.integers(1, 30))
    labels = torch.randint(0, num_classes, (k,), generator=g)
    wh = 0.05 + 0.4 * torch.rand(k, 2, generator=g)
    boxes = torch.cat([wh / 2 + (1 - wh) * torch.rand(k, 2, generator=g), wh], 1)
    kw = {
        "num_classes": num_classes,
        "mode": draw(st.sampled_from(["dn", "cdn"])),
        "num_groups": draw(st.integers(1, 4)),
        "dn_number": draw(st.integers(1, 120)),
        "max_dn_queries": draw(st.none() | st.integers(2, 40)),
        "label_noise_ratio": draw(st.floats(0, 1)),
        "box_noise_scale": draw(st.floats(0, 2)),
        "seed": draw(st.integers(0, 2**63 - 1)),
    }
    return labels, boxes, counts, kw


@pytest.mark.parametrize("backend", KERNELS)
@SETTINGS
@given(case=dnq_inputs())
def test_dn_queries_equals_reference(backend, case):
    labels, boxes, counts, kw = case
    got = run(backend, dnops.dn_queries, labels, boxes, counts, **kw)
    want = run("reference", dnops.dn_queries, labels, boxes, counts, **kw)
    assert (got.num_groups, got.group_size, got.pad_size) == (want.num_groups, want.group_size, want.pad_size)
    for x, y in zip(got[:4], want[:4], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def _dnq_corruptions(labels, boxes, counts, kw):
    return [
        ("labels", (labels.float(), boxes, counts), {}),
        ("labels", (labels + kw["num_classes"], boxes, counts), {}),
        ("boxes", (labels, boxes[:, :3], counts), {}),
        ("boxes", (labels, boxes.long(), counts), {}),
        ("counts", (labels, boxes, [*counts, 1]), {}),
        ("counts", (labels, boxes, [c + 0.5 for c in counts]), {}),
        ("num_classes", (labels, boxes, counts), {"num_classes": 0}),
        ("box_noise_scale", (labels, boxes, counts), {"box_noise_scale": -1.0}),
        ("box_noise_scale", (labels, boxes, counts), {"box_noise_scale": math.nan}),
        ("label_noise_ratio", (labels, boxes, counts), {"label_noise_ratio": 1.5}),
        ("seed", (labels, boxes, counts), {"seed": -3}),
        ("mode", (labels, boxes, counts), {"mode": "dino"}),
        ("num_groups", (labels, boxes, counts), {"mode": "dn", "num_groups": 0}),
    ]


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=pytest.mark.triton)])
@SETTINGS
@given(case=dnq_inputs(), pick=st.integers(0, 12))
def test_dn_queries_invalid_inputs_name_the_argument(backend, case, pick):
    labels, boxes, counts, kw = case
    name, args, change = _dnq_corruptions(labels, boxes, counts, kw)[pick]
    if name == "labels" and args[0].dtype != torch.float32 and not args[0].numel():
        return  # no GT: no label can be out of range
    with pytest.raises(ValueError, match=name):
        run(backend, dnops.dn_queries, *args, **(kw | change))


# ---- dn_self_attention --------------------------------------------------------------------------------------------


@st.composite
def dsa_inputs(draw):
    groups, group_size = draw(st.integers(0, 3)), draw(st.integers(1, 5))
    nq, dh, b, h = draw(st.integers(0, 9)), draw(st.integers(1, 12)), draw(st.integers(0, 2)), draw(st.integers(1, 3))
    pad = groups * group_size
    if pad + nq == 0:
        nq = 1
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    qkv = [torch.randn(b, h, pad + nq, dh, generator=g, dtype=torch.float64) for _ in range(3)]
    return qkv, pad, group_size if pad else 0


@pytest.mark.parametrize("backend", [*KERNELS, "sdpa"])
@SETTINGS
@given(case=dsa_inputs())
def test_dn_self_attention_equals_reference(backend, case):
    qkv, pad, group = case
    qkv = [t.requires_grad_() for t in qkv]
    out = run(backend, dnops.dn_self_attention, *qkv, pad, group)
    ref = reference.dn_self_attention(*qkv, pad, group)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    if out.numel():
        g = torch.randn_like(out)
        for x, y in zip(torch.autograd.grad(out, qkv, g), torch.autograd.grad(ref, qkv, g), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("backend", ["cpu", "reference", "sdpa", pytest.param("triton", marks=pytest.mark.triton)])
@SETTINGS
@given(case=dsa_inputs(), pick=st.integers(0, 5))
def test_dn_self_attention_invalid_inputs_name_the_argument(backend, case, pick):
    (q, k, v), pad, group = case
    width = q.shape[2]
    bad = [
        ("pad_size", (q, k, v, width + 1, 1)),
        ("pad_size", (q, k, v, -1, 1)),
        ("q", (q.flatten(0, 1), k, v, pad, group)),
        ("q", (q.long(), k, v, pad, group)),
        ("q", (q, k[..., :0], v, pad, group)),
        ("group_size", (q, k, v, width, 0) if width else (q, k, v, 0, 0)),
    ][pick]
    name, args = bad
    if name == "group_size" and not width:
        return
    with pytest.raises(ValueError, match=name):
        run(backend, dnops.dn_self_attention, *args)
