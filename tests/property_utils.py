"""hypothesis for the property tests of each op's test file, or, where it is not installed (the lent GPU machine has
pytest but not hypothesis, and nothing can be installed there), stand-ins under which each property test collects as
one skipped test, so that the rest of its file (the op's GPU tests among them) still runs."""

from __future__ import annotations

import inspect

import pytest

from dnops import _backend

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:

    class _Strategy:
        """Any strategy, or combination or attribute of one: never drawn from."""

        def __call__(self, *args, **kwargs) -> _Strategy:
            return self

        def __getattr__(self, name: str) -> _Strategy:
            return self

        def __or__(self, other) -> _Strategy:
            return self

    st = HealthCheck = _Strategy()

    def settings(*args, **kwargs):
        return lambda test: test

    def given(*args, **strategies):
        def skipped_without_hypothesis(test):
            signature = inspect.signature(test)
            kept = [p for name, p in signature.parameters.items() if name not in strategies]

            def skipped(*a, **kw):
                pytest.skip("hypothesis is not installed")

            skipped.__name__, skipped.__doc__ = test.__name__, test.__doc__
            skipped.__signature__ = signature.replace(parameters=kept)
            return skipped

        return skipped_without_hypothesis


# every op's property tests: 30 examples each, no per-example deadline (the first ones compile kernels)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(backend: str, fn, *args, **kw):
    """``fn(*args, **kw)`` on ``backend``."""
    with _backend.use_backend(backend):
        return fn(*args, **kw)


__all__ = ["SETTINGS", "given", "run", "st"]
