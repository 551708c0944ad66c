"""``python -m benchmarks.gpu_bench``: the GPU benchmark of ``make gpu-check``.

The cases of benchmarks.suites on the GPU, measured by benchmarks.runner with CUDA events: after warm-up, the
median of ``--reps`` (>= 20) calls rotating among input sets so that repeated calls do not find their inputs in L2;
peak memory is max_memory_allocated above what was live before the call. ms_deform_attn rows carry the bytes the
call must move, the achieved GB/s and the time those bytes take at the copy bandwidth measured at the start (the
memory bound); the matmul peaks measured at the start are the compute ceilings.

Without a GPU (``--dry``, or no CUDA device) it runs the CPU's quick cases (those of ``make test``'s benchmark smoke
run) with the wall clock and writes the same files: the dry mode keeps the script tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import runner
from benchmarks.harness import CudaEvents, WallClock, copy_bandwidth, matmul_tflops
from benchmarks.suites import GPU_CHECK_SUITES, SUITES, Target


def table(rows: list[dict]) -> str:
    head = "| op | case | variant | impl | median ms | speed-up vs baseline | GB/s (bound ms) | peak MB | ops (sync) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['case']} | {r['variant']} | {r['impl']} | {r['status']} | | | | |")
            continue
        speed = f"{r['speedup']:.2f}x vs {r['baseline']}" if "speedup" in r else "-"
        bw = f"{r['GBps']:.0f} ({r['bound_ms']:.3f})" if "bound_ms" in r else "-"
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
    parser.add_argument("--ops", nargs="*", default=GPU_CHECK_SUITES, choices=list(SUITES))
    args = parser.parse_args(argv)
    dry = args.dry or not torch.cuda.is_available()
    target = Target(torch.device("cpu" if dry else "cuda"), quick=dry)
    reps = 3 if dry else max(args.reps, 20)
    clock = WallClock(budget_s=0.0, min_reps=reps) if dry else CudaEvents(reps)
    name = torch.cuda.get_device_name() if not dry else "cpu (dry mode)"
    bandwidth = copy_bandwidth(target.device)
    ceilings = {
        "copy_GBps": round(bandwidth / 1e9, 1),
        "matmul_fp32_TFLOPs": round(matmul_tflops(target.device, torch.float32), 1),
        "matmul_bf16_TFLOPs": round(matmul_tflops(target.device, torch.bfloat16), 1),
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

    benches = (bench for op in args.ops for bench in SUITES[op](target))
    save(runner.run(benches, target, clock, bandwidth, args.budget, save))
    print(f"wrote {args.out / 'report.json'} and report.md in {meta['seconds']} s")


if __name__ == "__main__":
    main()
