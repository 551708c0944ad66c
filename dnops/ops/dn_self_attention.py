from __future__ import annotations

import torch

from dnops import _backend, reference

# Ops of this module that have a Triton kernel (the GPU path when no CUDA kernel is compiled).
TRITON_OPS: frozenset[str] = frozenset()


def dn_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_size: int, group_size: int, scale: float | None = None
) -> torch.Tensor:
    """Decoder self-attention under the DN mask, computed on the visible blocks only.

    Equals softmax(q k^T * scale + (-inf where dn_attn_mask blocks)) v without building a (W, W) mask.

    Args:
        q, k, v: (B, H, W, Dh) with W = pad_size + Nq, laid out [DN part | matching part].
        pad_size: length of the DN part, a multiple of group_size; 0 gives plain attention.
        group_size: DN queries per group.
        scale: score scale, default Dh ** -0.5.

    Returns:
        (B, H, W, Dh).
    """
    backend = _backend.choose("dn_self_attention", q.device, TRITON_OPS)
    if backend == "cpp":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return torch.ops.dnops.dn_self_attention(q, k, v, pad_size, group_size, scale)[0]
    return reference.dn_self_attention(q, k, v, pad_size, group_size, scale)
