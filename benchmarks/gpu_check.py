"""``make gpu-check``: build, test and benchmark dnops on a lent GPU in one command, within ~8 minutes.

Steps, each with its own time limit so one slow step cannot eat the others (seconds, on an H200 machine; the
benchmark gets at most what is left of 480 s, and every step's files reach $OUT as soon as it ends):
  build      <= 180  the extension in place for the torch at hand (CUDA kernels for this GPU's arch, MAX_JOBS =
                     cores); the dry mode uses the build that is already installed
  tests      <= 150  ``pytest -m cuda`` over the test files that hold GPU tests
  sanitizer  <= 90   ``compute-sanitizer --tool memcheck`` over the small CUDA cases of tests/test_gpu.py
  bench      <= 150  ``python -m benchmarks.gpu_bench``
Everything goes to ``<results>/<UTC date>-<device>/`` (env.txt, build.log, tests.log, sanitizer.log, bench.log,
report.json, report.md) and, when $OUT is set, to ``$OUT/<same name>/``. The short table is printed last.
Committed under benchmarks/results/gpu/, the latest result is the README's GPU table after
``python -m benchmarks.report --render``.

Without a CUDA device (or with ``--dry``) the same steps run on the CPU: the tests are collected and skipped,
the sanitizer is skipped with its reason, and the benchmark runs tiny shapes; CI runs this dry mode.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"build": 180, "tests": 150, "sanitizer": 90, "bench": 150}
TOTAL_S = 480  # the benchmark gets what the steps before it left of this (the lent machine's calls stop at 540 s)


def _run(cmd: list[str], log: Path, limit: float, env: dict[str, str] | None = None) -> tuple[str, float]:
    """Runs ``cmd`` in the repository root with its output in ``log``; (status, seconds)."""
    start = time.time()
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=limit).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
        except OSError as exc:
            status = f"could not start: {exc}"
    return status, time.time() - start


def _run_tests_sharded(log: Path, limit: float, env: dict[str, str], shards: int) -> tuple[str, float]:
    """``pytest -m cuda`` in ``shards`` concurrent processes on the one GPU: the first run on a machine compiles
    every Triton kernel variant and torch.compile graph the tests touch, CPU work that one process would do
    serially. The shards' outputs go to ``log`` one after the other."""
    start = time.time()
    # only the files that hold GPU tests: the others may import packages a lent machine lacks (and a collection
    # error would stop the run), hence also --continue-on-collection-errors
    files = [
        str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.cuda" in p.read_text()
    ]
    pytest = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "cuda",
        "--continue-on-collection-errors",
    ]
    collected = subprocess.run([*pytest, "--collect-only", *files], cwd=ROOT, capture_output=True, text=True, env=env)
    ids = [ln for ln in collected.stdout.splitlines() if "::" in ln]
    if shards <= 1 or not ids:
        return _run([*pytest, *files], log, limit, env)
    logs = [log.with_name(f".{log.name}.{i}") for i in range(shards)]
    procs = []
    for i, shard_log in enumerate(logs):
        with shard_log.open("w") as f:
            procs.append(
                subprocess.Popen([*pytest, *ids[i::shards]], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
            )
    status = "ok"
    for proc in procs:
        try:
            rc = proc.wait(timeout=max(1.0, limit - (time.time() - start)))
            if rc != 0 and status == "ok":
                status = f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            proc.kill()
            status = f"timed out after {limit:.0f} s"
    texts = [shard_log.read_text(errors="replace") for shard_log in logs]
    for shard_log in logs:
        shard_log.unlink()
    totals: dict[str, int] = {}
    for text in texts:
        closing = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", ln)]
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", closing[-1] if closing else ""):
            totals[what] = totals.get(what, 0) + int(n)
    shards_text = "".join(f"==== shard {i + 1}/{shards}\n{text}\n" for i, text in enumerate(texts))
    total = ", ".join(f"{n} {what}" for what, n in totals.items())
    log.write_text(f"{shards_text}==== all {shards} shards: {total}\n")
    return status, time.time() - start


def _tail_summary(log: Path) -> str:
    """pytest's closing line ('N passed, ...') when the log has one."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if re.search(r"\d+ (passed|failed|skipped)", ln)]
    return lines[-1].strip("= ") if lines else ""


def _env_report(dry: bool) -> str:
    import torch

    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton: not installed")
    for tool in (["nvcc", "--version"], ["compute-sanitizer", "--version"]):
        exe = shutil.which(tool[0]) or (Path("/usr/local/cuda/bin") / tool[0]).as_posix()
        try:
            out = subprocess.run([exe, tool[1]], capture_output=True, text=True, timeout=30).stdout.strip()
            parts.append(f"{tool[0]}: {out.splitlines()[-1] if out else 'no output'}")
        except (OSError, subprocess.TimeoutExpired):
            parts.append(f"{tool[0]}: not found")
    text = "\n".join(parts) + "\n"
    if not dry:
        props = torch.cuda.get_device_properties(0)
        text += f"device: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
        text += f"{props.total_memory / 2**30:.0f} GiB\n"
        try:
            smi = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=30).stdout
            keep = ("Driver Version", "CUDA Version", "Product Name", "Clocks", "Graphics", "SM ", "Memory ")
            text += "\nnvidia-smi -q (summary):\n" + "\n".join(
                ln for ln in smi.splitlines() if ln.strip().startswith(keep)
            )
        except (OSError, subprocess.TimeoutExpired):
            text += "nvidia-smi: not found\n"
    return text


def _sanitizer_cmd() -> list[str] | str:
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(exe).exists():
        return "compute-sanitizer not found"
    return [exe, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-m", "pytest", "-q", "-m", "cuda"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU mode (chosen anyway without a CUDA device)")
    parser.add_argument("--results", type=Path, help="default: benchmarks/results/gpu (committed), gpu-dry if dry")
    args = parser.parse_args(argv)
    start = time.time()

    import torch

    dry = args.dry or not torch.cuda.is_available()
    results = args.results or ROOT / "benchmarks" / "results" / ("gpu-dry" if dry else "gpu")
    device = "dry-cpu" if dry else re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    out = results / f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}-{device}"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    steps: dict[str, tuple[str, float]] = {}
    (out / "env.txt").write_text(_env_report(dry))

    def publish() -> None:
        """Copies what is written so far to $OUT, so that a run stopped from outside still returns it."""
        if os.environ.get("OUT"):
            shutil.copytree(out, Path(os.environ["OUT"]) / out.name, dirs_exist_ok=True)

    if dry:
        (out / "build.log").write_text("dry mode: the installed build is used\n")
        steps["build"] = ("skipped (dry mode)", 0.0)
    else:
        major, minor = torch.cuda.get_device_capability()
        build_env = dict(env, DNOPS_CUDA="1", TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", MAX_JOBS=str(os.cpu_count()))
        steps["build"] = _run(
            [sys.executable, "setup.py", "build_ext", "--inplace"], out / "build.log", LIMITS["build"], build_env
        )
    publish()

    steps["tests"] = _run_tests_sharded(out / "tests.log", LIMITS["tests"], env, shards=2 if dry else 6)
    publish()

    sanitizer = _sanitizer_cmd()
    if dry:
        sanitizer = "dry mode (no CUDA device)"
    if isinstance(sanitizer, str):
        (out / "sanitizer.log").write_text(f"skipped: {sanitizer}\n")
        steps["sanitizer"] = (f"skipped: {sanitizer}", 0.0)
    else:
        cmd = [*sanitizer, "-p", "no:cacheprovider", "-k", "sanitizer", "tests/test_gpu.py"]
        steps["sanitizer"] = _run(cmd, out / "sanitizer.log", LIMITS["sanitizer"], env)
    publish()

    limit = max(45.0, min(LIMITS["bench"], TOTAL_S - (time.time() - start)))
    bench = [sys.executable, "-m", "benchmarks.gpu_bench", "--out", str(out), "--budget", str(limit - 30)]
    steps["bench"] = _run([*bench, "--dry"] if dry else bench, out / "bench.log", limit, env)
    publish()
    print(f"\nresults: {out}")
    for name, (status, seconds) in steps.items():
        log = out / f"{name}.log"
        summary = _tail_summary(log) if log.exists() and name in ("tests", "sanitizer") else ""
        print(f"  {name:<10} {seconds:6.1f} s  {status}  {summary}")
    report = out / "report.md"
    if report.exists():
        print()
        print(report.read_text())
    failed = [n for n, (s, _) in steps.items() if not (s == "ok" or s.startswith("skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
