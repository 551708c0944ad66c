"""Small tensors made from host values (level sizes, point tables), once per key and device: on a GPU a tensor from
host values is a blocking host-to-device copy per call."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch._guards import detect_fake_mode

from dnops._cache import LRU

T = TypeVar("T")

_MADE: LRU[tuple, object] = LRU(256)


def device_constant(name: str, key: Hashable, device: torch.device, build: Callable[[], T]) -> T:
    """``build()`` (tensors on ``device``) made once per (name, key, device); under torch.compile or fake-tensor
    tracing it is built in the graph on every call, uncached (a traced tensor must not outlive its trace)."""
    if torch.compiler.is_compiling() or detect_fake_mode() is not None:
        return build()
    full = (name, key, device)
    made = _MADE.get(full)
    if made is None:
        made = _MADE[full] = build()
    return made  # type: ignore[return-value]


def host_to_device(host: torch.Tensor, device: torch.device | str, op: str) -> torch.Tensor:
    """``host`` (a CPU tensor made from host values) on ``device`` without waiting for the GPU: copied from pinned
    memory, asynchronously (a copy from pageable memory waits for the stream; torch's pinned-memory allocator keeps
    the buffer until the copy is done). A CUDA graph would replay the copy from a host buffer freed after the call,
    so under capture this raises, naming ``op``."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"dnops.{op}: this path copies host values (GT counts, index tables) to the GPU on every call, which a "
            "CUDA graph cannot capture"
        )
    return host.pin_memory().to(device, non_blocking=True)
