"""``make gpu-compile-check``: every Triton kernel specialization dnops launches, compiled ahead of time for the GPU.

    python -m tests.gpu_compile [--arch 90 [--arch 80]] [--json PATH] [--cuda-lib dnops/_C...so]

Each Triton op runs on CPU tensors of the GPU suite's and the benchmark's shapes, with Triton's launcher given a
stand-in CUDA driver (the target arch, no device): every launch specializes its arguments exactly as it would on a
GPU (dtypes, integers equal to 1, 16-divisible integers and pointers, the constexprs the op picks) and compiles
instead of running. From each cubin, cuobjdump reads registers, stack and shared memory, and its SASS the spill
(local-memory) instructions, tensor-core instructions (HGMMA = wgmma, HMMA / DMMA = mma) and reductions (RED,
vector with .F32x2 / .F32x4) and atomics (ATOM). The CUDA kernels of the nvcc build get the same columns.

It exits non-zero on a compile error, on any local memory in a CUDA kernel, and on any spill instruction or stack
in a Triton kernel run at the benchmark shapes in float32 / float16 / bfloat16 (float64 and the tests' odd shapes
are reported, not held to it). Results: a JSON of every row (``--json``), and ``--table`` renders them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the launches must be the compiled ones

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


class StandInDriver:
    """The driver calls a launch makes, answered for ``arch`` without a device."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch: int, sink: list, tag: list) -> Iterator[None]:
    """Inside the block, a Triton launch compiles for ``arch`` and returns; each launch's kernel goes to ``sink``
    as (tag[0], jit function, specialization key, CompiledKernel or the exception). Every launch compiles (from
    Triton's disk cache when it has the kernel), so each is recorded with the tag it ran under."""
    run, do_compile = JITFunction.run, JITFunction._do_compile

    def compile_instead(self, *args, grid, warmup, **kwargs):
        self.device_caches.clear()
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    def record(self, key, *args, **kwargs):
        try:
            kernel = do_compile(self, key, *args, **kwargs)
        except Exception as exc:  # a compile error is a result of the check
            sink.append((tag[0], self, key, exc))
            return None
        sink.append((tag[0], self, key, kernel))
        return kernel

    saved = driver._active  # not .active: reading it would create the real driver, which needs a GPU
    driver.set_active(StandInDriver(arch))
    JITFunction.run, JITFunction._do_compile = compile_instead, record
    try:
        yield
    finally:
        JITFunction.run, JITFunction._do_compile = run, do_compile
        driver.set_active(saved)


# ---- what the ops launch -----------------------------------------------------------------------------------------


def _msda_cases() -> Iterator[tuple[str, dict]]:
    from benchmarks.cases import MSDA_CASES

    # the GPU tests' shapes (tests/test_ms_deform_attn.py), then the benchmark's
    for kw in (
        {"d": 32},
        {"d": 1},
        {"d": 30},
        {"d": 71},
        {"d": 130, "lq": 2},
        {"d": 257, "lq": 2, "m": 1},
        {"d": 8, "shapes": ((5, 7),)},
        {"d": 16, "p": 1},
        {"d": 4, "shapes": ((5, 2), (1, 1), (2, 7)), "m": 3, "p": 3},
        {"d": 64},
        {"n": 2, "shapes": ((3, 4), (2, 2)), "lq": 9, "m": 2, "d": 8, "p": 2},
    ):
        yield "tests", kw
    for name, case in MSDA_CASES.items():
        yield f"bench:{name}", {"case": case}
    from benchmarks.cases import RT_CASES

    for name, case in RT_CASES.items():  # a point count per level
        yield f"bench:{name}", {"rt": case}


def _rt_args(case, dtype: torch.dtype) -> tuple[tuple, list[int]]:
    """A real-time DETR case as the kernels receive it: (value, spatial_shapes, level_start_index, locations
    (N, Lq, M, sum_l P_l, 2), weights), and the counts."""
    from benchmarks.cases import rt_inputs

    value, shapes, loc, weights, points = rt_inputs(case, dtype=dtype)
    shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = shapes.prod(1)
    return (value, shapes, torch.cumsum(sizes, 0) - sizes, loc, weights), points


def run_ms_deform_attn(dtypes) -> Iterator[str]:
    from benchmarks.cases import msda_inputs
    from dnops.triton.ms_deform_attn import ms_deform_attn_triton, ms_deform_attn_triton_backward
    from tests.msda_utils import make_inputs

    for origin, kw in _msda_cases():
        for dtype in dtypes:
            points = None
            if "case" in kw:
                args = msda_inputs(kw["case"], dtype=dtype)
            elif "rt" in kw:
                args, points = _rt_args(kw["rt"], dtype)
            else:
                args = [t.to(dtype) if t.is_floating_point() else t for t in make_inputs(**kw)]
            # bilinear and discrete sampling everywhere but at the Deformable-DETR benchmark shapes (bilinear only);
            # a half value also with float32 locations and weights (the AMP pair)
            geometries = [args[3].dtype] + ([torch.float32] if dtype in (torch.float16, torch.bfloat16) else [])
            for geometry in geometries:
                pair = [*args[:3], args[3].to(geometry), args[4].to(geometry)]
                for logits, discrete in itertools.product(
                    (False, True), (False, True) if "case" not in kw else (False,)
                ):
                    yield origin, dtype
                    ms_deform_attn_triton(*pair, logits, points, discrete)
                    g = torch.zeros(
                        pair[0].shape[0], pair[3].shape[1], pair[0].shape[2] * pair[0].shape[3], dtype=dtype
                    )
                    ms_deform_attn_triton_backward(g, *pair, logits, points, discrete)


def run_dn_self_attention(dtypes) -> Iterator[str]:
    from benchmarks.cases import DN_ATTN_CASES
    from dnops.triton.dn_self_attention import dn_self_attention_triton, dn_self_attention_triton_backward

    # (origin, groups, group size, matching queries, Dh, B, H): the GPU suite's shapes, then the benchmark's
    cases = [("tests", *shape, 2, 3) for shape in ((2, 3, 5, 16), (3, 5, 7, 30), (1, 8, 10, 64), (0, 1, 9, 71))]
    cases += [("tests", 4, 5, 20, 32, 2, 3)]
    for name, c in DN_ATTN_CASES.items():
        cases.append((f"bench:{name}", c.groups, c.group_size, c.num_queries, c.head_dim, c.batch, c.heads))
    for origin, groups, size, queries, dh, b, h in cases:
        pad = groups * size
        for dtype in dtypes:
            yield origin, dtype
            q = k = v = torch.zeros(b, h, pad + queries, dh, dtype=dtype)
            out, lse = dn_self_attention_triton(q, k, v, pad, size if pad else 0, dh**-0.5)
            dn_self_attention_triton_backward(out, q, k, v, out, lse, pad, size if pad else 0, dh**-0.5)


def run_dn_queries(dtypes) -> Iterator[str]:
    from benchmarks.cases import dn_inputs
    from dnops.triton.dn_queries import dn_queries_triton

    for origin, batch in (("tests", 4), ("bench:B=32", 32)):
        labels, boxes, counts = dn_inputs(batch)
        for dtype in dtypes:
            # DN, CDN, and CDN with D-FINE's sizes (abs_size)
            for contrastive, abs_size in ((False, False), (True, False), (True, True)):
                yield origin, dtype
                # a 62-bit seed, as the ones drawn (a seed of 1 would be specialized to a constant)
                args = (labels, boxes.to(dtype), counts, 5, max(counts), contrastive, 91, 0.2, 0.4, 2**61 + 7)
                dn_queries_triton(*args, abs_size)


RUNNERS: dict[str, Callable] = {
    "ms_deform_attn": run_ms_deform_attn,
    "dn_self_attention": run_dn_self_attention,
    "dn_queries": run_dn_queries,
}

# ---- reading a cubin -----------------------------------------------------------------------------------------------


def _cuobjdump() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else "cuobjdump"


def _resources(path: str) -> dict[tuple[int, str], dict]:
    """Per (arch, kernel function) of a cubin or fat binary: registers, stack, shared and local bytes, and the
    SASS's spill (STL / LDL), tensor-core, reduction and atomic instruction counts."""
    out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    rows: dict[tuple[int, str], dict] = {}
    name, arch = None, 0
    for line in out.stdout.splitlines():
        if m := re.search(r"arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.search(r"Function (\S+):", line):
            name = m.group(1)
        elif name and "REG:" in line:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows[arch, name] = {k.lower(): int(vals.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}
    sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    current = None
    for line in sass.splitlines():
        if m := re.search(r"code for sm_(\d+)", line):
            arch = int(m.group(1))
            continue
        if m := re.search(r"Function : (\S+)", line):
            # a lone cubin's resource usage names no arch: its rows are under arch 0
            key = (0, m.group(1)) if (0, m.group(1)) in rows else (arch, m.group(1))
            current = rows.setdefault(key, {"reg": 0, "stack": 0, "shared": 0, "local": 0})
            current.update(spill_stores=0, spill_loads=0, wgmma=0, mma=0, red=0, red_vector=0, atom=0)
            continue
        if current is None or "*/" not in line:
            continue
        instr = line.split("*/", 1)[1].strip()
        op = re.sub(r"^@!?U?P\w+\s+", "", instr).split(" ", 1)[0]
        if op.startswith("STL"):
            current["spill_stores"] += 1
        elif op.startswith("LDL"):
            current["spill_loads"] += 1
        elif op.startswith("HGMMA"):
            current["wgmma"] += 1
        elif op.startswith(("HMMA", "DMMA")):
            current["mma"] += 1
        elif re.match(r"REDG?(\.|$)", op):  # RED (sm_80), REDG (sm_90); not REDUX, the warp's uniform reduction
            current["red"] += 1
            current["red_vector"] += "F32x" in op
        elif re.match(r"ATOMG?(\.|$)", op):
            current["atom"] += 1
    return rows


def _describe_key(key) -> str:
    """The whole key: a cut one would merge specializations that differ in a later constexpr (a tile size)."""
    return re.sub(r"\s+", " ", str(key))


def triton_rows(arch: int, ops: list[str], dtypes) -> list[dict]:
    """One row per (kernel, specialization) the ops launch, with where it was launched from (``origins``: the
    test shapes and the benchmark cases, with dtypes)."""
    rows: dict[tuple[str, str], dict] = {}
    for op in ops:
        sink: list = []
        tag = [None]
        with compile_only(arch, sink, tag):
            for tag[0] in RUNNERS[op](dtypes):
                pass
        for (origin, dtype), fn, key, kernel in sink:
            ident = (fn.fn.__qualname__, _describe_key(key))
            where = f"{origin}:{str(dtype).removeprefix('torch.')}"
            if ident in rows:
                if where not in rows[ident]["origins"]:
                    rows[ident]["origins"].append(where)
                continue
            row = {"op": op, "kernel": ident[0], "arch": arch, "key": ident[1], "origins": [where]}
            rows[ident] = row
            if isinstance(kernel, Exception):
                row["error"] = f"{type(kernel).__name__}: {str(kernel).strip().splitlines()[-1:]}"
                continue
            row.update(num_warps=kernel.metadata.num_warps, shared_bytes=kernel.metadata.shared)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                ((_, res),) = _resources(f.name).items()
            row.update(res)
    return list(rows.values())


def on_hot_path(row: dict) -> bool:
    """Launched at a benchmark shape in float32 / float16 / bfloat16."""
    return any(o.startswith("bench:") and not o.endswith("float64") for o in row.get("origins", []))


# The CUDA kernels the default GPU path runs at the benchmark shapes on the lent GPU (sm_90; D = 32: four float32 /
# eight 16-bit channels per lane, the atomic backward), which must not touch local memory; the others (sm_80's
# included) are reported.
HOT_CUDA = (
    "forward_kernel<float, 4>",
    "forward_kernel<c10::BFloat16, 8>",
    "forward_kernel<c10::Half, 8>",
    "backward_kernel<float, 4, false>",
    "backward_kernel<c10::BFloat16, 8, false>",
    "backward_kernel<c10::Half, 8, false>",
    "dn_queries_kernel<",
    "dn_attn_mask_kernel",
)


def cuda_rows(lib: str) -> list[dict]:
    """The nvcc build's kernels, per arch in the library."""
    rows = []
    for (arch, name), res in sorted(_resources(lib).items()):
        demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
        demangled = re.sub(r"\(anonymous namespace\)::|dnops::", "", demangled).split("(", 1)[0]
        demangled = demangled.removeprefix("void ")
        hot = arch == 90 and demangled.startswith(HOT_CUDA)
        rows.append({"op": "cuda", "kernel": demangled, "arch": arch, "hot": hot, **res})
    return rows


def _constexprs(key: str) -> str:
    """The constexpr values of a specialization key (dtypes, flags, tile sizes), as the table names it."""
    values = re.findall(r"\('constexpr', ([^)]*)\)", key)
    return ", ".join(v.replace("triton.language.", "") for v in values)


def _ints(key: str) -> str:
    """The integer arguments' specialization: D (divisible by 16) or 1 per i32 / i64 argument."""
    marks = re.findall(r"\('i(?:32|64)', '(D?)'\)", key)
    return "".join(m or "." for m in marks)


def table(results: list[dict]) -> str:
    """The markdown of every row of ``results`` (one dict per Triton version, as --json writes)."""
    lines = [
        "# What the GPU kernels compile to",
        "",
        "Written by `make gpu-compile-check` (tests/gpu_compile.py): every Triton kernel specialization the ops launch",
        "at the GPU suite's and the benchmark's shapes, compiled ahead of time for sm_90 by each Triton below, and",
        "the nvcc build's CUDA kernels. `regs`: registers per thread; `spill st / ld`: local-memory store / load",
        "instructions in the SASS; `stack`, `shared`: bytes; `wgmma` / `mma`: tensor-core instructions; `red` /",
        "`red vec` / `atom`: reductions, vector (F32x2 / F32x4) reductions, atomics. `ints`: per integer argument, D",
        "(specialized as divisible by 16) or `.`; `origins`: where the launches come from (bench: = a benchmark",
        "shape). CI fails on a compile error, on local memory in a CUDA kernel, and on any spill instruction or",
        "stack in a Triton kernel at a benchmark shape in float32 / float16 / bfloat16.",
    ]
    cols = "| kernel | constexprs | ints | regs | spill st / ld | stack | shared | wgmma | mma | red | red vec | atom |"
    for result in results:
        summary = result["summary"]
        lines += ["", f"## Triton {summary['triton']} (torch {summary['torch']})", ""]
        lines += [
            f"{summary['rows']} kernels, {summary['errors']} compile errors, {summary['spilling']} spilling, "
            f"{summary['spilling_on_the_benchmark_path']} of them at a benchmark shape.",
            "",
        ]
        triton_rows = [r for r in result["rows"] if r["op"] != "cuda"]
        for op in sorted({r["op"] for r in triton_rows}):
            lines += ["", f"### {op}", "", cols + " origins |", "|" + "---|" * 13]
            for r in (r for r in triton_rows if r["op"] == op):
                if "error" in r:
                    lines.append(f"| {r['kernel']} | {_constexprs(r['key'])} | {_ints(r['key'])} | compile error: "
                                 f"{r['error']} |||||||||")  # fmt: skip
                    continue
                lines.append(
                    f"| {r['kernel']} | {_constexprs(r['key'])} | {_ints(r['key'])} | {r['reg']} | "
                    f"{r['spill_stores']} / {r['spill_loads']} | {r['stack']} | {r['shared']} | {r['wgmma']} | "
                    f"{r['mma']} | {r['red']} | {r['red_vector']} | {r['atom']} | {', '.join(r['origins'])} |"
                )
        cuda = [r for r in result["rows"] if r["op"] == "cuda"]
        if cuda:
            lines += ["", "### CUDA kernels (nvcc)", ""]
            lines += ["`hot`: run by the default GPU path at the benchmark shapes on the lent GPU (sm_90).", ""]
            lines += ["| kernel | arch | hot | regs | spill st / ld | stack | red | red vec | atom |"]
            lines.append("|---|---|---|---|---|---|---|---|---|")
            for r in sorted(cuda, key=lambda r: (r["kernel"], r["arch"])):
                lines.append(
                    f"| `{r['kernel']}` | sm_{r['arch']} | {'yes' if r['hot'] else ''} | {r['reg']} | "
                    f"{r.get('spill_stores', 0)} / {r.get('spill_loads', 0)} | {r['stack']} | {r.get('red', 0)} | "
                    f"{r.get('red_vector', 0)} | {r.get('atom', 0)} |"
                )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, help="with --table: the --json files to render")
    parser.add_argument("--table", type=Path, help="render the results given into this markdown file and exit")
    parser.add_argument("--arch", type=int, action="append", help="default: 90")
    parser.add_argument("--op", action="append", choices=sorted(RUNNERS), help="default: every op")
    parser.add_argument("--dtype", action="append", choices=[str(d).removeprefix("torch.") for d in DTYPES])
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--cuda-lib", help="also read the CUDA kernels of this nvcc-built library")
    args = parser.parse_args()
    if args.table:
        args.table.write_text(table([json.loads(p.read_text()) for p in args.results]))
        return 0
    start = time.time()
    rows = []
    for arch in args.arch or [90]:
        dtypes = [d for d in DTYPES if args.dtype is None or str(d).removeprefix("torch.") in args.dtype]
        rows += triton_rows(arch, args.op or sorted(RUNNERS), dtypes)
    if args.cuda_lib:
        rows += cuda_rows(args.cuda_lib)
    errors = [r for r in rows if "error" in r]
    spills = [r for r in rows if r.get("spill_stores", 0) or r.get("spill_loads", 0) or r.get("local", 0)]
    # the CUDA kernels of the default GPU path: no local memory; Triton kernels at a benchmark shape: no stack either
    hot_spills = [r for r in rows if (r.get("hot") and r in spills) or (on_hot_path(r) and (r in spills or r["stack"]))]
    for r in rows:
        print(json.dumps(r))
    summary = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "rows": len(rows),
        "errors": len(errors),
        "spilling": len(spills),
        "spilling_on_the_benchmark_path": len(hot_spills),
        "seconds": round(time.time() - start),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    for r in errors:
        print(f"compile error: {r['kernel']} {r['key']}: {r['error']}", file=sys.stderr)
    for r in hot_spills:
        print(f"spills at a benchmark shape: {r['kernel']} {r.get('origins', '')} {r['key']}", file=sys.stderr)
    return 1 if errors or hot_spills else 0


if __name__ == "__main__":
    sys.exit(main())
