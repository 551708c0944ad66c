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
from dnops.compat import multi_scale_deformable_attention as shim
from tests.msda_utils import make_inputs

ROOT = Path(__file__).resolve().parent.parent

# A transcription of the pattern in Deformable-DETR's models/ops/functions/ms_deform_attn_func.py (written here,
# not copied): the Function the model files call, importing the compiled module by its name.
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
    path = shim.install(tmp_path)
    assert path.name == "MultiScaleDeformableAttention.py"
    (tmp_path / "ms_deform_attn_func.py").write_text(MODEL_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("MultiScaleDeformableAttention", "ms_deform_attn_func"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import ms_deform_attn_func

    return ms_deform_attn_func.MSDeformAttnFunction


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("d", [1, 8, 30])
def test_unmodified_function_matches_reference(model_function, backend_env, backend, d):
    backend_env(backend)
    args = make_inputs(d=d, requires_grad=True)
    out = model_function.apply(*args, 64)
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
