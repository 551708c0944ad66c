"""The backends each op's tests run, read from the op registry (dnops._registry): a backend added there is tested
by every test parametrized with ``backends(op)``."""

from __future__ import annotations

import pytest

from dnops import _registry


def backends(op: str, device: str = "cpu", without: tuple[str, ...] = ()) -> list:
    """pytest params of the backends of ``op`` that take ``device`` tensors: on "cpu" the reference, the C++ kernel,
    the Triton kernels (in the interpreter, under the triton mark) and SDPA where the op has them; on "cuda" the CUDA
    kernel, Triton and SDPA (the GPU tests compare each with the reference). A build without a kernel skips it."""
    info = _registry.OPS[op]
    has = {
        "reference": device == "cpu",
        "cpu": device == "cpu" and "cpu" in info.compiled,
        "cuda": device == "cuda" and "cuda" in info.compiled,
        "triton": info.triton,
        "sdpa": info.sdpa,
    }
    names = [b for b in _registry.BACKENDS if has[b] and b not in without]
    interpreted = device == "cpu"
    return [pytest.param(b, marks=pytest.mark.triton) if b == "triton" and interpreted else b for b in names]
