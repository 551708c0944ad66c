"""DN self-attention, the definition of ``dnops.dn_self_attention``: two equal formulations (the dense masked
softmax and the visible blocks only), and the same attention as two calls of torch's scaled_dot_product_attention
(the ``sdpa`` backend)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dnops.reference.dn_attn_mask import dn_attn_mask
from dnops.validation import check_dn_self_attention_args


def _opmath(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def dn_self_attention_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_size: int, group_size: int, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale, blocked -> -inf) v with the dense (W, W) mask: the literal definition.

    q, k, v: (B, H, W, Dh) -> (B, H, W, Dh). Half types compute in float32.
    """
    check_dn_self_attention_args(q, k, v, pad_size, group_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = _opmath(q, k, v)
    mask = dn_attn_mask(pad_size, group_size, q.shape[2] - pad_size, device=q.device)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return (probs @ vf).to(q.dtype)


def dn_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_size: int, group_size: int, scale: float | None = None
) -> torch.Tensor:
    """The same attention computed on the visible blocks only, never building a (W, W) mask or score matrix.

    Matching queries attend the Nq matching keys; the queries of DN group g attend [group g's keys | matching
    keys] with one softmax over both segments.

    q, k, v: (B, H, W, Dh), W = pad_size + Nq -> (B, H, W, Dh). Half types compute in float32.
    """
    check_dn_self_attention_args(q, k, v, pad_size, group_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = _opmath(q, k, v)
    b, h, _, dh = q.shape
    q_dn, q_m = qf[:, :, :pad_size], qf[:, :, pad_size:]
    k_dn, k_m = kf[:, :, :pad_size], kf[:, :, pad_size:]
    v_dn, v_m = vf[:, :, :pad_size], vf[:, :, pad_size:]
    out_m = ((q_m @ k_m.transpose(-1, -2)) * scale).softmax(-1) @ v_m
    if pad_size == 0:
        return out_m.to(q.dtype)
    groups = pad_size // group_size
    q_g, k_g, v_g = (t.reshape(b, h, groups, group_size, dh) for t in (q_dn, k_dn, v_dn))
    own = (q_g @ k_g.transpose(-1, -2)) * scale  # (B, H, G, gs, gs)
    cross = (q_g @ k_m.transpose(-1, -2).unsqueeze(2)) * scale  # (B, H, G, gs, Nq)
    probs = torch.cat([own, cross], dim=-1).softmax(-1)
    out_dn = probs[..., :group_size] @ v_g + probs[..., group_size:] @ v_m.unsqueeze(2)
    return torch.cat([out_dn.reshape(b, h, pad_size, dh), out_m], dim=2).to(q.dtype)


def dn_self_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_size: int, group_size: int, scale: float | None = None
) -> torch.Tensor:
    """The visible blocks as two ``F.scaled_dot_product_attention`` calls without a mask: the matching queries
    over the matching keys, and every DN group at once (batched over B x H x groups) over [its own keys | the
    matching keys]; on a GPU torch's flash / memory-efficient kernels run them. Differentiable through SDPA.

    q, k, v: (B, H, W, Dh), W = pad_size + Nq -> (B, H, W, Dh), in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, h, _, dh = q.shape
    k_m, v_m = k[:, :, pad_size:], v[:, :, pad_size:]
    out_m = F.scaled_dot_product_attention(q[:, :, pad_size:], k_m, v_m, scale=scale)
    if pad_size == 0:
        return out_m
    groups = pad_size // group_size
    nq = k_m.shape[2]

    def per_group(t: torch.Tensor, matching: torch.Tensor) -> torch.Tensor:
        own = t[:, :, :pad_size].reshape(b, h, groups, group_size, dh)
        return torch.cat([own, matching.unsqueeze(2).expand(b, h, groups, nq, dh)], dim=3)

    q_g = q[:, :, :pad_size].reshape(b, h, groups, group_size, dh)
    out_dn = F.scaled_dot_product_attention(q_g, per_group(k, k_m), per_group(v, v_m), scale=scale)
    return torch.cat([out_dn.reshape(b, h, pad_size, dh), out_m], dim=2)
