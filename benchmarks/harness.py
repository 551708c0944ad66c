"""Timing and peak-memory measurement shared by the report and the pytest-benchmark suites."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def times_ms_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, min_reps: int = 3, budget_s: float = 2.0
) -> dict[str, list[float]]:
    """Wall times in ms of every repetition of each of ``fns``, the repetitions interleaved (a, c, b, b, a, c, ...).

    On a shared machine whose load drifts, timing one implementation after the other puts them in different
    conditions; interleaving gives every implementation samples from the same stretches of time, so their
    ratios are fair. Each round runs them in a new random order (seeded, so runs repeat): what ran just before
    a call sets how much of its code and data is still cached (a call after the 600-op dn_queries reference took
    ~1.2x as long as the same call after a small op), so a fixed order would favour whoever follows the
    cheapest neighbour. Each gets one warm-up call, then rounds run until ``budget_s`` per implementation has
    passed (at least ``min_reps`` rounds, at most 200).
    """
    for fn in fns.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    shuffle = random.Random(0).shuffle
    start_all = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (time.perf_counter() - start_all < budget_s * len(fns) and rounds < 200):
        shuffle(order)
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return times


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated during one call of ``fn``, above what was live before it.

    CPU: replays the allocator events the profiler records (kernels' internal buffers included);
    CUDA: torch.cuda.max_memory_allocated.
    """
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::masked_select")


def count_dispatched_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """(aten/custom ops dispatched by one call of ``fn``, how many of them force a device sync on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        fn()
    return len(counter.names), sum(name in SYNC_OPS for name in counter.names)
