"""``make test-cuda-emulated``: the CUDA kernels executed on the CPU, against the reference.

Builds (or finds cached) the emulated library at -O2 and under AddressSanitizer + UndefinedBehaviorSanitizer, then
runs the emulated tests (``pytest -m emulated``: the device half of the GPU tests in each op's test file and in
the module interface's, and the emulator's own tests)
once per (build, lane order) of RUNS, and fails when any run fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from dnops._registry import OPS
from tests.cuda_emulator.build import ROOT, build, preload

RUNS = [("o2", "forward"), ("o2", "reverse"), ("asan", "forward"), ("asan", "random:1")]
TESTS = [*(f"tests/test_{op}.py" for op in OPS), "tests/test_msda_module.py", "tests/test_cuda_emulator.py"]


def main() -> int:
    start = time.time()
    libs = build(sorted({variant for variant, _ in RUNS}), int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    print(f"cuda emulator: libraries ready in {time.time() - start:.0f} s", flush=True)
    failed = []
    for variant, order in RUNS:
        env = dict(os.environ, DNOPS_CUDA_EMULATOR=str(libs[variant]), DNOPS_EMULATOR_ORDER=order)
        if variant == "asan":
            # Python itself leaks by design at exit; the sanitizers' findings in the kernels stop the run
            env.update(LD_PRELOAD=preload(), ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
        t = time.time()
        print(f"cuda emulator: {variant} build, lane order {order}", flush=True)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "emulated", *TESTS]
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        print(f"cuda emulator: {variant} / {order}: exit {rc} in {time.time() - t:.0f} s", flush=True)
        if rc != 0:
            failed.append(f"{variant} / {order}")
    print(f"cuda emulator: {len(RUNS) - len(failed)} of {len(RUNS)} runs passed in {time.time() - start:.0f} s")
    if failed:
        print("cuda emulator: failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
