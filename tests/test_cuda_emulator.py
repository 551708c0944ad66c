"""The CUDA emulator's own tests: the source step (always), and with the emulated library (make
test-cuda-emulated) the rules it reports, the sm_70+ PTX mode, the lane orders and a mutant of a real kernel.
The emulated GPU suite itself is the ``dev`` half of the GPU tests in each op's test file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.cuda_emulator import translate as source_step
from tests.msda_utils import make_inputs

ROOT = Path(__file__).resolve().parents[1]
BROKEN = ROOT / "tests" / "cuda_emulator" / "broken_kernels.cu"
CUDA_FILES = sorted(ROOT.glob("csrc/*/cuda/*.cu"))

# ---- the source step ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CUDA_FILES, ids=lambda p: p.name)
def test_source_step_keeps_every_line_where_it_was(path):
    rel = path.relative_to(ROOT).as_posix()
    original = path.read_text().split("\n")
    out = source_step.translate(path.read_text(), rel, "dnops_emulated", 900).split("\n")
    assert out[0] == f'#line 1 "{rel}"'
    # after each #line N, the lines that follow are the original lines N, N + 1, ... (or their rewrites)
    line, kept = None, 0
    for text in out:
        m = re.fullmatch(rf'#line (\d+) "{re.escape(rel)}"', text)
        if m:
            line = int(m.group(1))
            continue
        if line is None or text.startswith(('#include "cuemu', "#define __CUDA_ARCH__")):
            continue
        want = original[line - 1]
        if not any(s in want for s in ("<<<", "reinterpret_cast", "TORCH_LIBRARY_IMPL", "at::kCUDA")):
            assert text.startswith(want), f"{rel}:{line}: {text!r} != {want!r}"
        kept += 1
        line += 1
    assert line == len(original) + 1 and kept == len(original)


def test_source_step_rewrites_launches_and_registration():
    cu = (
        "#include <torch/library.h>\n"
        "__global__ void k(int n, float* p) {}\n"
        "void f(float* p) {\n"
        "  ns::k<float, 4><<<dim3(2, 1), 64, 0, stream>>>(\n"
        "      3, p);\n"
        "  k<<<1, 32>>>(1, reinterpret_cast<float*>(p));\n"
        "}\n"
        "TORCH_LIBRARY_IMPL(dnops, CUDA, m) {}\n"
    )
    out = source_step.translate(cu, "x.cu", "dnops_emulated", 800)
    assert '::cuemu::launch(::cuemu::Site{"ns::k<float, 4>", __FILE__, __LINE__}, dim3(2, 1),  64,  0, ' in out
    assert "::cuemu::stream_of( stream), ns::k<float, 4>, \n      3, p);" in out
    assert '::cuemu::Site{"k", __FILE__, __LINE__}, 1,  32, 0, ::cuemu::stream_of(nullptr), k, 1, ' in out
    assert "::cuemu::reinterpret<float*>(p)" in out
    assert "TORCH_LIBRARY_IMPL(dnops_emulated, CPU, m)" in out
    assert "#define __CUDA_ARCH__ 800" in out
    assert out.count("\n") == cu.count("\n") + 5  # the #line directives and the emulator's three lines


@pytest.mark.parametrize(
    "snippet,what",
    [
        ("__shared__ float tile[32];", "shared memory"),
        ('asm("mov.u32 %0, %%laneid;" : "=r"(x));', "inline PTX"),
        ("cub::WarpReduce<float> r;", "cub"),
        ("int v = __ldg(p);", "__ldg"),
    ],
)
def test_source_step_refuses_what_it_does_not_model(snippet, what):
    cu = f"#include <torch/library.h>\n__global__ void k(int* p) {{\n  {snippet}\n}}\n"
    cu += "TORCH_LIBRARY_IMPL(dnops, CUDA, m) {}\n"
    with pytest.raises(source_step.TranslateError, match=rf"x\.cu:3: {what}"):
        source_step.translate(cu, "x.cu", "dnops_emulated", 900)


def test_source_step_finds_its_mutant_anchors():
    for file, anchor, _ in source_step.MUTANTS.values():
        (path,) = [p for p in CUDA_FILES if p.name == file]
        assert path.read_text().count(anchor) == 1


# ---- the rules, on kernels that break them -----------------------------------------------------------------------

emulated = pytest.mark.emulated


def run_broken(name: str) -> torch.Tensor:
    from tests import cuda_emulator

    cuda_emulator.load()
    buf = torch.zeros(160)
    torch.ops.cuemu_broken.run(name, buf)
    return buf


# kernel, what the report says, the source line it must name (a snippet of broken_kernels.cu), thread it names
BROKEN_CASES = [
    ("exited_lane_in_mask", "__syncwarp mask 0xffffffff names lane 16, which has exited", "__syncwarp(0xffffffffu);"),
    ("reads_exited_lane", "names lane 16, which has exited", "__shfl_sync(0xffffffffu, 1.f, lane + 16)"),
    ("caller_not_in_mask", "called by lane 0, which is not in its mask 0x00000002", "lane == 0 ? 0x2u"),
    ("source_outside_group", "reads lane 20, outside the mask 0x0000ffff", "lane == 0 ? 20 : lane"),
    (
        "mixed_intrinsics",
        "mixed intrinsics at one rendezvous: this lane calls __shfl_sync, lane 1 calls __ballot_sync",
        "buf[lane] = __shfl_sync(0xffffffffu, 1.f, 0);",
    ),
    ("bad_width", "width 12 is not a power of two <= 32", "__shfl_xor_sync(0xffffffffu, 1.f, 1, 12)"),
    (
        "divergent_syncthreads",
        "divergent __syncthreads: thread 0 waits at tests/cuda_emulator/broken_kernels.cu:",
        "__syncthreads();\n  }\n  buf[threadIdx.x & 31]",
    ),
    (
        "conditional_syncthreads",
        "conditional __syncthreads: thread 32 has exited",
        "__syncthreads();\n  buf[threadIdx.x]",
    ),
    ("deadlock", "deadlock: no rendezvous can complete", "__syncwarp(0x3u);"),
    (
        "misaligned_vector_atomic",
        "misaligned 16-byte vector atomicAdd: address 0x[0-9a-f]+ is not a multiple of 16",
        "atomicAdd((float4*)",
    ),
    (
        "misaligned_vector_load",
        "misaligned 16-byte access: address 0x[0-9a-f]+ is not a multiple of 16",
        "reinterpret_cast<const float4*>(buf + 2)",
    ),
    ("mask_names_missing_lane", "mask 0x0000ffff names lane 8, which does not exist", "0x0000ffffu, x, off, 16"),
]
KERNEL_OF = {"mask_names_missing_lane": "half_warp_exits"}  # launched with too few threads


def snippet_line(snippet: str) -> int:
    """The line of broken_kernels.cu holding the snippet's first line (the lines after it tell it apart)."""
    first, *rest = snippet.split("\n")
    lines = BROKEN.read_text().splitlines()
    hits = [
        i for i in range(len(lines)) if first in lines[i] and all(r in lines[i + 1 + j] for j, r in enumerate(rest))
    ]
    assert len(hits) == 1, snippet
    return hits[0] + 1


@emulated
@pytest.mark.parametrize("name,what,snippet", BROKEN_CASES, ids=[c[0] for c in BROKEN_CASES])
def test_broken_kernel_is_reported(name, what, snippet):
    from tests import cuda_emulator

    cuda_emulator.configure()
    with pytest.raises(RuntimeError) as err:
        run_broken(name)
    msg = str(err.value)
    assert re.search(what, msg), msg
    file = "tests/cuda_emulator/broken_kernels.cu"
    kernel = KERNEL_OF.get(name, name)
    names = rf"in kernel {kernel} \(launched at {file}:\d+\), block \(0,0,0\), thread \(\d+,0,0\) = warp \d+ lane \d+"
    assert re.search(rf"{names}\n  at {file}:{snippet_line(snippet)}\b", msg), msg


@emulated
@pytest.mark.parametrize(
    "name,what",
    [
        ("empty_grid", "empty grid \\(gridDim.x = 0\\)"),
        ("too_many_threads", "blockDim.x = 2048 exceeds 1024"),
        ("grid_y_too_large", "gridDim.y = 65536 exceeds 65535"),
    ],
)
def test_bad_launch_configuration_is_reported(name, what):
    from tests import cuda_emulator

    cuda_emulator.configure()
    site = r"\n  in kernel nothing \(launched at tests/cuda_emulator/broken_kernels.cu:\d+\)"
    with pytest.raises(RuntimeError, match=rf"invalid launch configuration: {what}{site}"):
        run_broken(name)


@emulated
def test_correct_warp_code_gives_the_device_results():
    from tests import cuda_emulator

    for order in ("forward", "reverse", "random"):
        cuda_emulator.configure(order, seed=5)
        buf = run_broken("warp_semantics")
        assert torch.equal(buf[:32], torch.full((32,), 496.0))  # sum of lanes 0..31 by xor shuffles
        assert buf[32] == 1 and buf[33] == 1  # ballot of odd lanes; shuffle up / down / broadcast with width 8
        buf = run_broken("half_warp_exits")
        assert torch.equal(buf[:16], torch.full((16,), 16.0)) and torch.equal(buf[16:32], torch.zeros(16))


@emulated
def test_ptx_mode_follows_sm70_rules():
    """sm_70+ lets exited lanes stay in a mask and exited threads skip a barrier; reading an exited lane's value
    stays undefined."""
    from tests import cuda_emulator

    cuda_emulator.configure(strict=False)
    assert torch.equal(run_broken("exited_lane_in_mask")[:16], torch.ones(16))
    assert torch.equal(run_broken("conditional_syncthreads")[:32], torch.ones(32))
    with pytest.raises(RuntimeError, match="__shfl_sync reads lane 16, which has exited"):
        run_broken("reads_exited_lane")
    cuda_emulator.configure()


# ---- a mutant of the real forward kernel -----------------------------------------------------------------------


@emulated
@pytest.mark.parametrize("strict", [True, False])
def test_mutant_forward_is_caught_where_it_is_wrong(strict):
    """Lanes past D leave the channel pass before the group's shuffles. At D = 32 every lane is active and the
    mutant is correct; at D = 130 (float32: two-channel vectors, 32 lanes, a third pass with one active lane) the
    active lane shuffles with lanes that have left."""
    from dnops import reference
    from tests import cuda_emulator

    cuda_emulator.configure(strict=strict, mutants=cuda_emulator.MUTANTS["inactive_lanes_skip_shuffles"])
    try:
        args = make_inputs(d=32, dtype=torch.float32)
        torch.testing.assert_close(torch.ops.dnops_emulated.ms_deform_attn(*args), reference.ms_deform_attn(*args))
        where = r"\n  at csrc/ms_deform_attn/cuda/ms_deform_attn_cuda.cu:\d+"
        kernel = r"\n  in kernel forward_kernel<scalar_t, geo_t, VEC> .*"
        match = r"__shfl_sync .*(has exited|outside the mask)[^\n]*" + kernel + where
        with pytest.raises(RuntimeError, match=match):
            torch.ops.dnops_emulated.ms_deform_attn(*make_inputs(d=130, dtype=torch.float32))
    finally:
        cuda_emulator.configure()


# ---- lane orders -------------------------------------------------------------------------------------------------

ORDERS = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]


def backward_under_orders(deterministic: bool, arch_ns: str = "dnops_emulated"):
    from tests import cuda_emulator

    # many queries on a 3 x 3 map: every value row collects corners from many lanes of one block
    args = make_inputs(n=1, shapes=((3, 3),), lq=64, m=2, d=4, p=4, dtype=torch.float32)
    g = torch.randn(1, 64, 8)
    op = getattr(torch.ops, arch_ns)._ms_deform_attn_backward
    grads = []
    try:
        torch.use_deterministic_algorithms(deterministic)
        for order, seed in ORDERS:
            cuda_emulator.configure(order, seed)
            grads.append(op(g, *args))
    finally:
        torch.use_deterministic_algorithms(False)
        cuda_emulator.configure()
    return grads


@emulated
@pytest.mark.parametrize("arch_ns", ["dnops_emulated", "dnops_emulated_sm80"])
def test_sorted_backward_is_bitwise_equal_under_every_lane_order(arch_ns):
    grads = backward_under_orders(True, arch_ns)
    for other in grads[1:]:
        for x, y in zip(grads[0], other, strict=True):
            assert torch.equal(x, y)


@emulated
@pytest.mark.parametrize("arch_ns", ["dnops_emulated", "dnops_emulated_sm80"])
def test_atomic_backward_depends_on_the_lane_order_in_the_last_bits(arch_ns):
    """The lane order reaches the results: float atomics add in another order and round differently."""
    grads = backward_under_orders(False, arch_ns)
    value_grads = [g[0] for g in grads]
    assert any(not torch.equal(value_grads[0], other) for other in value_grads[1:])
    for other in value_grads[1:]:
        torch.testing.assert_close(other, value_grads[0], rtol=1e-5, atol=1e-6)
    for other in grads[1:]:  # location and weight gradients are reduced by shuffles in a fixed order
        assert torch.equal(other[1], grads[0][1]) and torch.equal(other[2], grads[0][2])


# ---- the counts ----------------------------------------------------------------------------------------------------


@emulated
def test_counts_of_the_backward_atomics_and_shuffles():
    """Counting on: each warp-level float4 atomic of the sm_90 backward touches whole sectors, and the counts of
    shuffles follow the row's samples (six per sample to share its geometry)."""
    from tests import cuda_emulator

    args = make_inputs(n=1, shapes=((6, 7),), lq=4, m=4, d=32, p=2, dtype=torch.float32, low=0.2, high=0.8)
    cuda_emulator.configure(count=True)
    try:
        torch.ops.dnops_emulated._ms_deform_attn_backward(torch.randn(1, 4, 128), *args)
        (launch,) = cuda_emulator.stats()
    finally:
        cuda_emulator.configure()
    assert launch["kernel"] == "backward_kernel<scalar_t, geo_t, VEC, false>" and launch["blocks_run"] == 1
    (atomics,) = [s for s in launch["sites"] if s["kind"] == "atomic"]
    # 16 rows x 2 samples x 4 corners, all inside the map: 8 lanes x 16 bytes per row, 4 rows per warp
    assert launch["lane_accesses"]["atomic"] == 16 * 2 * 4 * 8
    assert atomics["requests"] == 4 * 2 * 4 and atomics["sectors"] <= 16 * atomics["requests"]
    assert launch["lane_ops"]["__shfl_sync"] == 16 * 8 * 2 * 6
