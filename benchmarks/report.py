"""``python -m benchmarks.report``: every op's implementations timed side by side in one process.

Prints median time, ratio to the reference (reference time / implementation time, so > 1 is faster) and peak
tensor memory, and writes benchmarks/results/report.json and report.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.harness import median_ms, peak_bytes
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
            ref_ms = None
            for impl, fn in bench.impls.items():
                ms = median_ms(fn, device, budget_s=budget_s)
                peak = peak_bytes(fn, device)
                if impl == "reference":
                    ref_ms, ref_peak = ms, peak
                row = {
                    "op": op,
                    "case": bench.case,
                    "variant": bench.variant,
                    "impl": impl,
                    "median_ms": round(ms, 4),
                    "speedup_vs_reference": round(ref_ms / ms, 3) if ref_ms else None,
                    "peak_mb": round(peak / 2**20, 3),
                    "peak_vs_reference": round(peak / ref_peak, 4) if ref_peak else None,
                }
                rows.append(row)
                print(
                    f"{op:<18} {bench.case:<8} {bench.variant:<26} {impl:<10} {ms:>11.3f} ms "
                    f"{row['speedup_vs_reference'] or 0:>8.2f}x {row['peak_mb']:>10.2f} MB",
                    flush=True,
                )
    return rows


def table(rows: list[dict]) -> str:
    head = "| op | case | variant | impl | median ms | speed-up vs reference | peak MB | peak / reference |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['case']} | {r['variant']} | {r['impl']} | {r['median_ms']:.3f} | "
            f"{r['speedup_vs_reference']:.2f}x | {r['peak_mb']:.2f} | {r['peak_vs_reference']:.3f} |"
        )
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [r for r in rows if r["impl"] != "reference"]
    if not others:
        others = rows
    labels = [f"{r['op']} {r['case']} {r['variant']} [{r['impl']}]" for r in others]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(labels) + 1.5))
    ax.barh(range(len(labels)), [r["speedup_vs_reference"] for r in others], color="tab:blue")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up vs the PyTorch reference (log scale)")
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
