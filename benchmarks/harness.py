"""Clocks, memory and op counts: how every benchmark entry point measures (benchmarks.runner calls these).

A clock times a group of implementations (``Impl``: called with the index of the input set to use) and returns
every repetition's milliseconds per implementation. Two clocks, one interface: ``WallClock`` on the CPU,
``CudaEvents`` on a GPU.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Protocol

import torch
from torch.profiler import ProfilerActivity, profile

Impl = Callable[[int], object]


class Clock(Protocol):
    """Times a group of implementations whose first call the runner has made (at least ``min_reps`` times each)."""

    def times_ms(self, fns: dict[str, Impl], sets: int, min_reps: int = 0) -> dict[str, list[float]]: ...


class WallClock:
    """Wall time of every repetition, the implementations of a group interleaved (a, c, b, b, a, c, ...).

    On a shared machine whose load drifts, timing one implementation after the other puts them in different
    conditions; interleaving gives every implementation samples from the same stretches of time, so their
    ratios are fair. Each round runs them in a new random order (seeded, so runs repeat): what ran just before
    a call sets how much of its code and data is still cached (a call after the 600-op dn_queries reference took
    ~1.2x as long as the same call after a small op), so a fixed order would favour whoever follows the
    cheapest neighbour. Rounds run until ``budget_s`` per implementation has passed (at least ``min_reps``
    rounds, at most ``max_reps``).
    """

    def __init__(self, budget_s: float = 2.0, min_reps: int = 3, max_reps: int = 200) -> None:
        self.budget_s, self.min_reps, self.max_reps = budget_s, min_reps, max_reps

    def times_ms(self, fns: dict[str, Impl], sets: int, min_reps: int = 0) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {name: [] for name in fns}
        order = list(fns.items())
        shuffle = random.Random(0).shuffle
        start_all = time.perf_counter()
        rounds = 0
        while rounds < max(self.min_reps, min_reps) or (
            time.perf_counter() - start_all < self.budget_s * len(fns) and rounds < self.max_reps
        ):
            shuffle(order)
            for name, fn in order:
                t0 = time.perf_counter()
                fn(rounds % sets)
                times[name].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
        return times


class CudaEvents:
    """CUDA events around each of ``reps`` calls after ``warmup`` calls, one implementation after the other; the
    calls rotate among the input sets, so that a call does not find its inputs in L2 from the call before."""

    def __init__(self, reps: int = 20, warmup: int = 3) -> None:
        self.reps, self.warmup = reps, warmup

    def times_ms(self, fns: dict[str, Impl], sets: int, min_reps: int = 0) -> dict[str, list[float]]:
        times = {}
        reps = max(self.reps, min_reps)
        for name, fn in fns.items():
            for i in range(1, self.warmup):  # the runner made the first call
                fn(i % sets)
            torch.cuda.synchronize()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for i, (start, end) in enumerate(events):
                start.record()
                fn(i % sets)
                end.record()
            torch.cuda.synchronize()
            times[name] = [s.elapsed_time(e) for s, e in events]
        return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large copy (read + write) on ``device``, the memory ceiling of the bounds."""
    src = torch.randn(2**28 if device.type == "cuda" else 2**24, device=device)  # 1 GiB (64 MiB on the CPU)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / (_median_ms(lambda: a @ a, device) * 1e-3) / 1e12


def _median_ms(fn: Callable[[], object], device: torch.device) -> float:
    fn()
    clock = CudaEvents(20, warmup=2) if device.type == "cuda" else WallClock(budget_s=0.0, min_reps=5)
    return statistics.median(clock.times_ms({"fn": lambda i: fn()}, 1)["fn"])


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
