"""What gets benchmarked: per op, the cases and the implementations timed side by side.

Each ``Bench`` holds implementations as zero-argument callables over fixed inputs; "reference" is the
baseline every ratio is taken against. An implementation appears only if it can run here (no kernel, no row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import dnops
from benchmarks import cases
from dnops import _backend, reference


@dataclass
class Bench:
    op: str
    case: str
    variant: str
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)
    baseline: str = "reference"  # the implementation every ratio of this bench is taken against
    count_ops: bool = False  # also count the aten ops each implementation dispatches (kernel launches on a GPU)


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    grad_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        out = fn(*inputs)
        return torch.autograd.grad(out, grad_inputs, torch.ones_like(out))

    return run


def _with_backend(name: str, fn: Callable[..., object]) -> Callable[..., object]:
    """Run a public dnops function with DNOPS_BACKEND forced, restoring the environment afterwards."""

    def run(*args, **kw):
        with _backend.use_backend(name):
            return fn(*args, **kw)

    return run


def ms_deform_attn_benches(quick: bool = False) -> Iterator[Bench]:
    plan = [("enc800", "realistic"), ("enc512", "realistic"), ("dec", "realistic"), ("enc800", "uniform")]
    if quick:
        plan = [("tiny", "realistic"), ("enc512", "realistic")]
    for case_name, law in plan:
        for dtype in (torch.float32, torch.bfloat16):
            if law == "uniform" and dtype != torch.float32:
                continue
            for passes in ("fwd", "fwd+bwd"):
                inputs = cases.msda_inputs(cases.MSDA_CASES[case_name], law, dtype, requires_grad=passes == "fwd+bwd")
                impls: dict[str, Callable[..., torch.Tensor]] = {"reference": reference.ms_deform_attn}
                if _backend.has_kernel("ms_deform_attn", "cpu"):
                    impls["dnops"] = _with_backend("cpu", dnops.ms_deform_attn)
                bench = Bench("ms_deform_attn", case_name, f"{law} {str(dtype)[6:]} {passes}")
                for name, fn in impls.items():
                    bench.impls[name] = (
                        _fwd_bwd(fn, inputs) if passes == "fwd+bwd" else (lambda fn=fn, i=inputs: fn(*i))
                    )
                yield bench


def _targets(labels: torch.Tensor, boxes: torch.Tensor, counts: list[int]) -> list[dict[str, torch.Tensor]]:
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [{"labels": labels[s : s + c], "boxes": boxes[s : s + c]} for s, c in zip(starts, counts, strict=True)]


def dn_queries_benches(quick: bool = False) -> Iterator[Bench]:
    """The published DN-DETR / DINO algorithms vs dnops, two ways: generation + mask (variant "gen+mask": the
    noised GT in the padded layout and the attention mask, what dnops.dn_queries replaces) and end to end
    (variants "dn" / "cdn": the query tensors, mask and index maps, what the adapters replace).

    DN: 5 groups, noise 0.2 / 0.4, 300 queries; CDN: dn_number 100, noise 0.5 / 1.0, 900 queries; 91 classes.
    """
    import originals
    from dnops.compat import dino, dn_detr

    torch.manual_seed(0)
    hidden = 256
    enc_dn, enc_cdn = torch.nn.Embedding(92, hidden - 1), torch.nn.Embedding(92, hidden)
    anchors = torch.rand(300, 4)
    fused = _backend.has_kernel("dn_queries", "cpu")
    for batch in (2, 8) if quick else (2, 8, 32):
        labels, boxes, counts = cases.dn_inputs(batch)
        targets = _targets(labels, boxes, counts)
        for mode, algorithm, queries in (("dn", "DN-DETR", 300), ("cdn", "DINO", 900)):
            if mode == "dn":
                args = ((targets, 5, 0.2, 0.4, 1), anchors, batch, True, queries, 91, hidden)
                original, adapter, enc = originals.dn_detr_prepare_for_dn, dn_detr.prepare_for_dn, enc_dn
            else:
                args = ((targets, 100, 0.5, 1.0), True, queries, 91, hidden)
                original, adapter, enc = originals.dino_prepare_for_cdn, dino.prepare_for_cdn, enc_cdn
            bench = Bench(
                "dn_queries", f"B={batch}", f"{mode} gen+mask", baseline=f"{algorithm} gen+mask", count_ops=True
            )
            bench.impls[f"{algorithm} gen+mask"] = lambda f=original, a=args: f(*a, None)
            gen = (labels, boxes, counts, mode, queries)
            bench.impls["reference"] = lambda a=gen: _with_backend("reference", _dn_queries_and_mask)(*a)
            if fused:
                # dnops' attention takes the DN structure (pad_size, group_size) instead of a mask, so the fused
                # op alone replaces generation + mask; the dense mask is for nn.MultiheadAttention users
                bench.impls["dnops.dn_queries"] = lambda a=gen: dnops.dn_queries(*a[:3], num_classes=91, mode=a[3])
                bench.impls["dnops.dn_queries + dn_attn_mask"] = lambda a=gen: _dn_queries_and_mask(*a)
            yield bench
            bench = Bench("dn_queries", f"B={batch}", mode, baseline=f"{algorithm} algorithm", count_ops=True)
            bench.impls[f"{algorithm} algorithm"] = lambda f=original, a=args, e=enc: f(*a, e)
            if fused:
                bench.impls[f"dnops {adapter.__name__}"] = lambda f=adapter, a=args, e=enc: f(*a, e)
            yield bench


def _dn_queries_and_mask(labels, boxes, counts, mode: str, num_queries: int) -> tuple[dnops.DNQueries, torch.Tensor]:
    """The fused generation (DN-DETR's / DINO's default noise) and the attention mask of its layout."""
    dn = dnops.dn_queries(labels, boxes, counts, num_classes=91, mode=mode)
    return dn, dnops.dn_attn_mask(dn.pad_size, dn.group_size, num_queries)


def _sdpa_dense_mask(case: cases.DNAttnCase) -> Callable[..., torch.Tensor]:
    visible = ~reference.dn_attn_mask(case.pad_size, case.group_size, case.num_queries)

    def run(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)

    return run


def _flex(case: cases.DNAttnCase) -> Callable[..., torch.Tensor]:
    """FlexAttention with the DN structure as a block mask, compiled (forward only: no CPU backward)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    pad, group = case.pad_size, max(case.group_size, 1)

    def visible(b, h, q_idx, kv_idx):
        return (kv_idx >= pad) | ((q_idx < pad) & (kv_idx < pad) & (q_idx // group == kv_idx // group))

    block_mask = create_block_mask(visible, None, None, case.width, case.width, device="cpu")
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def dn_self_attention_benches(quick: bool = False) -> Iterator[Bench]:
    names = ["dn-detr"] if quick else list(cases.DN_ATTN_CASES)
    for name in names:
        case = cases.DN_ATTN_CASES[name]
        for passes in ("fwd", "fwd+bwd"):
            inputs = cases.dn_attn_inputs(case, requires_grad=passes == "fwd+bwd")
            impls: dict[str, Callable[..., torch.Tensor]] = {
                "sdpa+mask": _sdpa_dense_mask(case),
                "reference": lambda q, k, v, c=case: reference.dn_self_attention(q, k, v, c.pad_size, c.group_size),
                "sdpa (two calls)": lambda q, k, v, c=case: reference.dn_self_attention_sdpa(
                    q, k, v, c.pad_size, c.group_size
                ),
            }
            if _backend.has_kernel("dn_self_attention", "cpu"):
                impls["dnops"] = lambda q, k, v, c=case: _with_backend("cpu", dnops.dn_self_attention)(
                    q, k, v, c.pad_size, c.group_size
                )
            if passes == "fwd" and not quick:
                impls["flex (compiled)"] = _flex(case)
            bench = Bench("dn_self_attention", name, f"float32 {passes}", baseline="sdpa+mask")
            for impl, fn in impls.items():
                bench.impls[impl] = _fwd_bwd(fn, inputs) if passes == "fwd+bwd" else (lambda fn=fn, i=inputs: fn(*i))
            yield bench


def dn_mha_benches(quick: bool = False) -> Iterator[Bench]:
    """DNMultiheadAttention vs nn.MultiheadAttention with the dense DN mask, as DN-DETR and DINO call it."""
    from dnops.nn import DNMultiheadAttention

    names = ["dn-detr"] if quick else list(cases.DN_ATTN_CASES)
    for name in names:
        case = cases.DN_ATTN_CASES[name]
        embed = case.heads * case.head_dim
        torch.manual_seed(0)
        parent = torch.nn.MultiheadAttention(embed, case.heads).eval()
        ours = DNMultiheadAttention(embed, case.heads).eval()
        ours.load_state_dict(parent.state_dict())
        mask = reference.dn_attn_mask(case.pad_size, case.group_size, case.num_queries)
        for passes in ("fwd", "fwd+bwd"):
            x = torch.randn(case.width, case.batch, embed, requires_grad=passes == "fwd+bwd")

            def original(x, parent=parent, mask=mask):
                return parent(x, x, x, attn_mask=mask)[0]  # need_weights=True: nn.MultiheadAttention's default

            def drop_in(x, ours=ours, mask=mask):
                return ours(x, x, x, attn_mask=mask)[0]

            bench = Bench("dn_mha", name, f"float32 {passes}", baseline="nn.MHA+mask")
            for impl, fn in (("nn.MHA+mask", original), ("DNMultiheadAttention", drop_in)):
                bench.impls[impl] = _fwd_bwd(fn, [x]) if passes == "fwd+bwd" else (lambda fn=fn, x=x: fn(x))
            yield bench


def dn_attn_mask_benches(quick: bool = False) -> Iterator[Bench]:
    for name, case in cases.DN_ATTN_CASES.items():
        bench = Bench("dn_attn_mask", name, "build")
        args = (case.pad_size, case.group_size, case.num_queries)
        bench.impls["reference"] = lambda a=args: reference.dn_attn_mask(*a)
        if _backend.has_kernel("dn_attn_mask", "cpu"):
            bench.impls["dnops"] = lambda a=args: torch.ops.dnops.dn_attn_mask(*a)
        yield bench


def detr_step_benches(quick: bool = False) -> Iterator[Bench]:
    """One training step of the thin DN-DETR (forward, losses, backward, AdamW): --ops dnops vs --ops reference.

    Shape: batch 2, 512 x 512 input, d_model 256, 6 encoder + 6 decoder layers, 300 queries, 5 DN groups,
    20 GT per image, 91 classes (DN-Deformable-DETR's transformer on a small input). Both models start from the
    same weights and step on the same batch.
    """
    from models.config import Config
    from models.criterion import Criterion
    from models.model import DNDETR

    if quick:
        cfg = Config(d_model=32, n_heads=4, enc_layers=1, dec_layers=1, ffn_dim=64, num_queries=20, image_size=64)
        cfg.backbone_width, gt = 8, 3
    else:
        cfg = Config(d_model=256, enc_layers=6, dec_layers=6, ffn_dim=1024, num_queries=300, image_size=512)
        gt = 20
    cfg.dn_groups, cfg.batch_size = 5, 2
    g = torch.Generator().manual_seed(0)
    images = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=g)
    targets = []
    for _ in range(cfg.batch_size):
        centre, wh = torch.rand(gt, 2, generator=g) * 0.8 + 0.1, torch.rand(gt, 2, generator=g) * 0.15 + 0.02
        targets.append({"labels": torch.randint(0, 91, (gt,), generator=g), "boxes": torch.cat([centre, wh], 1)})
    name = "tiny" if quick else "512px"
    bench = Bench("detr_step", name, f"B=2 {cfg.enc_layers}+{cfg.dec_layers} layers fwd+bwd+opt")
    state = None
    for ops in ("reference", "dnops") if _backend.has_kernel("ms_deform_attn", "cpu") else ("reference",):
        run_cfg = dataclasses.replace(cfg, ops=ops)
        torch.manual_seed(0)
        model = DNDETR(run_cfg, 91).train()
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        criterion = Criterion(run_cfg, 91)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

        def step(model=model, criterion=criterion, optimizer=optimizer):
            loss, _ = criterion(model(images, targets), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()

        bench.impls[ops] = step
    yield bench


SUITES = {
    "ms_deform_attn": ms_deform_attn_benches,
    "dn_queries": dn_queries_benches,
    "dn_self_attention": dn_self_attention_benches,
    "dn_mha": dn_mha_benches,
    "dn_attn_mask": dn_attn_mask_benches,
    "detr_step": detr_step_benches,
}
