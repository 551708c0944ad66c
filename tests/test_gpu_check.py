"""``make gpu-check``'s dry mode: the script a lent GPU runs is exercised on every CI run, so it cannot rot."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.suites import GPU_CHECK_SUITES

ROOT = Path(__file__).resolve().parent.parent
FILES = {"env.txt", "build.log", "warm.log", "tests.log", "sanitizer.log", "bench.log", "report.json", "report.md"}


def test_dry_mode_runs_every_step_and_writes_every_file(tmp_path):
    results, fetched = tmp_path / "results", tmp_path / "OUT"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--results", str(results)]
    env = dict(os.environ, OUT=str(fetched))  # where the lent machine's tool collects files
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (out,) = results.iterdir()
    assert out.name.endswith("-dry-cpu")
    assert {p.name for p in out.iterdir()} == FILES
    assert {p.name for p in (fetched / out.name).iterdir()} == FILES
    assert "| op | case |" in done.stdout.splitlines()[-1] or "| op | case |" in done.stdout

    tests_log = (out / "tests.log").read_text()
    assert "skipped" in tests_log and not re.search(r"\d+ (failed|errors?)\b|^(FAILED|ERROR) ", tests_log, re.M)
    assert (out / "sanitizer.log").read_text().startswith("skipped:")

    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["dry"] is True
    rows = report["rows"]
    # the dry mode runs the CPU's quick cases: the rows of `make test`'s benchmark smoke run, but the detectors'
    assert [_key(r) for r in rows] == _suite_rows(GPU_CHECK_SUITES)
    assert {r["op"] for r in rows} == {
        "ms_deform_attn",
        "rt_detr_attn",
        "dn_self_attention",
        "dn_mha",
        "dn_queries",
        "dn_attn_mask",
        "detr_step",
        "codebase_dn",
    }
    # mmdetection's generator is timed where mmdet is installed (requirements-detectors.txt; not on the lent GPU)
    absent = {"mmdet"} if importlib.util.find_spec("mmdet") is None else set()
    skipped = [r for r in rows if r["impl"] in absent]
    assert all(r["status"].startswith("skipped: mmdet is not installed") for r in skipped), skipped
    rows = [r for r in rows if r["impl"] not in absent]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert all(r["median_ms"] > 0 and r["peak_mb"] >= 0 and r["reps"] >= 3 for r in rows)
    msda = ("ms_deform_attn", "rt_detr_attn")
    assert all(r["GBps"] > 0 and r["bytes"] > 0 and r["bound_ms"] > 0 for r in rows if r["op"] in msda)
    assert all(r["ops"] > 0 for r in rows if r["op"] == "dn_queries")
    assert {r["impl"] for r in rows if r["op"] == "ms_deform_attn"} == {"reference", "dnops cpu"}
    assert {r["impl"] for r in rows if r["op"] == "rt_detr_attn"} == {"original", "dnops cpu"}


def _key(row: dict) -> tuple[str, str, str, str]:
    return row["op"], row["case"], row["variant"], row["impl"]


def _suite_rows(ops=None) -> list[tuple[str, str, str, str]]:
    import torch

    from benchmarks.suites import SUITES, Target

    target = Target(torch.device("cpu"), quick=True)
    return [(b.op, b.case, b.variant, impl) for op in ops or SUITES for b in SUITES[op](target) for impl in b.impls]


def test_the_report_and_the_pytest_suite_have_the_rows_of_the_suites():
    """`make bench` and `make bench-suite` enumerate the cases `make gpu-check` runs (the test above): one stack."""
    import torch

    from benchmarks import report, test_bench

    ops = ["dn_attn_mask", "dn_mha"]
    rows, bandwidth = report.run(ops, quick=True, budget_s=0.0)
    assert [_key(r) for r in rows] == _suite_rows(ops) and bandwidth > 0
    assert all(r["status"] == "ok" and r["reps"] >= 3 and "speedup" in r for r in rows)
    ids = [p.id for p in test_bench._params(test_bench.Target(torch.device("cpu"), quick=True))]
    assert ids == ["-".join(key) for key in _suite_rows()]


def test_only_runs_the_named_steps_and_lists_failures(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--results", str(tmp_path)]
    cmd += ["--only", "warm,sanitizer"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (out,) = tmp_path.iterdir()
    assert {p.name for p in out.iterdir()} == {"env.txt", "warm.log", "sanitizer.log"}
    assert done.stdout.rstrip().endswith("failures: 0")


def test_a_timed_out_test_step_says_how_far_it_got():
    from benchmarks import gpu_check

    ids = [f"tests/test_ms_deform_attn.py::test_{i}" for i in range(8)]
    text = "tests/test_ms_deform_attn.py::test_0 PASSED [ 10%]\ntests/test_ms_deform_attn.py::test_1 FAILED [ 20%]\n"
    status = gpu_check._reached("timed out after 90 s", text, ids)
    assert status.startswith(
        "timed out after 90 s: 2 of 8 tests reached; not reached: tests/test_ms_deform_attn.py::test_2,"
    )
    assert status.endswith("and 1 more")
    assert gpu_check._reached("ok", text, ids) == "ok"


def test_a_sanitizer_that_cannot_run_is_a_skip(tmp_path):
    from benchmarks import gpu_check

    log = tmp_path / "sanitizer.log"
    log.write_text("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n")
    assert gpu_check._sanitizer_refused(log) == "Error: Device not supported"
    log.write_text("========= Error: out of bounds read\n1 failed, 3 passed in 9s\n")
    assert gpu_check._sanitizer_refused(log) is None


def test_the_benchmarks_time_each_backend_with_a_kernel_on_the_device_kind():
    """The GPU benchmark's dnops rows (one per backend, from the registry): CUDA and Triton where the op has them."""
    import torch

    from benchmarks.suites import kernels_on

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert kernels_on("ms_deform_attn", cuda) == ["cuda", "triton"]
    assert kernels_on("dn_queries", cuda) == ["cuda", "triton"]
    assert kernels_on("dn_self_attention", cuda) == ["triton"]  # and sdpa, the "sdpa (two calls)" peer
    assert kernels_on("dn_attn_mask", cuda) == ["cuda"]
    assert all(kernels_on(op, cpu) == ["cpu"] for op in ("ms_deform_attn", "dn_queries", "dn_attn_mask"))
