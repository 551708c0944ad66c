"""What a GPU would see first, checked without one (tests/gpu_compile.py is the ahead-of-time compile of every
Triton kernel; ``make gpu-compile-check`` runs it with the CI's Triton and the lent GPU's)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@pytest.mark.parametrize("scale", [71**-0.5, 30**-0.5, 0.1, 1 / 3, 8**-0.5, 1e-7, 123.456])
def test_float64_softmax_scale_is_exact_through_float32_kernel_arguments(scale):
    """Compiled Triton takes a Python float argument as float32: the dn_self_attention kernels get the scale as
    three float32 values whose float64 sum is the scale."""
    pytest.importorskip("triton")
    from dnops.triton.dn_self_attention import scale_parts

    parts = scale_parts(scale)
    assert all(float32(p) == p for p in parts)  # what a launch passes is what the kernel gets
    assert (parts[0] + parts[1]) + parts[2] == scale  # the kernel's float64 sum
    assert float32(parts[0] + parts[1] + parts[2]) == float32(scale)  # and its float32 one


def test_the_committed_compile_table_covers_both_tritons_and_the_cuda_kernels():
    text = (ROOT / "docs" / "results" / "gpu_compile.md").read_text()
    assert "## Triton 3.6.0" in text and text.count("## Triton ") == 2
    for kernel in ("_fwd_kernel", "_bwd_kernel", "_dkdv_kernel", "_dq_kernel", "forward_kernel", "dn_queries_kernel"):
        assert kernel in text
    assert text.count(" 0 compile errors, ") == 2 and "| compile error:" not in text
