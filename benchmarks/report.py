"""``python -m benchmarks.report``: every op's implementations timed side by side in one process.

Prints median time (with the min and max of its repetitions), speed-up against each case's baseline (baseline
time / implementation time, so > 1 is faster; the baseline is the PyTorch reference, or what DN-DETR / DINO run)
and peak tensor memory, and writes benchmarks/results/report.json and report.png.

``--publish`` also copies both to docs/results/ and rewrites the generated blocks of README.md and
docs/benchmarks.md from them; ``--render`` rewrites those blocks from the published files without measuring.
A test holds the blocks equal to what the published files render, so a published number changes only here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import time
from pathlib import Path

import torch

from benchmarks import runner
from benchmarks.harness import WallClock, copy_bandwidth
from benchmarks.suites import SUITES, Target

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PUBLISHED = ROOT / "docs" / "results"
GPU_RESULTS = RESULTS / "gpu"
ABLATION = ROOT / "models" / "experiments" / "dn_ablation.json"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def run(ops: list[str], quick: bool, budget_s: float) -> tuple[list[dict], float]:
    """The rows of ``ops``' benches on the CPU, and the copy bandwidth their memory bounds are taken at."""
    target = Target(torch.device("cpu"), quick)
    bandwidth = copy_bandwidth(target.device)
    benches = (bench for op in ops for bench in SUITES[op](target))
    return runner.run(benches, target, WallClock(budget_s), bandwidth), bandwidth


def table(rows: list[dict]) -> str:
    head = (
        "| op | case | variant | impl | median ms (min-max) | speed-up vs baseline | peak MB | peak / baseline | "
        "ops (sync) |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['case']} | {r['variant']} | {r['impl']} | {r['status']} | | | | |")
            continue
        peak_ratio = "-" if r["peak_vs_baseline"] is None else f"{r['peak_vs_baseline']:.3f}"
        lines.append(
            f"| {r['op']} | {r['case']} | {r['variant']} | {r['impl']} | {r['median_ms']:.3f}"
            + (f" ({r['min_ms']:.3f}-{r['max_ms']:.3f})" if "min_ms" in r else "")
            + " | "
            f"{r['speedup']:.2f}x vs {r['baseline']} | {r['peak_mb']:.2f} | {peak_ratio} | "
            + (f"{r['ops']} ({r['sync_ops']}) |" if "ops" in r else "- |")
        )
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    others = [r for r in ok if is_dnops(r)] or ok

    def label(r: dict) -> str:
        # the backend, and what else the row runs ("+ dn_attn_mask", "prepare_for_dn")
        impl = "" if r["impl"] == "DNMultiheadAttention" else r["impl"].removeprefix("dnops").strip()
        return f"{r['op']} {r['case']} {r['variant']}" + (f" [{impl}]" if impl else "")

    labels = [label(r) for r in others]
    colours = {op: f"C{i}" for i, op in enumerate(dict.fromkeys(r["op"] for r in others))}
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(labels) + 1.5))
    ax.barh(range(len(labels)), [r["speedup"] for r in others], color=[colours[r["op"]] for r in others])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up vs the row's baseline (log scale)")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def is_dnops(row: dict) -> bool:
    """The rows of dnops' own implementations (the others are baselines and other libraries' paths)."""
    return row["impl"].startswith("dnops") or row["impl"] == "DNMultiheadAttention"


def _ms(value: float) -> str:
    """Milliseconds with 3 significant digits at most, never in exponent form."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _pass(variant: str) -> tuple[str, str]:
    """(column, variant without its pass): forward-only cases and single calls go to the first column, backward
    and whole training steps to the second."""
    if variant.endswith(" fwd+bwd"):
        return "bwd", variant.removesuffix(" fwd+bwd")
    if variant.endswith(" fwd"):
        return "fwd", variant.removesuffix(" fwd")
    return ("bwd" if "bwd" in variant else "fwd"), variant


def _batch(case: str) -> int | None:
    """B of a case named "B=<B> ...", else None."""
    match = re.match(r"B=(\d+)", case)
    return int(match.group(1)) if match else None


def summary_table(rows: list[dict]) -> str:
    """One line per dnops implementation and case, forward and forward + backward side by side: the speed-up
    against the baseline, dnops' median time (min-max of the repetitions) and the peak memory against the
    baseline's. Building the dense mask (dn_attn_mask, and dn_queries + dn_attn_mask) is left to the full table, and
    so are the smaller batches of the single calls timed at several (the query generators): the summary shows each
    at its largest batch."""
    largest: dict[tuple, int] = {}
    for r in rows:
        if _batch(r["case"]) is not None and _pass(r["variant"])[0] == "fwd":
            key = (r["op"], r["variant"], r["impl"])
            largest[key] = max(largest.get(key, 0), _batch(r["case"]))
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["status"] != "ok" or not is_dnops(r) or r["op"] == "dn_attn_mask" or "dn_attn_mask" in r["impl"]:
            continue
        if _batch(r["case"]) is not None and _batch(r["case"]) < largest.get((r["op"], r["variant"], r["impl"]), 0):
            continue
        column, variant = _pass(r["variant"])
        groups.setdefault((r["op"], r["case"], variant, r["baseline"], r["impl"]), {})[column] = r
    lines = [
        "| op | case | variant | baseline | dnops | forward (or call) | forward + backward | peak mem vs baseline |",
        "|" + "---|" * 8,
    ]
    for (op, case, variant, baseline, impl), passes in groups.items():
        cells, peaks = [], []
        for column in ("fwd", "bwd"):
            r = passes.get(column)
            if r is None:
                cells.append("-")
                continue
            cells.append(f"**{r['speedup']:.2f}x** {_ms(r['median_ms'])} ms ({_ms(r['min_ms'])}-{_ms(r['max_ms'])})")
            peaks.append("-" if r["peak_vs_baseline"] is None else f"{r['peak_vs_baseline']:.0%}")
        lines.append(f"| {op} | {case} | {variant} | {baseline} | {impl} | {' | '.join(cells)} | {' / '.join(peaks)} |")
    return "\n".join(lines)


def _latest_gpu_report() -> Path | None:
    reports = sorted(GPU_RESULTS.glob("*/report.json"))
    return reports[-1] if reports else None


def gpu_block() -> str:
    """The GPU table of the latest committed ``make gpu-check`` result, or a line saying there is none."""
    path = _latest_gpu_report()
    if path is None:
        return (
            "No `make gpu-check` result is published yet: the GPU kernels are compiled and CPU-tested (Triton in "
            "its interpreter), and have not been timed on a GPU."
        )
    from benchmarks.gpu_bench import table as gpu_table

    report = json.loads(path.read_text())
    meta = report["meta"]
    where = path.parent.relative_to(ROOT)
    return f"{meta['device']}, torch {meta['torch']} (`{where}`):\n\n{gpu_table(report['rows'])}"


def gpu_status() -> str:
    """The README's one-paragraph statement of which GPU paths have run on a GPU, from the latest GPU result."""
    path = _latest_gpu_report()
    if path is None:
        return (
            "**GPU status: no dnops kernel has run on a GPU yet.** The CUDA kernels are compiled (sm_80, sm_90) and "
            "registered on every build, and CI executes the unmodified .cu files on the CPU in a CUDA emulator, under "
            "AddressSanitizer too, against the reference (docs/testing.md); the Triton kernels are tested against the "
            "reference in Triton's interpreter. `make gpu-check` runs the GPU test suite and benchmark in one command "
            "on a GPU machine."
        )
    report = json.loads(path.read_text())
    meta = report["meta"]
    ran = sorted({f"{r['op']} ({r['impl']})" for r in report["rows"] if r["status"] == "ok"})
    return (
        f"**GPU status: run on {meta['device']}** (torch {meta['torch']}, `{path.parent.name}`): "
        f"{', '.join(ran)}; its tests and timings are in the performance section."
    )


def ablation_table(path: Path = ABLATION) -> str:
    """The DN ablation's table (val COCO AP, mean of the seeds, each seed in brackets) from its json."""
    result = json.loads(path.read_text())
    runs, summary, cfg = result["runs"], result["summary"], result["config"]
    epochs = runs["dn"]["epoch"]
    last = len(epochs) - 1
    # epoch 2, a quarter and half of the schedule, the last epoch before the learning-rate drop, the final one
    picks = sorted({i for i in (1, last // 4, last // 2, cfg["lr_drop"] - 1) if 0 < i < last} | {last})
    head = " | ".join(f"AP epoch {epochs[i]}" for i in picks)
    drop = f", the learning rate divided by 10 from epoch {cfg['lr_drop'] + 1}" if cfg["lr_drop"] else ""
    lines = [
        f"Model width {cfg['d_model']} ({cfg['enc_layers']} encoder, {cfg['dec_layers']} decoder layers),"
        f" {cfg['image_size']}-pixel images, {len(summary['seeds'])} seeds per arm, {epochs[last]} epochs on"
        f" {cfg['num_train']} generated images{drop}; {cfg['num_val']} val images.",
        "",
        f"| arm | {head} | mean IS, epochs 2-{epochs[last]} |",
        "|" + "---|" * (len(picks) + 2),
    ]
    for name, arm in runs.items():
        cells = [f"{arm['AP'][i]:.3f}" for i in picks[:-1]]
        seeds = ", ".join(f"{ap:.3f}" for ap in summary["final_AP_per_seed"][name])
        cells.append(f"{arm['AP'][last]:.3f} ({seeds})")
        lines.append(f"| {name} | {' | '.join(cells)} | {summary['mean_IS'][name]:.3f} |")
    return "\n".join(lines)


def _verdict(reproduced: bool) -> str:
    return "reproduced" if reproduced else "not reproduced at this scale"


def _seeds(values: list, fmt: str = ".3f") -> str:
    return ", ".join("never" if v is None else format(v, fmt) for v in values)


def ablation_claims(path: Path = ABLATION) -> str:
    """One line per claim of the ablation's json (its summary's verdicts and their measured evidence)."""
    summary = json.loads(path.read_text())["summary"]
    claims, final, epochs = summary["claims"], summary["final_AP"], summary["epochs"]
    a, b, c, d = (claims[k] for k in ("a_convergence", "b_matching_stability", "c_mask", "d_cdn"))
    gain = summary["no_dn_AP_gain_last_three_epochs"]

    def reach(arm: str) -> str:
        at = a[arm]["epoch_reaching_no_dn_final_AP"]
        when = f"at epoch {at} of {epochs}" if at is not None else f"in none of the {epochs} epochs"
        return f"{when} (seeds: {_seeds(a[arm]['per_seed'], 'd')})"

    def gap(arm: str) -> str:
        g = [x for x in a[arm]["AP_gap_per_epoch"] if x is not None]
        return f"{sum(g) / len(g):+.3f} AP on average over the epochs (from {min(g):+.3f} to {max(g):+.3f})"

    mass = " / ".join(f"{100 * m:.0f}%" for m in c["attention_on_dn_per_layer"])
    share = d["duplicate_share"]
    lines = [
        f"No DN gains {gain:+.4f} AP over its last three epochs"
        f" ({'converged' if summary['no_dn_converged'] else 'not converged'} by the 0.005 rule).",
        f"- **(a) convergence: {_verdict(a['dn']['reproduced'])}.** DN reaches no DN's final AP ({final['no_dn']:.3f})"
        f" {reach('dn')}, CDN {reach('cdn')}; at equal epochs DN leads no DN by {gap('dn')}, CDN by {gap('cdn')}.",
        f"- **(b) matching stability: {_verdict(b['reproduced'])}.** Mean IS DN {b['mean_IS']['dn']:.3f}, no DN"
        f" {b['mean_IS']['no_dn']:.3f}, CDN {b['mean_IS']['cdn']:.3f} (per seed, DN"
        f" {_seeds(b['mean_IS_per_seed']['dn'])}; no DN {_seeds(b['mean_IS_per_seed']['no_dn'])}).",
        f"- **(c) the mask: {_verdict(c['reproduced'])}.** Trained without it and evaluated as trained (no DN queries"
        f" at inference), final AP {final['no_dn_mask']:.3f} against DN's {final['dn']:.3f} (drop per seed"
        f" {_seeds(c['AP_drop_per_seed'])}), {'below' if c['below_no_dn'] else 'above'} no DN's {final['no_dn']:.3f}."
        f" In training its matching queries put {mass} (decoder layers 1-{len(c['attention_on_dn_per_layer'])}) of"
        f" their self-attention on the DN queries, against {100 * c['attention_on_dn_uniform']:.0f}% if attention were"
        " uniform: they read the noised ground truth, which inference does not have.",
        f"- **(d) CDN vs DN: AP {_verdict(d['AP_reproduced'])}, duplicates {_verdict(d['duplicates_reproduced'])}.**"
        f" Final AP CDN {final['cdn']:.3f}, DN {final['dn']:.3f} (per seed {_seeds(d['AP_gain_per_seed'], '+.3f')});"
        f" GT with two or more predictions of its class scoring above {d['duplicates_score_threshold']} at IoU above"
        f" {d['duplicates_iou_threshold']}: CDN {100 * share['cdn']:.2f}%, DN {100 * share['dn']:.2f}%, no DN"
        f" {100 * share['no_dn']:.2f}%.",
    ]
    return "\n".join(lines)


def blocks(published: Path = PUBLISHED) -> dict[str, str]:
    """Every generated block of README.md and docs/benchmarks.md, rendered from the published files."""
    report = json.loads((published / "report.json").read_text())
    meta = report["meta"]
    cpu_head = f"Measured by `make bench` on {meta['machine']}, float32 unless stated."
    return {
        "cpu": f"{cpu_head}\n\n{summary_table(report['rows'])}",
        "cpu-full": f"{cpu_head}\n\n{table(report['rows'])}",
        "gpu": gpu_block(),
        "gpu-status": gpu_status(),
        "ablation": ablation_table(),
        "ablation-claims": ablation_claims(),
    }


def rewrite(text: str, rendered: dict[str, str]) -> str:
    """``text`` with each ``<!-- begin NAME -->`` ... ``<!-- end NAME -->`` block replaced by ``rendered[NAME]``."""

    def fill(match: re.Match) -> str:
        name = match.group(1)
        return f"<!-- begin {name} -->\n{rendered[name]}\n<!-- end {name} -->"

    return re.sub(r"<!-- begin ([\w-]+) -->\n.*?<!-- end \1 -->", fill, text, flags=re.S)


DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "benchmarks.md")


def render_documents() -> None:
    """Rewrites the generated blocks of the documents, and redraws the published chart, from docs/results/."""
    report = json.loads((PUBLISHED / "report.json").read_text())
    chart(report["rows"], PUBLISHED / "report.png", report["meta"]["machine"])
    rendered = blocks()
    for doc in DOCUMENTS:
        doc.write_text(rewrite(doc.read_text(), rendered))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", nargs="*", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of repetitions per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--publish", action="store_true", help="copy to docs/results/, rewrite README / docs")
    parser.add_argument("--render", action="store_true", help="only rewrite README / docs from docs/results/")
    args = parser.parse_args()
    if args.render:
        render_documents()
        return
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    start = time.time()
    rows, bandwidth = run(args.ops, args.quick, args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "quick": args.quick, "seconds": round(time.time() - start, 1)}
    meta["copy_GBps"] = round(bandwidth / 1e9, 1)
    (args.out / "report.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    chart(rows, args.out / "report.png", meta["machine"])
    print()
    print(table(rows))
    print(f"\nwrote {args.out / 'report.json'} and {args.out / 'report.png'} in {meta['seconds']} s")
    if args.publish:
        PUBLISHED.mkdir(parents=True, exist_ok=True)
        for name in ("report.json", "report.png"):
            shutil.copyfile(args.out / name, PUBLISHED / name)
        render_documents()
        print(f"published to {PUBLISHED} and rewrote {', '.join(str(d.relative_to(ROOT)) for d in DOCUMENTS)}")


if __name__ == "__main__":
    main()
