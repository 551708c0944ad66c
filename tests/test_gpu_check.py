"""``make gpu-check``'s dry mode: the script a lent GPU runs is exercised on every CI run, so it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = {"env.txt", "build.log", "tests.log", "sanitizer.log", "bench.log", "report.json", "report.md"}


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
    assert "skipped" in tests_log and " failed" not in tests_log and "error" not in tests_log.lower()
    assert (out / "sanitizer.log").read_text().startswith("skipped:")

    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["dry"] is True
    rows = report["rows"]
    assert {r["op"] for r in rows} == {"ms_deform_attn", "dn_self_attention", "dn_mha", "dn_queries", "detr_step"}
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith("skipped: no CUDA device"), r
        if r["impl"].startswith("dnops cuda") or r["impl"].startswith("dnops triton"):
            assert r["status"] != "ok", r  # GPU kernels cannot run in the dry mode
    timed = [r for r in rows if r["status"] == "ok"]
    assert timed and all(r["median_ms"] > 0 and r["peak_mb"] >= 0 for r in timed)
    assert all("GBps" in r and r["bytes"] > 0 for r in timed if r["op"] == "ms_deform_attn")
    assert all(r["ops"] > 0 for r in timed if r["op"] == "dn_queries")
