"""pytest-benchmark suites, grouped by op and case: ``pytest benchmarks/ --benchmark-only``.

DNOPS_BENCH_QUICK=1 uses the small shapes (what `make test` runs, with --benchmark-disable, as a smoke test).
"""

import itertools
import os

import pytest

from benchmarks.suites import SUITES

QUICK = os.environ.get("DNOPS_BENCH_QUICK") == "1"


def _params():
    params = []
    for op, suite in SUITES.items():
        for index, bench in enumerate(suite(quick=QUICK)):
            for impl in bench.impls:
                params.append(pytest.param(op, index, impl, id=f"{op}-{bench.case}-{bench.variant}-{impl}"))
    return params


@pytest.mark.parametrize("op,index,impl", _params())
def test_bench(benchmark, op, index, impl):
    bench = next(itertools.islice(SUITES[op](quick=QUICK), index, None))
    benchmark.group = f"{op} {bench.case} {bench.variant}"
    benchmark.extra_info.update(op=op, case=bench.case, variant=bench.variant, impl=impl)
    benchmark(bench.impls[impl])
