"""GPU tests across the ops (``pytest -m cuda``; skipped without a CUDA device): torch.compile(fullgraph) of
every op on each GPU backend, a CUDA-graph capture of a thin DN-DETR training step, no host sync in the
adapters. Each op's own GPU tests are in its test file."""

from __future__ import annotations

import pytest
import torch

import dnops
from dnops import _backend, reference
from tests.gpu_utils import assert_rel, check_against_reference, cuda, msda_args


@cuda
def test_adapters_dispatch_no_host_sync():
    from dnops.compat import dino, dn_detr

    targets = [
        {"labels": torch.randint(0, 91, (c,), device="cuda"), "boxes": torch.rand(c, 4, device="cuda") * 0.5 + 0.2}
        for c in (3, 0, 7)
    ]
    anchors = torch.rand(300, 4, device="cuda")
    enc_dn, enc_cdn = torch.nn.Embedding(92, 255).cuda(), torch.nn.Embedding(92, 256).cuda()
    dnops.dn_queries(targets[0]["labels"], targets[0]["boxes"], [3], num_classes=91)  # warm-up: lazy inits sync
    dn_detr.prepare_for_dn((targets, 5, 0.2, 0.4, 1), anchors, 3, True, 300, 91, 256, enc_dn)
    dino.prepare_for_cdn((targets, 100, 0.5, 1.0), True, 900, 91, 256, enc_cdn)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dnops.dn_queries(targets[2]["labels"], targets[2]["boxes"], [7], num_classes=91, mode="cdn")
        dn_detr.prepare_for_dn((targets, 5, 0.2, 0.4, 1), anchors, 3, True, 300, 91, 256, enc_dn)
        dino.prepare_for_cdn((targets, 100, 0.5, 1.0), True, 900, 91, 256, enc_cdn)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "sdpa"])
def test_compile_fullgraph_ops(backend):
    torch._dynamo.reset()
    if backend == "triton" and _backend.triton_available():
        # imported before tracing: the public functions import their Triton module on first use
        import dnops.triton.dn_queries
        import dnops.triton.dn_self_attention
        import dnops.triton.ms_deform_attn  # noqa: F401
    args = msda_args(torch.float32, d=32)
    if _backend.available("ms_deform_attn", "cuda")[backend]:
        with _backend.use_backend(backend):
            compiled = torch.compile(dnops.ms_deform_attn, fullgraph=True)
            out = compiled(*args)
        check_against_reference(lambda *a: out, reference.ms_deform_attn, args, torch.float32, "compiled msda")
    qkv = [torch.randn(2, 3, 40, 32, device="cuda", requires_grad=True) for _ in range(3)]
    if _backend.available("dn_self_attention", "cuda")[backend]:
        with _backend.use_backend(backend):
            out = torch.compile(dnops.dn_self_attention, fullgraph=True)(*qkv, 20, 5)
        ref = lambda q, k, v: reference.dn_self_attention(q, k, v, 20, 5)  # noqa: E731
        check_against_reference(lambda *a: out, ref, qkv, torch.float32, "compiled dn_self_attention")
    if _backend.available("dn_queries", "cuda")[backend]:
        labels, boxes = torch.randint(0, 20, (9,), device="cuda"), torch.rand(9, 4, device="cuda") * 0.5 + 0.2

        def gen(labels, boxes):
            return dnops.dn_queries(labels, boxes, [4, 5], num_classes=20, mode="cdn", seed=7)

        with _backend.use_backend(backend):
            got = torch.compile(gen, fullgraph=True)(labels, boxes)
            want = gen(labels, boxes)
        assert torch.equal(got.labels, want.labels) and torch.equal(got.boxes, want.boxes)
    mask = torch.compile(lambda: dnops.dn_attn_mask(40, 8, 17, device="cuda"), fullgraph=True)()
    assert torch.equal(mask.cpu(), reference.dn_attn_mask(40, 8, 17))


@cuda
def test_cuda_graph_of_a_dn_detr_training_step():
    """Forward with denoising queries, the denoising losses (no matching: DN's targets are known), backward and a
    capturable AdamW step, captured once; replays from the same parameters and optimizer state give the same
    gradients, and each replay moves the parameters."""
    from models.config import Config
    from models.model import DNDETR

    cfg = Config(d_model=32, n_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64, num_queries=20, image_size=64)
    cfg.backbone_width, cfg.dn_groups = 8, 3
    torch.manual_seed(0)
    model = DNDETR(cfg, 10).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    images = torch.rand(2, 3, 64, 64, device="cuda")
    targets = [
        {"labels": torch.randint(0, 10, (c,), device="cuda"), "boxes": torch.rand(c, 4, device="cuda") * 0.4 + 0.3}
        for c in (3, 5)
    ]
    gt_boxes = torch.cat([t["boxes"] for t in targets])

    def step():
        out = model(images, targets)
        dn = out["dn"]
        # padding slots masked arithmetically: boolean indexing would read the mask on the host
        valid = (dn.gt_index >= 0).unsqueeze(-1)
        err = (out["dn_boxes"] - gt_boxes[dn.gt_index.clamp_min(0)]).abs() * valid
        loss = err.mean() + out["logits"].sigmoid().mean()
        loss.backward()
        optimizer.step()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step()

    params = [p for p in model.parameters() if p.grad is not None]
    state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    saved = [t.detach().clone() for t in params + state]
    grads = []
    for _ in range(2):
        with torch.no_grad():
            for t, v in zip(params + state, saved, strict=True):
                t.copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(static_loss)
        grads.append([p.grad.clone() for p in params])
        assert any(not torch.equal(p, v) for p, v in zip(params, saved, strict=False))
    assert params and all(torch.isfinite(g).all() for g in grads[0])
    for x, y in zip(grads[0], grads[1], strict=True):
        assert_rel(y, x, torch.float32, "replayed gradients")
