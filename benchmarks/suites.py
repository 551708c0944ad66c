"""What gets benchmarked, for every entry point: per op, the cases and the implementations timed side by side.

``make bench`` (benchmarks.report), ``make bench-suite`` (benchmarks/test_bench.py) and ``make gpu-check``
(benchmarks.gpu_bench) all read ``SUITES``: the same cases give the same rows. A ``Target`` is the device and the
size of the run; each suite yields a ``Bench`` per case and variant, whose implementations are
- the baseline every ratio is taken against (the PyTorch reference, or what DN-DETR / DINO / torch users run),
- the peers: FlexAttention, SDPA with the dense mask, the SDPA decomposition, torch.compile of the reference, the
  published algorithms (originals/),
- dnops' kernels, one row per backend with a kernel of its own on the device kind (dnops._registry): "dnops cpu",
  "dnops cuda", "dnops triton"; an installation without one shows the row as skipped, with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import dnops
from benchmarks import cases
from benchmarks.harness import Impl
from dnops import _backend, _registry, reference


@dataclass(frozen=True)
class Target:
    """Where and how big: ``quick`` runs the small shapes (the smoke run of ``make test`` and the dry mode of the
    GPU check)."""

    device: torch.device
    quick: bool = False

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def sets(self) -> int:
        """Input sets the calls rotate among: on a GPU three, so that a call does not find its inputs in L2."""
        return 3 if self.gpu else 1


@dataclass
class Deferred:
    """An implementation that compiles first (torch.compile, FlexAttention): timed after every other one, so that
    its compile time cannot spend the budget of the rest of the run."""

    fn: Impl


@dataclass
class Bench:
    op: str
    case: str
    variant: str
    baseline: str  # the implementation every ratio of this bench is taken against
    impls: dict[str, Impl | Deferred | str] = field(default_factory=dict)  # a string: why it was skipped
    count_ops: bool = False  # also count the aten ops each implementation dispatches (kernel launches on a GPU)
    bytes_moved: int | None = None  # what the call must read and write at least (the memory bound)
    min_reps: int = 0  # calls of a second or more: the time budget alone would stop at the clock's 3 repetitions


def kernels_on(op: str, device: torch.device) -> list[str]:
    """The backends of ``op`` with a kernel of their own on ``device``'s kind in a full build: the compiled kernel
    of that kind, and Triton on a GPU (on the CPU it only runs in its interpreter, which is not timed)."""
    info = _registry.OPS[op]
    names = [device.type] if device.type in info.compiled else []
    return names + (["triton"] if info.triton and device.type == "cuda" else [])


def _missing(op: str, backend: str, device: torch.device) -> str | None:
    if _backend.available(op, device.type)[backend]:
        return None
    return f"skipped: no {backend} kernel of {op} on {device.type} in this installation"


def with_backend(name: str, fn: Callable[..., object]) -> Callable[..., object]:
    """A public dnops function run with DNOPS_BACKEND forced to ``name``, the environment restored afterwards."""

    def run(*args, **kw):
        with _backend.use_backend(name):
            return fn(*args, **kw)

    return run


def passes(fn: Callable[..., object], sets: list[list], variant: str) -> Impl:
    """``fn`` over input set i: the call alone, or (variant ending in "fwd+bwd") the call and the gradients of
    its output's sum with respect to every input that requires grad."""
    if not variant.endswith("fwd+bwd"):
        return lambda i: fn(*sets[i])
    wrt = [[t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] for inputs in sets]

    def run(i):
        out = fn(*sets[i])
        return torch.autograd.grad(out, wrt[i], torch.ones_like(out))

    return run


def amp_dtype(target: Target) -> torch.dtype:
    """The half type of torch.autocast's default on the target's device: float16 on a GPU, bfloat16 on the CPU."""
    return torch.float16 if target.gpu else torch.bfloat16


def under_autocast(fn: Callable[..., object], target: Target, amp: bool = True) -> Callable[..., object]:
    """``fn`` called under torch.autocast with the device's default half type, as in an AMP training step (the
    backward runs outside it, as there); ``fn`` itself when ``amp`` is false."""
    if not amp:
        return fn

    def run(*args, **kw):
        with torch.autocast(target.device.type, dtype=amp_dtype(target)):
            return fn(*args, **kw)

    return run


# ---- peers ------------------------------------------------------------------------------------------------------


def sdpa_dense_mask(case: cases.DNAttnCase, device: torch.device) -> Callable[..., torch.Tensor]:
    """torch's scaled_dot_product_attention with the dense (W, W) DN mask, what a DN-DETR / DINO decoder runs."""
    visible = ~reference.dn_attn_mask(case.pad_size, case.group_size, case.num_queries, device=device)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


def sdpa_decomposition(case: cases.DNAttnCase) -> Callable[..., torch.Tensor]:
    """The DN structure as two SDPA calls without a mask (dnops' "sdpa" backend, dnops.reference)."""
    return lambda q, k, v: reference.dn_self_attention_sdpa(q, k, v, case.pad_size, case.group_size)


def flex(case: cases.DNAttnCase, device: torch.device) -> Callable[..., torch.Tensor]:
    """FlexAttention with the DN structure as a block mask, compiled."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    pad, group = case.pad_size, max(case.group_size, 1)

    def visible(b, h, q_idx, kv_idx):
        return (kv_idx >= pad) | ((q_idx < pad) & (kv_idx < pad) & (q_idx // group == kv_idx // group))

    block_mask = create_block_mask(visible, None, None, case.width, case.width, device=str(device))
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


# ---- suites ------------------------------------------------------------------------------------------------------


def _msda_bytes(inputs: list[torch.Tensor], variant: str) -> int:
    value, _, _, loc, weights = inputs
    out = loc.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    v, lc, w = (t.numel() * t.element_size() for t in (value, loc, weights))
    # forward: read value, locations, weights, write out; backward: read grad_out and the inputs again, write
    # the three gradients
    return 3 * (v + lc + w) + 2 * out if variant.endswith("fwd+bwd") else v + lc + w + out


def _msda_precisions(target: Target, case: str, law: str) -> list[tuple[str, torch.dtype, torch.dtype | None]]:
    """(name, value dtype, geometry dtype under autocast or None) of a case: float32 and bfloat16 throughout, and
    for the realistic encoder and decoder shapes the AMP pair under autocast (value in the half type, locations
    and weights in float32, as an AMP model's projections and softmax give them)."""
    if law == "uniform":
        return [("float32", torch.float32, None)]
    precisions = [("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None)]
    if case in ("enc800", "dec", "tiny"):
        half = amp_dtype(target)
        precisions.append((f"autocast {str(half)[6:]}", half, torch.float32))
    return precisions


def ms_deform_attn_benches(target: Target) -> Iterator[Bench]:
    """Deformable-DETR's encoder and decoder shapes against the reference (grid_sample), also under autocast; on a
    GPU also torch.compile of the reference, at enc800 forward + backward only (its compile time)."""
    if target.quick:
        plan = [("tiny", "realistic")]
    else:
        plan = [("enc800", "realistic"), ("enc512", "realistic"), ("dec", "realistic"), ("enc800", "uniform")]
        if target.gpu:
            plan.insert(1, ("enc800-b4", "realistic"))
    for case_name, law in plan:
        for name, dtype, geometry in _msda_precisions(target, case_name, law):
            for p in ("fwd", "fwd+bwd"):
                variant = f"{law} {name} {p}"
                grad = p == "fwd+bwd"
                case = cases.MSDA_CASES[case_name]
                sets = [
                    cases.msda_inputs(case, law, dtype, target.device, grad, geometry_dtype=geometry)
                    for _ in range(target.sets)
                ]
                bench = Bench("ms_deform_attn", case_name, variant, "reference", bytes_moved=_msda_bytes(sets[0], p))
                amp = geometry is not None
                bench.impls["reference"] = passes(under_autocast(reference.ms_deform_attn, target, amp), sets, variant)
                if target.gpu and case_name == "enc800" and law == "realistic" and grad and geometry is None:
                    bench.impls["compile(reference)"] = Deferred(
                        passes(torch.compile(reference.ms_deform_attn), sets, variant)
                    )
                for b in kernels_on("ms_deform_attn", target.device):
                    fn = under_autocast(with_backend(b, dnops.ms_deform_attn), target, amp)
                    bench.impls[f"dnops {b}"] = _missing("ms_deform_attn", b, target.device) or passes(
                        fn, sets, variant
                    )
                yield bench


def _rt_bytes(inputs: list, variant: str) -> int:
    value, _, loc, weights, _ = inputs
    return _msda_bytes([value, None, None, loc, weights], variant)


def real_time_benches(target: Target) -> Iterator[Bench]:
    """The real-time DETRs' decoder cross-attention (point counts per level; bilinear, and RT-DETR v2's discrete
    sampling) against their own ``deformable_attention_core_func_v2`` (originals/), through dnops.compat.rtdetr:
    D-FINE-L at 640 px and a DEIM-nano-like decoder."""
    import originals
    from dnops.compat import rtdetr

    original = originals.deim_deformable_attention_core_func_v2
    names = ["rt-tiny"] if target.quick else ["dfine-l", "deim-nano"]
    half = amp_dtype(target)
    precisions = [("float32", torch.float32, None)] + ([("bfloat16", torch.bfloat16, None)] if target.gpu else [])
    for name in names:
        case = cases.RT_CASES[name]
        for method in ("default", "discrete"):
            # their training configs run AMP: D-FINE's decoder shape under autocast, the AMP pair as inputs
            amp = [(f"autocast {str(half)[6:]}", half, torch.float32)] if name in ("dfine-l", "rt-tiny") else []
            for precision, dtype, geometry in precisions + amp:
                for p in ("fwd", "fwd+bwd"):
                    variant = f"{'bilinear' if method == 'default' else method} {precision} {p}"
                    grad = p == "fwd+bwd"
                    sets = [
                        cases.rt_inputs(case, method, dtype, target.device, grad, geometry_dtype=geometry)
                        for _ in range(target.sets)
                    ]
                    bench = Bench("rt_detr_attn", name, variant, "original", bytes_moved=_rt_bytes(sets[0], p))
                    amp = geometry is not None
                    bench.impls["original"] = passes(
                        under_autocast(
                            lambda v, s, loc, w, pts, m=method: original(v, s, loc, w, pts, m, "reshape"), target, amp
                        ),
                        sets,
                        variant,
                    )
                    for b in kernels_on("ms_deform_attn", target.device):
                        fn = with_backend(b, rtdetr.deformable_attention_core_func_v2)
                        bench.impls[f"dnops {b}"] = _missing("ms_deform_attn", b, target.device) or passes(
                            under_autocast(
                                lambda v, s, loc, w, pts, f=fn, m=method: f(v, s, loc, w, pts, m), target, amp
                            ),
                            sets,
                            variant,
                        )
                    yield bench


def _targets(labels: torch.Tensor, boxes: torch.Tensor, counts: list[int]) -> list[dict[str, torch.Tensor]]:
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [{"labels": labels[s : s + c], "boxes": boxes[s : s + c]} for s, c in zip(starts, counts, strict=True)]


def _dn_queries_and_mask(
    generate: Callable[..., dnops.DNQueries], labels, boxes, counts, mode: str, num_queries: int
) -> tuple[dnops.DNQueries, torch.Tensor]:
    """The fused generation (DN-DETR's / DINO's default noise) by ``generate`` (dnops.dn_queries on some backend)
    and the attention mask of its layout, on the mask's default backend (dn_attn_mask has no Triton kernel)."""
    dn = generate(labels, boxes, counts, num_classes=91, mode=mode)
    return dn, dnops.dn_attn_mask(dn.pad_size, dn.group_size, num_queries, device=labels.device)


def dn_queries_benches(target: Target) -> Iterator[Bench]:
    """The published DN-DETR / DINO algorithms vs dnops, two ways: generation + mask (variant "gen+mask": the
    noised GT in the padded layout and the attention mask, what dnops.dn_queries replaces) and end to end
    (variants "dn" / "cdn": the query tensors, mask and index maps, what the adapters replace).

    DN: 5 groups, noise 0.2 / 0.4, 300 queries; CDN: dn_number 100, noise 0.5 / 1.0, 900 queries; 91 classes.
    dnops' attention takes the DN structure (pad_size, group_size) instead of a mask, so the fused op alone
    replaces generation + mask; "+ dn_attn_mask" adds the dense mask that nn.MultiheadAttention users need.
    """
    import originals
    from dnops.compat import dino, dn_detr, rtdetr

    device = target.device
    torch.manual_seed(0)
    hidden = 256
    enc_dn, enc_cdn = torch.nn.Embedding(92, hidden - 1).to(device), torch.nn.Embedding(92, hidden).to(device)
    anchors = torch.rand(300, 4, device=device)
    reference_gen_and_mask = with_backend("reference", _dn_queries_and_mask)
    for batch in (2, 8) if target.quick else (2, 8, 32):
        labels, boxes, counts = cases.dn_inputs(batch, device=device)
        targets = _targets(labels, boxes, counts)
        for mode, algorithm, queries in (("dn", "DN-DETR", 300), ("cdn", "DINO", 900)):
            if mode == "dn":
                args = ((targets, 5, 0.2, 0.4, 1), anchors, batch, True, queries, 91, hidden)
                original, adapter, enc = originals.dn_detr_prepare_for_dn, dn_detr.prepare_for_dn, enc_dn
            else:
                args = ((targets, 100, 0.5, 1.0), True, queries, 91, hidden)
                original, adapter, enc = originals.dino_prepare_for_cdn, dino.prepare_for_cdn, enc_cdn
            gen = (labels, boxes, counts, mode, queries)
            bench = Bench("dn_queries", f"B={batch}", f"{mode} gen+mask", f"{algorithm} gen+mask", count_ops=True)
            bench.impls[f"{algorithm} gen+mask"] = lambda i, f=original, a=args: f(*a, None)
            bench.impls["reference"] = lambda i, a=gen: reference_gen_and_mask(dnops.dn_queries, *a)
            end_to_end = Bench("dn_queries", f"B={batch}", mode, f"{algorithm} algorithm", count_ops=True)
            end_to_end.impls[f"{algorithm} algorithm"] = lambda i, f=original, a=args, e=enc: f(*a, e)
            for b in kernels_on("dn_queries", device):
                missing = _missing("dn_queries", b, device)
                forced = with_backend(b, dnops.dn_queries)
                bench.impls[f"dnops {b}"] = missing or (lambda i, f=forced, a=gen: f(*a[:3], num_classes=91, mode=a[3]))
                bench.impls[f"dnops {b} + dn_attn_mask"] = missing or (
                    lambda i, f=forced, a=gen: _dn_queries_and_mask(f, *a)
                )
                forced_adapter = with_backend(b, adapter)
                end_to_end.impls[f"dnops {b} {adapter.__name__}"] = missing or (
                    lambda i, f=forced_adapter, a=args, e=enc: f(*a, e)
                )
            yield bench
            yield end_to_end
        # RT-DETR v2's contrastive denoising group (num_denoising 100, noise 0.5 / 1.0, 300 queries, 80 classes)
        embed = torch.nn.Embedding(81, hidden, padding_idx=80).to(device)
        rt_labels = labels % 80
        rt_targets = _targets(rt_labels, boxes, counts)
        args = (rt_targets, 80, 300, embed, 100, 0.5, 1.0)
        bench = Bench("dn_queries", f"B={batch}", "rt-detr cdn group", "RT-DETR algorithm", count_ops=True)
        bench.impls["RT-DETR algorithm"] = lambda i, a=args: originals.rtdetr_get_contrastive_denoising_training_group(
            *a
        )
        for b in kernels_on("dn_queries", device):
            forced = with_backend(b, rtdetr.get_contrastive_denoising_training_group)
            bench.impls[f"dnops {b} get_contrastive_denoising_training_group"] = _missing("dn_queries", b, device) or (
                lambda i, f=forced, a=args: f(*a)
            )
        yield bench


def _times_flex(target: Target, case: str, p: str) -> bool:
    """FlexAttention's compile costs tens of seconds per shape: on a GPU forward + backward at the two larger cases,
    on the CPU forward only (it has no CPU backward), never in a quick run."""
    if target.quick:
        return False
    return case != "dn-detr" and p == "fwd+bwd" if target.gpu else p == "fwd"


def dn_self_attention_benches(target: Target) -> Iterator[Bench]:
    """Decoder self-attention under the DN structure against SDPA with the dense mask, the reference, the SDPA
    decomposition and FlexAttention (where ``_times_flex`` says)."""
    names = ["dn-detr"] if target.quick else list(cases.DN_ATTN_CASES)
    dtypes = (torch.float32, torch.bfloat16) if target.gpu else (torch.float32,)
    for name in names:
        case = cases.DN_ATTN_CASES[name]
        for dtype in dtypes:
            for p in ("fwd", "fwd+bwd"):
                variant = f"{str(dtype)[6:]} {p}"
                sets = [cases.dn_attn_inputs(case, dtype, target.device, p == "fwd+bwd") for _ in range(target.sets)]
                bench = Bench("dn_self_attention", name, variant, "sdpa+mask")
                bench.impls["sdpa+mask"] = passes(sdpa_dense_mask(case, target.device), sets, variant)
                bench.impls["reference"] = passes(
                    lambda q, k, v, c=case: reference.dn_self_attention(q, k, v, c.pad_size, c.group_size),
                    sets,
                    variant,
                )
                bench.impls["sdpa (two calls)"] = passes(sdpa_decomposition(case), sets, variant)
                for b in kernels_on("dn_self_attention", target.device):
                    fn = with_backend(b, dnops.dn_self_attention)
                    bench.impls[f"dnops {b}"] = _missing("dn_self_attention", b, target.device) or passes(
                        lambda q, k, v, fn=fn, c=case: fn(q, k, v, c.pad_size, c.group_size), sets, variant
                    )
                if _times_flex(target, name, p):
                    bench.impls["flex (compiled)"] = Deferred(passes(flex(case, target.device), sets, variant))
                yield bench


def dn_mha_benches(target: Target) -> Iterator[Bench]:
    """DNMultiheadAttention vs nn.MultiheadAttention with the dense DN mask, as DN-DETR and DINO call it."""
    from dnops.nn import DNMultiheadAttention

    names = ["dn-detr"] if target.quick else list(cases.DN_ATTN_CASES)
    for name in names:
        case = cases.DN_ATTN_CASES[name]
        embed = case.heads * case.head_dim
        torch.manual_seed(0)
        parent = torch.nn.MultiheadAttention(embed, case.heads).to(target.device).eval()
        ours = DNMultiheadAttention(embed, case.heads).to(target.device).eval()
        ours.load_state_dict(parent.state_dict())
        mask = reference.dn_attn_mask(case.pad_size, case.group_size, case.num_queries, device=target.device)
        for p in ("fwd", "fwd+bwd"):
            variant = f"float32 {p}"
            x = torch.randn(case.width, case.batch, embed, device=target.device, requires_grad=p == "fwd+bwd")
            sets = [[x]] * target.sets
            bench = Bench("dn_mha", name, variant, "nn.MHA+mask")
            # need_weights=True: nn.MultiheadAttention's default
            bench.impls["nn.MHA+mask"] = passes(lambda x, f=parent, m=mask: f(x, x, x, attn_mask=m)[0], sets, variant)
            bench.impls["DNMultiheadAttention"] = passes(
                lambda x, f=ours, m=mask: f(x, x, x, attn_mask=m)[0], sets, variant
            )
            yield bench


def dn_attn_mask_benches(target: Target) -> Iterator[Bench]:
    for name, case in cases.DN_ATTN_CASES.items():
        bench = Bench("dn_attn_mask", name, "build", "reference")
        args = (case.pad_size, case.group_size, case.num_queries)
        bench.impls["reference"] = lambda i, a=args: reference.dn_attn_mask(*a, device=target.device)
        for b in kernels_on("dn_attn_mask", target.device):
            fn = with_backend(b, dnops.dn_attn_mask)
            bench.impls[f"dnops {b}"] = _missing("dn_attn_mask", b, target.device) or (
                lambda i, f=fn, a=args: f(*a, device=target.device)
            )
        yield bench


def detr_step_benches(target: Target) -> Iterator[Bench]:
    """One training step of the thin DN-DETR (forward, losses, backward, gradient clipping, AdamW): --ops dnops
    vs --ops reference, from the same weights on the same batch.

    Shape: 512 x 512 input at batch 2 (on a GPU also 800 x 800 at batch 4), d_model 256, 6 encoder + 6 decoder
    layers, 300 queries, 5 DN groups, 20 GT per image, 91 classes (DN-Deformable-DETR's transformer).
    """
    from models.config import Config
    from models.criterion import Criterion
    from models.model import DNDETR

    if target.quick:
        tiny = Config(d_model=32, n_heads=4, enc_layers=1, dec_layers=1, ffn_dim=64, num_queries=20, image_size=64)
        tiny.backbone_width = 8
        plan = [("tiny", tiny, 2, 3)]
    else:
        full = dict(d_model=256, enc_layers=6, dec_layers=6, ffn_dim=1024, num_queries=300)
        plan = [("512px", Config(image_size=512, **full), 2, 20)]
        if target.gpu:
            plan.append(("800px", Config(image_size=800, **full), 4, 20))
    for name, cfg, batch, gt in plan:
        cfg.dn_groups, cfg.batch_size = 5, batch
        g = torch.Generator().manual_seed(0)
        images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(target.device)
        targets = []
        for _ in range(batch):
            centre, wh = torch.rand(gt, 2, generator=g) * 0.8 + 0.1, torch.rand(gt, 2, generator=g) * 0.15 + 0.02
            labels = torch.randint(0, 91, (gt,), generator=g)
            targets.append({"labels": labels.to(target.device), "boxes": torch.cat([centre, wh], 1).to(target.device)})
        bench = Bench("detr_step", name, f"B={batch} {cfg.enc_layers}+{cfg.dec_layers} layers fwd+bwd+opt", "reference")
        state = None
        for ops in ("reference", "dnops"):
            run_cfg = dataclasses.replace(cfg, ops=ops)
            torch.manual_seed(0)
            model = DNDETR(run_cfg, 91).to(target.device).train()
            state = state or model.state_dict()
            model.load_state_dict(state)
            criterion = Criterion(run_cfg, 91)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

            def step(i, model=model, criterion=criterion, optimizer=optimizer, images=images, targets=targets):
                loss, _ = criterion(model(images, targets), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                optimizer.step()

            bench.impls[ops] = step
        yield bench


def ultralytics_benches(target: Target) -> Iterator[Bench]:
    """ultralytics' RT-DETR routed by dnops.compat.use_dnops against the package's own (benchmarks.detectors)."""
    from benchmarks import detectors

    yield from detectors.installed("ultralytics", detectors.ultralytics_benches, target)


def rfdetr_benches(target: Target) -> Iterator[Bench]:
    """Roboflow's RF-DETR routed by dnops.compat.use_dnops against the package's own (benchmarks.detectors)."""
    from benchmarks import detectors

    yield from detectors.installed("rfdetr", detectors.rfdetr_benches, target)


def codebase_dn_benches(target: Target) -> Iterator[Bench]:
    """mmdetection's, detrex's and MaskDINO's denoising on dnops against their own code (benchmarks.codebases)."""
    from benchmarks import codebases

    yield from codebases.codebase_dn_benches(target)


SUITES: dict[str, Callable[[Target], Iterator[Bench]]] = {
    "ms_deform_attn": ms_deform_attn_benches,
    "rt_detr_attn": real_time_benches,
    "dn_queries": dn_queries_benches,
    "dn_self_attention": dn_self_attention_benches,
    "dn_mha": dn_mha_benches,
    "dn_attn_mask": dn_attn_mask_benches,
    "detr_step": detr_step_benches,
    "codebase_dn": codebase_dn_benches,
    "ultralytics": ultralytics_benches,
    "rfdetr": rfdetr_benches,
}

# What `make gpu-check` times: every suite but the pip-installed detectors', CPU packages that the lent GPU machine
# does not have (nothing can be installed there) and whose model builds would spend its time budget.
GPU_CHECK_SUITES = [op for op in SUITES if op not in ("ultralytics", "rfdetr")]
