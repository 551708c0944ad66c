import pytest
import torch

from dnops import reference
from tests.msda_utils import loop_ms_deform_attn, make_inputs


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"shapes": ((3, 3),), "p": 1, "d": 1},
        {"shapes": ((5, 2), (1, 1), (2, 7)), "m": 3, "d": 3, "p": 3},
        {"n": 1, "lq": 5, "d": 7},
    ],
)
def test_matches_loop_definition(kw):
    args = make_inputs(**kw)
    torch.testing.assert_close(reference.ms_deform_attn(*args), loop_ms_deform_attn(*args), rtol=1e-12, atol=1e-12)


def test_borders_and_outside():
    value, shapes, starts, loc, weights = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=8, m=1, p=1)
    edges = torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [-0.5, 0.5], [1.5, 0.2], [0.125, 1 / 6], [-1e-9, 1.0 + 1e-9]],
        dtype=torch.float64,
    )
    loc[0, :, 0, :, 0] = edges[:, None, :]
    out = reference.ms_deform_attn(value, shapes, starts, loc, weights)
    torch.testing.assert_close(out, loop_ms_deform_attn(value, shapes, starts, loc, weights), rtol=1e-12, atol=1e-12)
    # A location a full pixel outside every map reads only zeros.
    assert out[0, 4].abs().max() == 0 and out[0, 5].abs().max() == 0


def test_gradcheck():
    args = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=2, m=2, d=3, p=2, low=0.05, high=0.95, requires_grad=True)
    assert torch.autograd.gradcheck(reference.ms_deform_attn, args, eps=1e-6, atol=1e-5, nondet_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_close_to_float64(dtype):
    args64 = make_inputs(d=8)
    expected = reference.ms_deform_attn(*args64)
    args = [t.to(dtype) if t.is_floating_point() else t for t in args64]
    out = reference.ms_deform_attn(*args)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_empty_queries_and_batch():
    for kw in ({"lq": 0}, {"n": 0}):
        args = make_inputs(**kw)
        out = reference.ms_deform_attn(*args)
        assert out.shape == (kw.get("n", 2), kw.get("lq", 3), 2 * 4)


def _replace(args, i, new):
    args = list(args)
    args[i] = new
    return args


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: _replace(a, 0, a[0][:, :-1]), "S="),
        (lambda a: _replace(a, 2, a[2] + 1), "level_start_index"),
        (lambda a: _replace(a, 1, a[1][:1]), "level_start_index has"),
        (lambda a: _replace(a, 0, a[0][0]), "value must have rank 4"),
        (lambda a: _replace(a, 3, a[3].float()), "sampling_locations has dtype"),
        (lambda a: _replace(a, 4, a[4][..., :1]), "attention_weights must be"),
        (lambda a: _replace(a, 1, a[1].int()), "spatial_shapes must be int64"),
        (lambda a: _replace(a, 3, a[3][:, :, :1]), "sampling_locations must be"),
        (lambda a: _replace(a, 0, a[0].long()), "value must be float"),
    ],
)
def test_bad_inputs_name_the_argument(mutate, match):
    with pytest.raises(ValueError, match=match):
        reference.ms_deform_attn(*mutate(make_inputs()))


def test_device_mix_raises():
    args = make_inputs()
    with pytest.raises(ValueError, match="sampling_locations is on cpu but value is on meta"):
        reference.ms_deform_attn(args[0].to("meta"), args[1].to("meta"), args[2].to("meta"), *args[3:])
