"""Measures benches (benchmarks.suites) into rows, the same rows for every entry point and either clock.

A row: op, case, variant, impl, baseline, status ("ok", "skipped: ...", "error: ..."), and when timed median_ms,
min_ms, max_ms, reps, speedup (baseline median / this median), peak_bytes, peak_mb, peak_vs_baseline; ops and
sync_ops where the bench counts dispatched ops; bytes, GBps and bound_ms (the bytes at the measured copy
bandwidth) where it knows the bytes a call must move.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

from benchmarks.harness import Clock, Impl, count_dispatched_ops, peak_bytes
from benchmarks.suites import Bench, Deferred, Target


def run(
    benches: Iterable[Bench],
    target: Target,
    clock: Clock,
    bandwidth: float | None = None,
    budget_s: float = float("inf"),
    save: Callable[[list[dict]], None] = lambda rows: None,
) -> list[dict]:
    """Times every bench's implementations together (the ``Deferred`` ones after all other benches), prints a
    line per row and passes the rows so far to ``save`` after each bench, so that a run stopped from outside
    still leaves its results. Benches reached after ``budget_s`` seconds are skipped with that reason."""
    start = time.time()
    rows: list[dict] = []
    deferred: list[tuple[Bench, dict[str, dict]]] = []

    def measure(bench: Bench, fns: dict[str, Impl], bench_rows: dict[str, dict]) -> None:
        if time.time() - start > budget_s:
            for impl in fns:
                bench_rows[impl]["status"] = f"skipped: the run's {budget_s:.0f} s budget was spent"
            return
        ready = {}
        for impl, fn in fns.items():
            try:  # a failing implementation is a result, not the end of the run; this call is the first warm-up
                fn(0)
                ready[impl] = fn
            except Exception as exc:
                bench_rows[impl]["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        times = clock.times_ms(ready, target.sets, bench.min_reps) if ready else {}
        for impl, fn in ready.items():
            row, ms = bench_rows[impl], statistics.median(times[impl])
            row.update(status="ok", median_ms=round(ms, 4), min_ms=round(min(times[impl]), 4))
            row.update(max_ms=round(max(times[impl]), 4), reps=len(times[impl]))
            row["peak_bytes"] = peak_bytes(lambda fn=fn: fn(0), target.device)
            row["peak_mb"] = round(row["peak_bytes"] / 2**20, 3)
            if bench.bytes_moved:
                row["bytes"] = bench.bytes_moved
                row["GBps"] = round(bench.bytes_moved / (ms * 1e-3) / 1e9, 3)
                if bandwidth:
                    row["bound_ms"] = round(bench.bytes_moved / bandwidth * 1e3, 6)
            if bench.count_ops:
                row["ops"], row["sync_ops"] = count_dispatched_ops(lambda fn=fn: fn(0))

    def ratios(bench_rows: dict[str, dict], baseline: str) -> None:
        base = bench_rows[baseline]
        for row in bench_rows.values():
            if base.get("median_ms") and row.get("median_ms"):
                row["speedup"] = round(base["median_ms"] / row["median_ms"], 3)
                peak, base_peak = row["peak_bytes"], base["peak_bytes"]
                row["peak_vs_baseline"] = round(peak / base_peak, 4) if base_peak else None

    for bench in benches:
        bench_rows = {}
        for impl, fn in bench.impls.items():
            row = {"op": bench.op, "case": bench.case, "variant": bench.variant, "impl": impl}
            row.update(baseline=bench.baseline, status=fn if isinstance(fn, str) else "pending")
            bench_rows[impl] = row
        rows.extend(bench_rows.values())
        measure(bench, {i: f for i, f in bench.impls.items() if not isinstance(f, (str, Deferred))}, bench_rows)
        ratios(bench_rows, bench.baseline)
        for impl in bench.impls:
            if bench_rows[impl]["status"] != "pending":
                print(line(bench_rows[impl]), flush=True)
        if any(isinstance(fn, Deferred) for fn in bench.impls.values()):
            deferred.append((bench, bench_rows))
        save(rows)
    for bench, bench_rows in deferred:
        for impl, fn in bench.impls.items():
            if isinstance(fn, Deferred):
                measure(bench, {impl: fn.fn}, bench_rows)
                print(line(bench_rows[impl]), flush=True)
        ratios(bench_rows, bench.baseline)
        save(rows)
    return rows


def line(r: dict) -> str:
    """One row as the runner prints it."""
    head = f"{r['op']:<18} {r['case']:<9} {r['variant']:<26} {r['impl']:<28}"
    if r["status"] != "ok":
        return f"{head} {r['status']}"
    speed = f"{r['speedup']:>8.2f}x vs {r['baseline']:<18}" if "speedup" in r else ""
    bw = (
        f"  {r['GBps']:>8.1f} GB/s" + (f" (bound {r['bound_ms']:.3f} ms)" if "bound_ms" in r else "")
        if "GBps" in r
        else ""
    )
    ops = f"  {r['ops']} ops ({r['sync_ops']} sync)" if "ops" in r else ""
    return f"{head} {r['median_ms']:>11.3f} ms {speed} {r['peak_mb']:>10.2f} MB{bw}{ops}"
