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
