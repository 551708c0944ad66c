"""The CUDA emulator: dnops' unmodified .cu files compiled for the CPU against a model of CUDA's execution.

``make test-cuda-emulated`` builds the library (tests/cuda_emulator/build.py) and runs the emulated half of the
GPU suite with it; ``DNOPS_CUDA_EMULATOR`` names the library for the test process. Loaded, the kernels are the
CPU kernels of op libraries ``dnops_emulated`` (built for sm_90) and ``dnops_emulated_sm80`` (the kernels whose
code depends on the arch, built for sm_80), with dnops' own schemas; ``routed(arch)`` makes dnops' public
functions call them for CPU tensors, so a GPU test runs unchanged on the emulator.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator

import torch

from dnops._autograd import register_ms_deform_attn
from dnops._registry import OPS

NAMESPACES = {90: "dnops_emulated", 80: "dnops_emulated_sm80"}
# the ops the .cu files implement (their backward included): the registry's CUDA kernels
CUDA_OPS = tuple(schema for op in OPS.values() if "cuda" in op.compiled for schema in op.kernels)
MUTANTS = {"inactive_lanes_skip_shuffles": 1 << 1}


def library_path() -> str | None:
    return os.environ.get("DNOPS_CUDA_EMULATOR") or None


def _define(namespace: str) -> torch.library.Library:
    lib = torch.library.Library(namespace, "DEF")
    for name in CUDA_OPS:
        schema = str(getattr(torch.ops.dnops, name).default._schema)
        lib.define(schema.split("::", 1)[1])

    register_ms_deform_attn(f"{namespace}::ms_deform_attn", f"{namespace}::_ms_deform_attn_backward")

    # no tensor input: as in csrc/dn_attn_mask/dn_attn_mask.cpp, a BackendSelect kernel picks the (CPU) kernel
    def select_backend(pad_size, group_size, num_queries, *, device=None):
        op = getattr(torch.ops, namespace).dn_attn_mask.default
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        return op.redispatch(keys, pad_size, group_size, num_queries, device=device)

    lib.impl("dn_attn_mask", select_backend, "BackendSelect")
    return lib


@functools.cache
def load() -> tuple[torch.library.Library, ...]:
    """Defines the emulated op libraries and loads the kernels (once per process)."""
    import dnops  # noqa: F401  (dnops' schemas)

    path = library_path()
    if path is None:
        raise RuntimeError("DNOPS_CUDA_EMULATOR is not set: build the emulator with make test-cuda-emulated")
    libs = tuple(_define(ns) for ns in NAMESPACES.values())
    torch.ops.load_library(path)
    return libs


def configure(
    order: str = "forward",
    seed: int = 0,
    strict: bool = True,
    block_stride: int = 1,
    count: bool = False,
    mutants: int = 0,
) -> None:
    """Lane order (forward, reverse, random with ``seed``), strict or sm_70+ PTX rules, every ``block_stride``-th
    block only, counting on or off, mutations switched on (bits of MUTANTS); clears the counts."""
    load()
    torch.ops.cuemu.configure(order, seed, strict, block_stride, count, mutants)


def default_order() -> tuple[str, int]:
    """The lane order the suite runs in: DNOPS_EMULATOR_ORDER = forward | reverse | random[:seed]."""
    order, _, seed = os.environ.get("DNOPS_EMULATOR_ORDER", "forward").partition(":")
    return order, int(seed or 0)


def stats() -> list[dict]:
    """What every launch since configure() did (counting on): collectives, atomics, sectors."""
    return json.loads(torch.ops.cuemu.stats())


@contextlib.contextmanager
def routed(arch: int = 90) -> Iterator[None]:
    """Inside the block, dnops' compiled ops on CPU tensors run the emulated CUDA kernels of ``arch``."""
    load()
    namespace = getattr(torch.ops, NAMESPACES[arch])
    saved = {name: getattr(torch.ops.dnops, name) for name in CUDA_OPS}
    try:
        for name in CUDA_OPS:
            setattr(torch.ops.dnops, name, getattr(namespace, name))
        yield
    finally:
        for name, op in saved.items():
            setattr(torch.ops.dnops, name, op)
