"""``python -m benchmarks.gpu_bench``: the GPU benchmark of ``make gpu-check``.

Every implementation is timed with CUDA events after warm-up, the median of ``--reps`` (>= 20) calls, rotating
among input sets so that repeated calls do not find their inputs in L2; peak memory is max_memory_allocated
above what was live before the call. ms_deform_attn rows carry the bytes the call must move, the achieved
GB/s and the time those bytes take at the copy bandwidth measured at the start (the memory bound).

Without a GPU (``--dry``, or no CUDA device) the same cases run on the CPU at tiny shapes with a wall clock, the
GPU-only implementations are reported as skipped, and the same files are written: the dry mode keeps the script
tested where no GPU is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import dnops
from benchmarks import cases
from benchmarks.harness import count_dispatched_ops, peak_bytes
from benchmarks.suites import _targets, _with_backend
from dnops import _backend, reference

Impl = Callable[[int], object]  # called with the index of the input set to use


@dataclasses.dataclass
class Deferred:
    """An implementation that compiles first (torch.compile, FlexAttention): timed after every other one, so that
    its compile time cannot spend the budget of the rest of the report."""

    fn: Impl


@dataclasses.dataclass
class Case:
    op: str
    case: str
    variant: str
    baseline: str
    impls: dict[str, Impl | Deferred | str]  # a string: why the implementation was skipped
    bytes_moved: int | None = None
    count_ops: bool = False


class Timer:
    def __init__(self, device: torch.device, reps: int, warmup: int) -> None:
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn: Impl, sets: int) -> float:
        for i in range(self.warmup):
            fn(i % sets)
        if self.device.type != "cuda":
            times = []
            for i in range(self.reps):
                t0 = time.perf_counter()
                fn(i % sets)
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.reps)
        ]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(i % sets)
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large copy (read + write) on ``device``, the memory ceiling of the bounds."""
    src = torch.randn(2**28 if device.type == "cuda" else 2**24, device=device)  # 1 GiB (64 MiB on the CPU)
    dst = torch.empty_like(src)
    ms = Timer(device, 20 if device.type == "cuda" else 5, 2)(lambda i: dst.copy_(src), 1)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=dtype)
    ms = Timer(device, 20 if device.type == "cuda" else 5, 2)(lambda i: a @ a, 1)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def _skip_reason(backend: str, op: str, device: torch.device) -> str | None:
    can = _backend.available(op, device.type)
    if device.type != "cuda":
        return "skipped: no CUDA device (dry mode)"
    if not can[backend]:
        return f"skipped: no {backend} kernel of {op} for cuda"
    return None


def _fwd_or_fwd_bwd(fn: Callable[..., torch.Tensor], sets: list[list], passes: str) -> Impl:
    if passes == "fwd":
        return lambda i: fn(*sets[i])

    def run(i):
        inputs = sets[i]
        out = fn(*inputs)
        return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], torch.ones_like(out))

    return run


def _msda_bytes(inputs: list[torch.Tensor], passes: str) -> int:
    value, _, _, loc, weights = inputs
    es = value.element_size()
    out = loc.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3] * es
    v, lc, w = value.numel() * es, loc.numel() * es, weights.numel() * es
    # forward: read value, locations, weights, write out; backward: read grad_out and the inputs again, write
    # the three gradients
    return v + lc + w + out if passes == "fwd" else 3 * (v + lc + w) + 2 * out


def msda_cases(device: torch.device, dry: bool, sets: int) -> Iterator[Case]:
    plan = [("tiny", 1)] if dry else [("enc800", 1), ("enc800", 4), ("enc512", 2), ("dec", 1)]
    dtypes = (torch.float32,) if dry else (torch.float32, torch.bfloat16)
    for case_name, n in plan:
        case = dataclasses.replace(cases.MSDA_CASES[case_name], n=n)
        for dtype in dtypes:
            for passes in ("fwd", "fwd+bwd"):
                grad = passes == "fwd+bwd"
                inputs = [cases.msda_inputs(case, "realistic", dtype, device, grad) for _ in range(sets)]
                impls: dict[str, Impl | str] = {"reference": _fwd_or_fwd_bwd(reference.ms_deform_attn, inputs, passes)}
                if device.type != "cuda":
                    impls["compile(reference)"] = "skipped: no CUDA device (dry mode)"
                elif case_name == "enc800" and n == 1 and grad:
                    compiled = torch.compile(reference.ms_deform_attn)
                    impls["compile(reference)"] = Deferred(_fwd_or_fwd_bwd(compiled, inputs, passes))
                else:
                    impls["compile(reference)"] = "skipped: timed at enc800 N=1 fwd+bwd only (compile time)"
                for name, backend in (("dnops cuda", "cuda"), ("dnops triton", "triton")):
                    why = _skip_reason(backend, "ms_deform_attn", device)
                    fn = _with_backend(backend, dnops.ms_deform_attn)
                    impls[name] = why or _fwd_or_fwd_bwd(fn, inputs, passes)
                yield Case(
                    "ms_deform_attn",
                    f"{case_name} N={n}",
                    f"{str(dtype)[6:]} {passes}",
                    "reference",
                    impls,
                    bytes_moved=_msda_bytes(inputs[0], passes),
                )


def _flex(case: cases.DNAttnCase, device: torch.device) -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    pad, group = case.pad_size, max(case.group_size, 1)

    def visible(b, h, q_idx, kv_idx):
        return (kv_idx >= pad) | ((q_idx < pad) & (kv_idx < pad) & (q_idx // group == kv_idx // group))

    block_mask = create_block_mask(visible, None, None, case.width, case.width, device=str(device))
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def dn_attention_cases(device: torch.device, dry: bool, sets: int) -> Iterator[Case]:
    from dnops.nn import DNMultiheadAttention

    plan = {"tiny": cases.DNAttnCase("tiny", 2, 3, 5, heads=2, head_dim=8)} if dry else cases.DN_ATTN_CASES
    dtypes = (torch.float32,) if dry else (torch.float32, torch.bfloat16)
    for name, case in plan.items():
        visible = ~reference.dn_attn_mask(case.pad_size, case.group_size, case.num_queries, device=device)
        for dtype in dtypes:
            for passes in ("fwd", "fwd+bwd"):
                grad = passes == "fwd+bwd"
                inputs = [cases.dn_attn_inputs(case, dtype, device, grad) for _ in range(sets)]
                impls: dict[str, Impl | str] = {
                    "sdpa+mask": _fwd_or_fwd_bwd(
                        lambda q, k, v, m=visible: F.scaled_dot_product_attention(q, k, v, attn_mask=m), inputs, passes
                    ),
                }
                if device.type != "cuda":
                    impls["flex (compiled)"] = "skipped: no CUDA device (dry mode)"
                elif name in ("dino", "big-dn") and grad:
                    impls["flex (compiled)"] = Deferred(_fwd_or_fwd_bwd(_flex(case, device), inputs, passes))
                else:
                    impls["flex (compiled)"] = "skipped: timed at dino and big-dn fwd+bwd only (compile time)"
                for impl, backend in (("dnops cuda", "cuda"), ("dnops triton", "triton"), ("dnops sdpa", "sdpa")):
                    why = _skip_reason(backend, "dn_self_attention", device)
                    fn = _with_backend(backend, dnops.dn_self_attention)
                    impls[impl] = why or _fwd_or_fwd_bwd(
                        lambda q, k, v, fn=fn, c=case: fn(q, k, v, c.pad_size, c.group_size), inputs, passes
                    )
                yield Case("dn_self_attention", name, f"{str(dtype)[6:]} {passes}", "sdpa+mask", impls)
        embed = case.heads * case.head_dim
        torch.manual_seed(0)
        parent = torch.nn.MultiheadAttention(embed, case.heads).to(device)
        ours = DNMultiheadAttention(embed, case.heads).to(device)
        ours.load_state_dict(parent.state_dict())
        mask = ~visible
        for passes in ("fwd", "fwd+bwd"):
            xs = [[torch.randn(case.width, case.batch, embed, device=device, requires_grad=passes == "fwd+bwd")]]
            xs *= sets
            impls = {
                "nn.MHA+mask": _fwd_or_fwd_bwd(lambda x, f=parent, m=mask: f(x, x, x, attn_mask=m)[0], xs, passes),
                "DNMultiheadAttention": _fwd_or_fwd_bwd(
                    lambda x, f=ours, m=mask: f(x, x, x, attn_mask=m)[0], xs, passes
                ),
            }
            yield Case("dn_mha", name, f"float32 {passes}", "nn.MHA+mask", impls)


def dn_queries_cases(device: torch.device, dry: bool, sets: int) -> Iterator[Case]:
    import originals

    for batch in (2,) if dry else (2, 8, 32):
        labels, boxes, counts = cases.dn_inputs(batch, device=device)
        targets = _targets(labels, boxes, counts)
        for mode, algorithm, queries in (("dn", "DN-DETR", 300), ("cdn", "DINO", 900)):
            if mode == "dn":
                args = ((targets, 5, 0.2, 0.4, 1), torch.rand(300, 4, device=device), batch, True, queries, 91, 256)
                original = originals.dn_detr_prepare_for_dn
            else:
                args = ((targets, 100, 0.5, 1.0), True, queries, 91, 256)
                original = originals.dino_prepare_for_cdn
            impls: dict[str, Impl | str] = {f"{algorithm} gen+mask": lambda i, f=original, a=args: f(*a, None)}
            for impl, backend in (("dnops cuda", "cuda"), ("dnops triton", "triton")):
                why = _skip_reason(backend, "dn_queries", device)
                fn = _with_backend(backend, dnops.dn_queries)
                gen = (labels, boxes, counts)
                impls[impl] = why or (lambda i, fn=fn, m=mode, a=gen: fn(*a, num_classes=91, mode=m))
            yield Case("dn_queries", f"B={batch}", f"{mode} gen+mask", f"{algorithm} gen+mask", impls, count_ops=True)


def detr_step_cases(device: torch.device, dry: bool, sets: int) -> Iterator[Case]:
    from models.config import Config
    from models.criterion import Criterion
    from models.model import DNDETR

    if dry:
        plan = [("tiny", Config(d_model=32, n_heads=4, enc_layers=1, dec_layers=1, ffn_dim=64, num_queries=20), 2, 3)]
        plan[0][1].backbone_width, plan[0][1].image_size = 8, 64
    else:
        full = dict(d_model=256, enc_layers=6, dec_layers=6, ffn_dim=1024, num_queries=300)
        plan = [("512px", Config(image_size=512, **full), 2, 20), ("800px", Config(image_size=800, **full), 4, 20)]
    for name, cfg, batch, gt in plan:
        cfg.dn_groups, cfg.batch_size = 5, batch
        g = torch.Generator().manual_seed(0)
        images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
        targets = []
        for _ in range(batch):
            centre, wh = torch.rand(gt, 2, generator=g) * 0.8 + 0.1, torch.rand(gt, 2, generator=g) * 0.15 + 0.02
            labels = torch.randint(0, 91, (gt,), generator=g)
            targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, wh], 1).to(device)})
        impls: dict[str, Impl | str] = {}
        state = None
        for ops in ("reference", "dnops"):
            run_cfg = dataclasses.replace(cfg, ops=ops)
            torch.manual_seed(0)
            model = DNDETR(run_cfg, 91).to(device).train()
            state = state or model.state_dict()
            model.load_state_dict(state)
            criterion = Criterion(run_cfg, 91)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

            def step(i, model=model, criterion=criterion, optimizer=optimizer, images=images, targets=targets):
                loss, _ = criterion(model(images, targets), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            impls[f"--ops {ops}"] = step
        yield Case("detr_step", name, f"B={batch} fwd+bwd+opt", "--ops reference", impls)


SECTIONS = {
    "ms_deform_attn": msda_cases,
    "dn_self_attention": dn_attention_cases,
    "dn_queries": dn_queries_cases,
    "detr_step": detr_step_cases,
}


def run(
    device: torch.device,
    dry: bool,
    reps: int,
    budget_s: float,
    sections: list[str],
    bandwidth: float,
    save: Callable[[list[dict]], None],
) -> list[dict]:
    """Times every case's implementations, the Deferred ones after all others; ``save`` gets the rows so far
    after each case, so a run stopped from outside still leaves its results."""
    timer = Timer(device, reps, warmup=3 if device.type == "cuda" else 1)
    sets = 3 if device.type == "cuda" else 1
    start = time.time()
    rows: list[dict] = []
    deferred: list[tuple[Case, dict[str, dict]]] = []

    def measure(case: Case, impl: str, fn: Impl, row: dict) -> None:
        if time.time() - start > budget_s:
            row["status"] = f"skipped: the bench's {budget_s:.0f} s budget was spent"
            return
        try:
            ms = timer(fn, sets)
            row.update(status="ok", median_ms=round(ms, 4))
            row["peak_mb"] = round(peak_bytes(lambda: fn(0), device) / 2**20, 2)
            if case.bytes_moved:
                row["bytes"] = case.bytes_moved
                row["GBps"] = round(case.bytes_moved / (ms * 1e-3) / 1e9, 1)
                row["bound_ms"] = round(case.bytes_moved / bandwidth * 1e3, 4)
            if case.count_ops:
                row["ops"], row["sync_ops"] = count_dispatched_ops(lambda: fn(0))
        except Exception as exc:  # a failing implementation is a result, not the end of the report
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def speedups(case_rows: dict[str, dict], baseline: str) -> None:
        base = case_rows[baseline].get("median_ms")
        for row in case_rows.values():
            if base and row.get("median_ms"):
                row["speedup"] = round(base / row["median_ms"], 3)

    for section in sections:
        for case in SECTIONS[section](device, dry, sets):
            case_rows: dict[str, dict] = {}
            for impl, fn in case.impls.items():
                row = {
                    "op": case.op,
                    "case": case.case,
                    "variant": case.variant,
                    "impl": impl,
                    "baseline": case.baseline,
                }
                case_rows[impl] = row
                rows.append(row)
                if isinstance(fn, str):
                    row["status"] = fn
                elif isinstance(fn, Deferred):
                    row["status"] = "pending"
                else:
                    measure(case, impl, fn, row)
                    print(_line(row), flush=True)
            speedups(case_rows, case.baseline)
            if any(isinstance(fn, Deferred) for fn in case.impls.values()):
                deferred.append((case, case_rows))
            save(rows)
    for case, case_rows in deferred:
        for impl, fn in case.impls.items():
            if isinstance(fn, Deferred):
                measure(case, impl, fn.fn, case_rows[impl])
                print(_line(case_rows[impl]), flush=True)
        speedups(case_rows, case.baseline)
        save(rows)
    return rows


def _line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['op']:<18} {r['case']:<12} {r['variant']:<20} {r['impl']:<20} {r['status']}"
    extra = f"  {r['GBps']:>8.1f} GB/s (bound {r['bound_ms']:.3f} ms)" if "GBps" in r else ""
    ops = f"  {r['ops']} ops ({r['sync_ops']} sync)" if "ops" in r else ""
    return (
        f"{r['op']:<18} {r['case']:<12} {r['variant']:<20} {r['impl']:<20} {r['median_ms']:>10.3f} ms "
        f"{r['peak_mb']:>10.1f} MB{extra}{ops}"
    )


def table(rows: list[dict]) -> str:
    head = "| op | case | variant | impl | median ms | speed-up vs baseline | GB/s (bound ms) | peak MB | ops (sync) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['case']} | {r['variant']} | {r['impl']} | {r['status']} | | | | |")
            continue
        speed = f"{r['speedup']:.2f}x vs {r['baseline']}" if "speedup" in r else "-"
        bw = f"{r['GBps']:.0f} ({r['bound_ms']:.3f})" if "GBps" in r else "-"
        ops = f"{r['ops']} ({r['sync_ops']})" if "ops" in r else "-"
        lines.append(
            f"| {r['op']} | {r['case']} | {r['variant']} | {r['impl']} | {r['median_ms']:.3f} | {speed} | {bw} | "
            f"{r['peak_mb']:.1f} | {ops} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes (also chosen without a CUDA device)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--budget", type=float, default=150.0, help="seconds; implementations after it are skipped")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    args = parser.parse_args(argv)
    dry = args.dry or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    reps = 3 if dry else max(args.reps, 20)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry mode)"
    bandwidth = copy_bandwidth(device)
    ceilings = {
        "copy_GBps": round(bandwidth / 1e9, 1),
        "matmul_fp32_TFLOPs": round(matmul_tflops(device, torch.float32), 1),
        "matmul_bf16_TFLOPs": round(matmul_tflops(device, torch.bfloat16), 1),
    }
    print(f"{name}, torch {torch.__version__}, measured ceilings: {ceilings}", flush=True)
    meta = {"device": name, "dry": dry, "torch": torch.__version__, "reps": reps, "ceilings": ceilings}
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def save(rows: list[dict]) -> None:
        meta["seconds"] = round(time.time() - start, 1)
        (args.out / "report.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        header = f"GPU report: {name}, torch {torch.__version__}, measured ceilings {ceilings}"
        (args.out / "report.md").write_text(f"{header}\n\n{table(rows)}\n")

    save(run(device, dry, reps, args.budget, args.sections, bandwidth, save))
    print(f"wrote {args.out / 'report.json'} and report.md in {meta['seconds']} s")


if __name__ == "__main__":
    main()
