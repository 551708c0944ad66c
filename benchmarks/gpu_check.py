"""``make gpu-check``: build, test and benchmark dnops on a lent GPU in one command, in at most 5 minutes by design.

A lent GPU comes with 15 minutes of device time, a machine start included (1-2 minutes), so the command is
sized for two runs in one loan. Steps, each with its own time limit (seconds on an H200 machine, 16 cores; every
step's files reach $OUT as soon as it ends, and a step that runs out of time keeps what it measured and says what it
did not reach):
  build      <= 75   the extension in place for the torch at hand (CUDA kernels for this GPU's arch only, MAX_JOBS =
                     cores); the dry mode uses the build that is already installed
  warm       <= 45   every Triton kernel the GPU suite and the benchmark launch, compiled once into Triton's cache by
                     tests/gpu_compile.py in parallel processes (one per op and dtype), so the test shards load them
  tests      <= 90   ``pytest -m cuda`` over the test files that hold GPU tests, in 6 shards
  sanitizer  <= 40   ``compute-sanitizer --tool memcheck`` over the small CUDA cases of the GPU tests, with
                     PYTORCH_NO_CUDA_MEMORY_CACHING=1 (an access inside a cached block is otherwise invisible to it);
                     a device or driver the sanitizer refuses is a skip with its message
  bench      <= 50   ``python -m benchmarks.gpu_bench``, with what is left of the 300 s; its compiled peers come last
Everything goes to ``<results>/<UTC date>-<device>/`` (env.txt, build.log, warm.log, tests.log, sanitizer.log,
bench.log, report.json, report.md) and, when $OUT is set, to ``$OUT/<same name>/``. The short table is printed,
then every failure on one line. ``--only STEP[,STEP]`` runs just those steps; ``--only PATTERN`` (anything else,
``make gpu-check ONLY=...``) builds and runs the GPU tests that match the pytest -k expression PATTERN.
Committed under benchmarks/results/gpu/, the latest result is the README's GPU table after
``python -m benchmarks.report --render``.

Without a CUDA device (or with ``--dry``) the same steps run on the CPU: the Triton warm-up and the sanitizer are
skipped with their reasons, the tests are collected and skipped, and the benchmark runs tiny shapes; CI runs this
dry mode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GC_DTYPES = ("float32", "float16", "bfloat16", "float64")
LIMITS = {"build": 75, "warm": 45, "tests": 90, "sanitizer": 40, "bench": 50}
TOTAL_S = sum(LIMITS.values())  # 300: the benchmark gets what the steps before it left of this


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


def _gpu_test_files() -> list[str]:
    # only the files that hold GPU tests (they mark them, or take their devices from tests/gpu_utils.py): the others
    # may import packages a lent machine lacks (and a collection error would stop the run), hence also
    # --continue-on-collection-errors
    return [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "tests").glob("test_*.py"))
        if "mark.cuda" in (text := p.read_text()) or "tests.gpu_utils" in text
    ]


def _run_tests_sharded(log: Path, limit: float, env: dict[str, str], shards: int, pattern: str | None = None):
    """``pytest -m cuda`` in ``shards`` concurrent processes on the one GPU (torch.compile graphs and the Triton
    kernels the warm step did not cover are CPU work one process would do serially). The shards' outputs go to
    ``log`` one after the other; on a time-out it says how many tests were reached and names the first ones not."""
    start = time.time()
    files = _gpu_test_files()
    select = ["-p", "no:cacheprovider", "-m", "cuda", "--continue-on-collection-errors"]
    select += ["-k", pattern] if pattern else []
    pytest = [sys.executable, "-m", "pytest", "-v", *select]
    try:
        collect = [sys.executable, "-m", "pytest", "-q", "--collect-only", *select, *files]
        collected = subprocess.run(collect, cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        log.write_text("collection timed out after 60 s\n")
        return "timed out collecting the tests after 60 s", time.time() - start
    ids = [ln for ln in collected.stdout.splitlines() if "::" in ln]
    if shards <= 1 or len(ids) < shards:
        status, seconds = _run([*pytest, *(ids or files)], log, limit, env)
        return _reached(status, log.read_text(errors="replace"), ids), seconds
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
    return _reached(status, "\n".join(texts), ids), time.time() - start


def _reached(status: str, text: str, ids: list[str]) -> str:
    """A timed-out status with how far the tests got (pytest -v prints each test's outcome as it ends)."""
    if not status.startswith("timed out"):
        return status
    done = set(re.findall(r"^(\S+::\S+) (?:PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, flags=re.M))
    missing = [i for i in ids if i not in done]
    return f"{status}: {len(done)} of {len(ids)} tests reached; not reached: {', '.join(missing[:5])}" + (
        f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    )


def _failures(out: Path, steps: dict[str, tuple[str, float]]) -> list[str]:
    """One line per failure: each failed step, and each failed GPU test with its message."""
    lines = [f"{name}: {status}" for name, (status, _) in steps.items() if not _passed(status)]
    log = out / "tests.log"
    if log.exists():
        lines += sorted({ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.startswith("FAILED ")})
        lines += sorted({ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.startswith("ERROR ")})
    return lines


def _passed(status: str) -> bool:
    return status == "ok" or status.startswith("skipped")


def _warm(out: Path, limit: float, env: dict[str, str], arch: int) -> tuple[str, float]:
    """Compiles the Triton kernels the GPU suite and the benchmark launch, one process per (op, dtype)."""
    start = time.time()
    jobs = [(op, dtype) for op in ("ms_deform_attn", "dn_self_attention", "dn_queries") for dtype in GC_DTYPES]
    procs = []
    log = out / "warm.log"
    with log.open("w") as f:
        for op, dtype in jobs:
            cmd = [sys.executable, "-m", "tests.gpu_compile", "--arch", str(arch), "--op", op, "--dtype", dtype]
            cmd += ["--json", str(out / f".warm-{op}-{dtype}.json")]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f, env=env))
        status = "ok"
        for proc in procs:
            try:
                if proc.wait(timeout=max(1.0, limit - (time.time() - start))) != 0 and status == "ok":
                    status = "failed: a kernel did not compile or spills (see warm.log and gpu_compile.json)"
            except subprocess.TimeoutExpired:
                proc.kill()
                status = f"timed out after {limit:.0f} s (the tests compile what was not reached)"
    rows = []
    for op, dtype in jobs:
        part = out / f".warm-{op}-{dtype}.json"
        if part.exists():
            rows += json.loads(part.read_text())["rows"]
            part.unlink()
    (out / "gpu_compile.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
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


def _sanitizer_refused(log: Path) -> str | None:
    """The sanitizer's own error when it could not run the program at all (an unsupported device or driver, no
    debugger interface in a VM): such a run reached no test."""
    text = log.read_text(errors="replace")
    if re.search(r"\d+ (passed|failed)", text):
        return None
    errors = [ln.strip("= ").strip() for ln in text.splitlines() if ln.startswith("========") and "rror" in ln]
    return errors[0] if errors else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU mode (chosen anyway without a CUDA device)")
    parser.add_argument("--results", type=Path, help="default: benchmarks/results/gpu (committed), gpu-dry if dry")
    parser.add_argument("--only", help="STEP[,STEP] of " + ", ".join(LIMITS) + ", or a pytest -k expression")
    args = parser.parse_args(argv)
    start = time.time()

    import torch

    dry = args.dry or not torch.cuda.is_available()
    only = [x for x in (args.only or "").split(",") if x]
    pattern = None
    if only and not set(only) <= set(LIMITS):
        pattern, only = args.only, ["build", "tests"]
    wanted = only or list(LIMITS)
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

    def skip(name: str, why: str) -> None:
        (out / f"{name}.log").write_text(f"skipped: {why}\n")
        steps[name] = (f"skipped: {why}", 0.0)

    arch = 0 if dry else int("".join(map(str, torch.cuda.get_device_capability())))
    for name in LIMITS:
        if name not in wanted:
            continue
        if name == "build":
            if dry:
                skip("build", "dry mode: the installed build is used")
            else:
                build_env = dict(env, DNOPS_CUDA="1", TORCH_CUDA_ARCH_LIST=f"{arch // 10}.{arch % 10}")
                build_env["MAX_JOBS"] = str(os.cpu_count())
                cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
                steps["build"] = _run(cmd, out / "build.log", LIMITS["build"], build_env)
        elif name == "warm":
            if dry:
                skip("warm", "dry mode (CI compiles the Triton kernels in make gpu-compile-check)")
            else:
                steps["warm"] = _warm(out, LIMITS["warm"], env, arch)
        elif name == "tests":
            shards = 2 if dry else 6
            steps["tests"] = _run_tests_sharded(out / "tests.log", LIMITS["tests"], env, shards, pattern)
        elif name == "sanitizer":
            sanitizer = "dry mode (no CUDA device)" if dry else _sanitizer_cmd()
            if isinstance(sanitizer, str):
                skip("sanitizer", sanitizer)
            else:
                cmd = [*sanitizer, "-p", "no:cacheprovider", "-k", "sanitizer", *_gpu_test_files()]
                san_env = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
                steps["sanitizer"] = _run(cmd, out / "sanitizer.log", LIMITS["sanitizer"], san_env)
                refused = _sanitizer_refused(out / "sanitizer.log")
                if refused and not _passed(steps["sanitizer"][0]):
                    steps["sanitizer"] = (
                        f"skipped: compute-sanitizer refused to run: {refused}",
                        steps["sanitizer"][1],
                    )
        elif name == "bench":
            limit = max(30.0, min(LIMITS["bench"], TOTAL_S - (time.time() - start)))
            bench = [sys.executable, "-m", "benchmarks.gpu_bench", "--out", str(out), "--budget", str(limit - 15)]
            steps["bench"] = _run([*bench, "--dry"] if dry else bench, out / "bench.log", limit, env)
        publish()
    print(f"\nresults: {out}  ({time.time() - start:.0f} s)")
    for name, (status, seconds) in steps.items():
        log = out / f"{name}.log"
        summary = _tail_summary(log) if log.exists() and name in ("tests", "sanitizer") else ""
        print(f"  {name:<10} {seconds:6.1f} s  {status}  {summary}")
    report = out / "report.md"
    if report.exists():
        print()
        print(report.read_text())
    failures = _failures(out, steps)
    print(f"\nfailures: {len(failures)}" + "".join(f"\n  {line}" for line in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
