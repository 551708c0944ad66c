"""Mixed precision: every op and module under torch.autocast (CPU bfloat16 here; on a GPU the same code runs
under CUDA float16 / bfloat16) runs forward and backward and matches its float32 result.

Tolerances: the deformable attention runs in float32 under autocast, so only its inputs' half-precision
projections differ (2e-2 relative, bfloat16's ~3 significant digits); the attention and the thin model run in
bfloat16 (5e-2).
"""

import pytest
import torch

import dnops
from dnops import reference
from dnops.nn import DNMultiheadAttention, MSDeformAttn
from tests.msda_utils import make_inputs

BACKENDS = ["cpu", "reference"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def msda_module_inputs():
    torch.manual_seed(0)
    mod = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2)
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.2)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    src = torch.randn(2, 60, 64, requires_grad=True)
    query = torch.randn(2, 11, 64, requires_grad=True)
    refs = torch.rand(2, 11, 2, 2)
    return mod, (query, refs, src, shapes, starts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_msdeformattn_module_under_autocast(backend, backend_env):
    backend_env(backend)
    mod, args = msda_module_inputs()
    want = mod(*args)
    want_grads = torch.autograd.grad(want.sum(), [args[0], args[2], *mod.parameters()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mod(*args)
    assert got.dtype == torch.bfloat16  # output_proj runs in the autocast dtype
    got_grads = torch.autograd.grad(got.float().sum(), [args[0], args[2], *mod.parameters()])
    assert rel_err(got, want) < 2e-2
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == torch.float32 and rel_err(g, w) < 3e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_casts_mixed_inputs_to_float32_under_autocast(backend, backend_env):
    backend_env(backend)
    value, shapes, starts, loc, weights = make_inputs(dtype=torch.float32)
    want = reference.ms_deform_attn(value, shapes, starts, loc, weights)
    mixed = (value.bfloat16(), shapes, starts, loc, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dnops.ms_deform_attn(*mixed)
        raw = torch.ops.dnops.ms_deform_attn(*mixed)
    assert got.dtype == raw.dtype == torch.float32
    assert rel_err(got, want) < 1e-2 and rel_err(raw, want) < 1e-2
    with pytest.raises(ValueError, match="sampling_locations has dtype torch.float32 but value has torch.bfloat16"):
        dnops.ms_deform_attn(*mixed)
    with pytest.raises(RuntimeError, match="must have value's dtype"):
        torch.ops.dnops.ms_deform_attn(*mixed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dn_self_attention_and_dn_mha_under_autocast(backend, backend_env):
    backend_env(backend)
    torch.manual_seed(0)
    mha = DNMultiheadAttention(64, 4)
    x = torch.randn(50, 2, 64, requires_grad=True)
    want = mha(x, x, x, dn=(20, 5))[0]
    (want_gx,) = torch.autograd.grad(want.sum(), [x])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mha(x, x, x, dn=(20, 5))[0]
    assert got.dtype == torch.bfloat16
    (got_gx,) = torch.autograd.grad(got.float().sum(), [x])
    assert rel_err(got, want) < 5e-2 and rel_err(got_gx, want_gx) < 5e-2

    q, k, v = (torch.randn(2, 4, 50, 16) for _ in range(3))
    want = reference.dn_self_attention(q, k, v, 20, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dnops.dn_self_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 20, 5)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 5e-2


def test_thin_dn_detr_training_step_under_autocast():
    from models.config import Config
    from models.criterion import Criterion
    from models.model import DNDETR

    cfg = Config(d_model=32, n_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64, num_queries=20, image_size=64)
    cfg.backbone_width, cfg.dn_groups = 8, 3
    torch.manual_seed(0)
    model = DNDETR(cfg, 10).train()
    criterion = Criterion(cfg, 10)
    images = torch.rand(2, 3, 64, 64)
    targets = [{"labels": torch.randint(0, 10, (c,)), "boxes": torch.rand(c, 4) * 0.4 + 0.3} for c in (3, 5)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = criterion(model(images, targets), targets)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
