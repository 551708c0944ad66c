"""Philox4x32-10 in integer torch ops, bit-identical to Triton's ``tl.randint4x`` / ``tl.rand``.

Every value is held in int64 and every 32x32-bit product is split into 16-bit halves, so nothing overflows:
the C++, CUDA and Triton kernels compute the same uint32 words with native 32-bit arithmetic.
Conventions (Triton's): key = (seed & 0xFFFFFFFF, seed >> 32); counter = (c0, c1, c2, c3) with
``tl.randint4x(seed, offset)`` using (offset & 0xFFFFFFFF, offset >> 32, 0, 0).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10  # Triton's int32 -> [0, 1) scale, ((2**23 - 1) / 2**23) * 2**-31


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product of the constant ``a`` and uint32 values ``b``."""
    lo16 = a * (b & 0xFFFF)
    hi16 = a * (b >> 16)
    hi = (hi16 + (lo16 >> 16)) >> 16
    lo = (((hi16 & 0xFFFF) << 16) + lo16) & MASK32
    return hi, lo


def philox4x32(
    seed: int | torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, rounds: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four uint32 words (as int64 tensors) per counter (c0, c1, c2, c3), each an int64 tensor in [0, 2**32).
    ``seed``: an int, or a 0-dim int64 tensor in [0, 2**62) (a seed drawn inside a compiled graph)."""
    if not isinstance(seed, torch.Tensor) and not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


@torch.library.custom_op("dnops::_philox4x32", mutates_args=())
def _philox4x32_op(
    seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    words = philox4x32(seed, *torch.broadcast_tensors(c0, c1, c2, c3))
    return tuple(w.contiguous() for w in words)


@_philox4x32_op.register_fake
def _(seed, c0, c1, c2, c3):
    shape = torch.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape)
    return tuple(c0.new_empty(shape) for _ in range(4))


def philox4x32_compilable(
    seed: int | torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """philox4x32 (ten rounds); under torch.compile one opaque op. Inlined, inductor fuses the ten rounds into one
    expression in which every word appears several times: its lowering grows as a tree, exponentially (a seed
    known while tracing, one image: no compile finished in 15 minutes)."""
    if not torch.compiler.is_compiling():
        return philox4x32(seed, c0, c1, c2, c3)
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed, dtype=torch.int64, device=c0.device)
    return torch.ops.dnops._philox4x32(seed, c0, c1, c2, c3)


def randint4x(seed: int, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tl.randint4x(seed, offset)`` for int64 ``offset``: four uint32 words as int64 tensors."""
    offset = offset.to(torch.int64)
    zero = torch.zeros_like(offset)
    return philox4x32(seed, offset & MASK32, (offset >> 32) & MASK32, zero, zero)


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """``tl.rand``'s conversion of uint32 words to float32 in [0, 1): reinterpret as int32, fold negatives, scale."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)
