"""``python -m benchmarks.report``: every op's implementations timed side by side in one process.

Prints median time, speed-up against each case's baseline (baseline time / implementation time, so > 1 is
faster; the baseline is the PyTorch reference, or what DN-DETR / DINO run where the issue's bar names it) and
peak tensor memory, and writes benchmarks/results/report.json and report.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.harness import count_dispatched_ops, median_ms_interleaved, peak_bytes
from benchmarks.suites import SUITES

RESULTS = Path(__file__).resolve().parent / "results"


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


def run(ops: list[str], quick: bool, budget_s: float) -> list[dict]:
    rows = []
    device = torch.device("cpu")
    for op in ops:
        for bench in SUITES[op](quick=quick):
            times = median_ms_interleaved(bench.impls, device, budget_s=budget_s)
            measured = {impl: (times[impl], peak_bytes(fn, device)) for impl, fn in bench.impls.items()}
            base_ms, base_peak = measured[bench.baseline]
            for impl, (ms, peak) in measured.items():
                row = {
                    "op": op,
                    "case": bench.case,
                    "variant": bench.variant,
                    "impl": impl,
                    "baseline": bench.baseline,
                    "median_ms": round(ms, 4),
                    "speedup": round(base_ms / ms, 3),
                    "peak_mb": round(peak / 2**20, 3),
                    "peak_vs_baseline": round(peak / base_peak, 4) if base_peak else None,
                }
                if bench.count_ops:
                    row["ops"], row["sync_ops"] = count_dispatched_ops(bench.impls[impl])
                rows.append(row)
                ops = f"  {row['ops']} ops ({row['sync_ops']} sync)" if "ops" in row else ""
                print(
                    f"{op:<18} {bench.case:<8} {bench.variant:<26} {impl:<20} {ms:>11.3f} ms "
                    f"{row['speedup']:>8.2f}x vs {bench.baseline:<12} {row['peak_mb']:>10.2f} MB{ops}",
                    flush=True,
                )
    return rows


def table(rows: list[dict]) -> str:
    head = "| op | case | variant | impl | median ms | speed-up vs baseline | peak MB | peak / baseline | ops (sync) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        peak_ratio = "-" if r["peak_vs_baseline"] is None else f"{r['peak_vs_baseline']:.3f}"
        lines.append(
            f"| {r['op']} | {r['case']} | {r['variant']} | {r['impl']} | {r['median_ms']:.3f} | "
            f"{r['speedup']:.2f}x vs {r['baseline']} | {r['peak_mb']:.2f} | {peak_ratio} | "
            + (f"{r['ops']} ({r['sync_ops']}) |" if "ops" in r else "- |")
        )
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [r for r in rows if r["impl"] != r["baseline"]]
    if not others:
        others = rows
    labels = [f"{r['op']} {r['case']} {r['variant']} [{r['impl']}]" for r in others]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(labels) + 1.5))
    ax.barh(range(len(labels)), [r["speedup"] for r in others], color="tab:blue")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up vs the row's baseline (log scale)")
    ax.set_title(machine(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", nargs="*", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of repetitions per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    start = time.time()
    rows = run(args.ops, args.quick, args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(), "quick": args.quick, "seconds": round(time.time() - start, 1)}
    (args.out / "report.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    chart(rows, args.out / "report.png")
    print()
    print(table(rows))
    print(f"\nwrote {args.out / 'report.json'} and {args.out / 'report.png'} in {meta['seconds']} s")


if __name__ == "__main__":
    main()
