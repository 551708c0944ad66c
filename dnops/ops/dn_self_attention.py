from __future__ import annotations

import torch

from dnops import _backend, reference
from dnops._autograd import register_dn_self_attention
from dnops.validation import check_dn_self_attention_args, structure_int

if _backend.HAS_C:

    def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    @torch.library.register_fake("dnops::dn_self_attention")
    def _(q, k, v, pad_size, group_size, scale):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))

    def _grad_like(t):
        # (B, W, H, Dh) in memory, the layout of ATen's CPU flash-attention gradients the kernel passes on
        b, h, w, d = t.shape
        return t.new_empty((b, w, h, d)).transpose(1, 2)

    @torch.library.register_fake("dnops::_dn_self_attention_backward")
    def _(grad_out, q, k, v, out, lse, pad_size, group_size, scale):
        return _grad_like(q), _grad_like(k), _grad_like(v)

    register_dn_self_attention("dnops::dn_self_attention", "dnops::_dn_self_attention_backward")


def dn_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_size: int, group_size: int, scale: float | None = None
) -> torch.Tensor:
    """Decoder self-attention under the DN mask, computed on the visible blocks only.

    Equals softmax(q k^T * scale + (-inf where dn_attn_mask blocks)) v without building a (W, W) mask or a
    (W, W) score matrix: matching queries attend the matching keys; DN group g attends [group g | matching keys].

    Args:
        q, k, v: (B, H, W, Dh) with W = pad_size + Nq, laid out [DN part | matching part].
        pad_size: length of the DN part, a multiple of group_size; 0 gives plain attention.
        group_size: DN queries per group. Both integers (a numpy integer, an integral float or 0-dim tensor too).
        scale: score scale, default Dh ** -0.5.

    Returns:
        (B, H, W, Dh).
    """
    if _backend.exporting():
        raise RuntimeError(
            "dnops.dn_self_attention is not exported: DN structure exists in training only. Export the model in "
            "eval mode, without dn= or DN queries (DNMultiheadAttention then exports as nn.MultiheadAttention)"
        )
    pad_size = structure_int(pad_size, "pad_size", "dn_self_attention")
    group_size = structure_int(group_size, "group_size", "dn_self_attention")
    check_dn_self_attention_args(q, k, v, pad_size, group_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = _backend.choose("dn_self_attention", q.device)
    if _backend.is_compiled(backend):
        return torch.ops.dnops.dn_self_attention.default(q, k, v, pad_size, group_size, scale)[0]
    if backend == "triton":
        from dnops.triton.dn_self_attention import dn_self_attention_triton

        return dn_self_attention_triton(q, k, v, pad_size, group_size, scale)[0]
    if backend == "sdpa":
        return reference.dn_self_attention_sdpa(q, k, v, pad_size, group_size, scale)
    return reference.dn_self_attention(q, k, v, pad_size, group_size, scale)
