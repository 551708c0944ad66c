"""The coalescing model: the CUDA kernels' memory requests on the benchmark shapes, counted by the emulator.

    python -m tests.cuda_emulator.counts [--out docs/results/cuda_counts.json]

Runs each case in the emulator's counting build (tests/cuda_emulator/build.py, variant ``count``) on a sample of
the launch's blocks (every ``stride``-th) and reports per kernel and source line: warp-level requests (the lanes
of a warp that execute one load, store or atomic instruction together), the distinct 32-byte sectors each request
touches and the lanes in it. A request of 32 lanes moving 16 bytes each touches 16 sectors when fully coalesced.
It is a model of the memory system, not a profile: no caches, no timing, and the instruction stream is g++'s for
the CPU (a vectorized loop may issue other widths than nvcc's code); docs/kernels.md says how far it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import torch

from tests.cuda_emulator.build import ROOT, build

CASES = {
    # name: (what it runs, block stride)
    "ms_deform_attn forward, enc800, float32": ("msda_forward", torch.float32, 97),
    "ms_deform_attn forward, enc800, bfloat16": ("msda_forward", torch.bfloat16, 97),
    "ms_deform_attn backward, enc800, float32": ("msda_backward", torch.float32, 97),
    "dn_queries, B = 32, DN": ("dn_queries_dn", torch.float32, 1),
    "dn_queries, B = 32, CDN": ("dn_queries_cdn", torch.float32, 1),
}


def _run(what: str, dtype: torch.dtype) -> None:
    from benchmarks.cases import MSDA_CASES, dn_inputs, msda_inputs

    if what.startswith("msda"):
        value, shapes, starts, loc, weights = msda_inputs(MSDA_CASES["enc800"], dtype=dtype)
        if what == "msda_forward":
            torch.ops.dnops_emulated.ms_deform_attn(value, shapes, starts, loc, weights)
        else:
            g = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=dtype)
            torch.ops.dnops_emulated._ms_deform_attn_backward(g, value, shapes, starts, loc, weights)
        return
    labels, boxes, counts = dn_inputs(32)
    cdn = what.endswith("cdn")
    groups, max_gt = (1, max(counts)) if cdn else (5, max(counts))
    torch.ops.dnops_emulated.dn_queries(labels, boxes, counts, groups, max_gt, cdn, 91, 0.25, 0.4, 7)


def _relative(where: str) -> str:
    """A debug-info path (the build's directory joined with the #line name, or a mirrored header) from the
    repository root."""
    return re.sub(r"^.*?/(csrc|tests)/", r"\1/", where)


def _resolve(sites: list[dict]) -> None:
    """Names each instruction site by its .cu line: the outermost line of the inline chain in a .cu file, and the
    innermost (the helper that issues the access) when it differs."""
    by_object: dict[str, list[dict]] = defaultdict(list)
    for site in sites:
        if "+0x" in site["where"]:
            obj, offset = site["where"].rsplit("+", 1)
            by_object[obj].append((site, offset))
    for obj, items in by_object.items():
        # with -i each address prints its inline chain; a sentinel address (no line: "??") ends each chain
        chains, chain = [], []
        proc = subprocess.run(
            ["addr2line", "-i", "-e", obj],
            input="".join(f"{offset}\n0x0\n" for _, offset in items),
            capture_output=True,
            text=True,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("??"):
                chains.append(chain)
                chain = []
            else:
                chain.append(line.split(" (")[0])
        for (site, _), locs in zip(items, chains, strict=True):
            cu = [loc for loc in locs if ".cu:" in loc]
            if not cu:
                site["where"] = _relative(locs[0]) if locs else "?"
                continue
            outer, inner = (_relative(loc) for loc in (cu[-1], cu[0]))
            site["where"] = outer if outer == inner else f"{outer} (via line {inner.rsplit(':', 1)[1]})"


def measure() -> dict:
    from tests import cuda_emulator

    results = []
    for name, (what, dtype, stride) in CASES.items():
        cuda_emulator.configure(block_stride=stride, count=True)
        _run(what, dtype)
        launches = cuda_emulator.stats()
        for launch in launches:
            _resolve(launch["sites"])
            merged: dict[tuple[str, str], dict] = {}
            for site in launch["sites"]:
                m = merged.setdefault((site["where"], site["kind"]), {"requests": 0, "sectors": 0, "lanes": 0})
                for k in ("requests", "sectors", "lanes"):
                    m[k] += site[k]
            launch["sites"] = [
                {
                    "where": where,
                    "kind": kind,
                    **m,
                    "sectors_per_request": round(m["sectors"] / m["requests"], 2),
                    "lanes_per_request": round(m["lanes"] / m["requests"], 2),
                }
                for (where, kind), m in sorted(merged.items())
            ]
        results.append({"case": name, "block_stride": stride, "launches": launches})
    cuda_emulator.configure()
    return {"torch": torch.__version__, "cases": results}


def table(data: dict) -> str:
    lines = [
        "| case | kernel | site | kind | requests | sectors / request | lanes / request |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in data["cases"]:
        for launch in case["launches"]:
            for site in launch["sites"]:
                lines.append(
                    f"| {case['case']} | {launch['kernel']} | {site['where'].split('/')[-1]} | {site['kind']} | "
                    f"{site['requests']} | {site['sectors_per_request']} | {site['lanes_per_request']} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "cuda_counts.json")
    args = parser.parse_args()
    os.environ["DNOPS_CUDA_EMULATOR"] = str(build(["count"])["count"])
    data = measure()
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


if __name__ == "__main__":
    main()
