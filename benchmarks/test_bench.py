"""pytest-benchmark suites, grouped by op and case: ``pytest benchmarks/ --benchmark-only``.

The cases and implementations of benchmarks.suites on the CPU, as ``make bench`` times them. DNOPS_BENCH_QUICK=1
uses the small shapes (what `make test` runs, with --benchmark-disable, as a smoke test).
"""

import itertools
import os

import pytest
import torch

from benchmarks.suites import SUITES, Deferred, Target

TARGET = Target(torch.device("cpu"), quick=os.environ.get("DNOPS_BENCH_QUICK") == "1")


def _params(target: Target = TARGET) -> list:
    params = []
    for op, suite in SUITES.items():
        for index, bench in enumerate(suite(target)):
            for impl in bench.impls:
                params.append(pytest.param(op, index, impl, id=f"{op}-{bench.case}-{bench.variant}-{impl}"))
    return params


@pytest.mark.parametrize("op,index,impl", _params())
def test_bench(benchmark, op, index, impl):
    bench = next(itertools.islice(SUITES[op](TARGET), index, None))
    fn = bench.impls[impl]
    if isinstance(fn, str):
        pytest.skip(fn)
    fn = fn.fn if isinstance(fn, Deferred) else fn
    benchmark.group = f"{op} {bench.case} {bench.variant}"
    benchmark.extra_info.update(op=op, case=bench.case, variant=bench.variant, impl=impl, baseline=bench.baseline)
    benchmark(fn, 0)
