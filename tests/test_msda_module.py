"""The compiled MultiScaleDeformableAttention module's interface on dnops, used as Deformable-DETR / DINO /
DN-DETR use it: `import MultiScaleDeformableAttention as MSDA` inside their autograd Function, unmodified."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dnops import reference
from dnops.compat import extensions
from tests.gpu_utils import as_float64, assert_matches_reference, msda_args
from tests.msda_utils import make_inputs

ROOT = Path(__file__).resolve().parent.parent

# A transcription of the pattern in Deformable-DETR's models/ops/functions/ms_deform_attn_func.py (fundamentalvision/
# Deformable-DETR 11169a6; written here, not copied): the Function the model files call, importing the compiled
# module by its name and saving the level tensors for its backward.
MODEL_CODE = textwrap.dedent(
    """
    import torch
    from torch.autograd import Function
    from torch.autograd.function import once_differentiable

    import MultiScaleDeformableAttention as MSDA


    class MSDeformAttnFunction(Function):
        @staticmethod
        def forward(ctx, value, shapes, level_start, sampling_locations, attention_weights, im2col_step):
            ctx.im2col_step = im2col_step
            output = MSDA.ms_deform_attn_forward(
                value, shapes, level_start, sampling_locations, attention_weights, ctx.im2col_step
            )
            ctx.save_for_backward(value, shapes, level_start, sampling_locations, attention_weights)
            return output

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_output):
            value, shapes, level_start, sampling_locations, attention_weights = ctx.saved_tensors
            grad_value, grad_sampling_loc, grad_attn_weight = MSDA.ms_deform_attn_backward(
                value, shapes, level_start, sampling_locations, attention_weights, grad_output, ctx.im2col_step
            )
            return grad_value, None, None, grad_sampling_loc, grad_attn_weight, None
    """
)


@pytest.fixture
def model_function(tmp_path, monkeypatch):
    """The Function above, importing the MultiScaleDeformableAttention that `install --target` wrote."""
    path = extensions.install(target=tmp_path)
    assert path.name == "MultiScaleDeformableAttention.py"
    (tmp_path / "ms_deform_attn_func.py").write_text(MODEL_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("MultiScaleDeformableAttention", "ms_deform_attn_func"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import ms_deform_attn_func

    return ms_deform_attn_func.MSDeformAttnFunction


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("d", [1, 8, 30])
@pytest.mark.parametrize("levels", [torch.int64, torch.int32], ids=str)  # int32 level tensors reach the backward
def test_unmodified_function_matches_reference(model_function, backend_env, backend, d, levels):
    backend_env(backend)
    args = make_inputs(d=d, requires_grad=True)
    out = model_function.apply(args[0], args[1].to(levels), args[2].to(levels), *args[3:], 64)
    ref = reference.ms_deform_attn(*args)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    inputs = [args[0], args[3], args[4]]
    for x, y in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_unmodified_function_gradcheck(model_function):
    args = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=2, m=2, d=3, p=2, low=0.05, high=0.95, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: model_function.apply(*a, 2), args, eps=1e-6, atol=1e-5)


def test_float32_and_bfloat16(model_function):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        args = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in make_inputs(d=8)]
        out = model_function.apply(*args, 64)
        want = reference.ms_deform_attn(*[t.double() if t.is_floating_point() else t for t in args])
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
        out.sum().backward()
        assert args[0].grad.dtype == dtype and torch.isfinite(args[3].grad).all()


def test_install_command_and_uninstall(tmp_path):
    run = [sys.executable, "-m", "dnops.compat.multi_scale_deformable_attention"]
    done = subprocess.run([*run, "install", "--target", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and (tmp_path / "MultiScaleDeformableAttention.py").exists(), done.stderr
    code = "import MultiScaleDeformableAttention as M; print(M.ms_deform_attn_forward.__module__)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))  # dnops as the tests import it
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert imported.stdout.strip() == "dnops.compat.multi_scale_deformable_attention", imported.stderr
    done = subprocess.run([*run, "uninstall", "--target", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and not (tmp_path / "MultiScaleDeformableAttention.py").exists()


def _deformable_attention_inputs():
    """What a Deformable-DETR layer hands the Function under autocast: value from a projection (the autocast
    dtype), locations and weights in float32 (reference points plus offsets, a softmax)."""
    value, shapes, starts, loc, weights = make_inputs(d=8, dtype=torch.float32)
    proj = torch.nn.Linear(8, 8)
    return proj, value, shapes, starts, loc.requires_grad_(), weights.requires_grad_()


def test_under_autocast_like_dnops_op(model_function):
    """torch.autocast around an unmodified forward: value arrives in bfloat16 and locations / weights in float32;
    like dnops' op the interface takes that pair as it is and returns bfloat16, and autograd's backward (outside
    autocast, with the saved mixed dtypes) gives each input's gradient in its own dtype."""
    proj, value, shapes, starts, loc, weights = _deformable_attention_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = proj(value)
        assert projected.dtype == torch.bfloat16
        out = model_function.apply(projected, shapes, starts, loc, weights, 64)
    assert out.dtype == torch.bfloat16
    want = reference.ms_deform_attn(projected.double(), shapes, starts, loc.double(), weights.double())
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    out.sum().backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
    assert loc.grad.dtype == torch.float32 and weights.grad.dtype == torch.float32


def test_dino_half_precision_branch(model_function):
    """DINO's MSDeformAttn casts value and locations to float32 and leaves the weights in float16."""
    value, shapes, starts, loc, weights = make_inputs(d=8, dtype=torch.float32, requires_grad=True)
    half_weights = weights.detach().half().requires_grad_()
    out = model_function.apply(value, shapes, starts, loc, half_weights, 64)
    assert out.dtype == torch.float32
    want = reference.ms_deform_attn(value.double(), shapes, starts, loc.double(), half_weights.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert half_weights.grad.dtype == torch.float16 and value.grad.dtype == torch.float32
    ref_weights = half_weights.detach().double().requires_grad_()
    ref = reference.ms_deform_attn(value.detach().double(), shapes, starts, loc.detach().double(), ref_weights)
    (want_grad,) = torch.autograd.grad(ref.sum(), [ref_weights])
    torch.testing.assert_close(half_weights.grad.double(), want_grad, rtol=2e-3, atol=2e-3)


def test_install_target_refuses_to_shadow_and_says_when_not_importable(tmp_path, monkeypatch, capsys):
    compiled = tmp_path / "MultiScaleDeformableAttention.cpython-311-x86_64-linux-gnu.so"
    compiled.write_bytes(b"\x7fELF")  # a compiled original in the target folder
    with pytest.raises(SystemExit, match="already installed at .*MultiScaleDeformableAttention.cpython"):
        extensions.install(target=tmp_path)
    assert not (tmp_path / "MultiScaleDeformableAttention.py").exists()
    written = extensions.install(target=tmp_path, force=True)
    assert written.read_text() == extensions.shim_text("MultiScaleDeformableAttention")
    assert "is not on Python's module path" in capsys.readouterr().err
    # installed again over its own shim, from a folder on the path: no refusal, no note
    compiled.unlink()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "MultiScaleDeformableAttention", raising=False)
    extensions.install(target=tmp_path)
    assert "module path" not in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_scale_deformable_attention_module_interface(dev, dtype):
    from dnops.compat import multi_scale_deformable_attention as msda

    args = msda_args(dtype, dev, d=32)
    out = msda.ms_deform_attn_forward(*args, 64)
    ref_args = as_float64(args)
    low_args = [t.detach().requires_grad_(t.requires_grad) for t in args]
    ref, low = reference.ms_deform_attn(*ref_args), reference.ms_deform_attn(*low_args)
    assert_matches_reference(out, ref, low, dtype, "MSDA.ms_deform_attn_forward")
    g = torch.randn_like(ref)
    got = msda.ms_deform_attn_backward(*args, g.to(dtype), 64)
    want = torch.autograd.grad(ref, [ref_args[0], ref_args[3], ref_args[4]], g)
    lows = torch.autograd.grad(low, [low_args[0], low_args[3], low_args[4]], g.to(dtype))
    for i, (x, y, z) in enumerate(zip(got, want, lows, strict=True)):
        assert_matches_reference(x, y, z, dtype, f"MSDA.ms_deform_attn_backward grad {i}")
