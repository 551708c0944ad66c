from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dnops.ops.dn_attn_mask import dn_attn_mask, made_mask_structure
from dnops.ops.dn_self_attention import dn_self_attention


def _size(x: Any) -> int:
    # a SymInt (a per-batch size under torch.compile) stays symbolic: int() would specialize the graph on it
    return x if isinstance(x, torch.SymInt) else int(x)


def _structure_of(dn: Any) -> tuple[int, int] | None:
    """(pad_size, group_size) from a DNQueries, a DN-DETR mask_dict / DINO dn_meta, or a plain pair."""
    if dn is None:
        return None
    if isinstance(dn, tuple | list) and len(dn) == 2:
        return _size(dn[0]), _size(dn[1])
    if isinstance(dn, dict):
        pad = _size(dn["pad_size"])
        if "group_size" in dn:
            return pad, _size(dn["group_size"])
        if "num_dn_group" in dn:  # DINO's dn_meta
            return pad, pad // max(_size(dn["num_dn_group"]), 1)
        if "known_indice" in dn and "batch_idx" in dn:  # DN-DETR's mask_dict: groups x known GT, from shapes only
            groups = dn["known_indice"].numel() // max(dn["batch_idx"].numel(), 1)
            return pad, pad // groups if groups else 0
        raise ValueError(
            "dn dict needs pad_size and group_size (or DINO's num_dn_group, or DN-DETR's known_indice and batch_idx)"
        )
    return _size(dn.pad_size), _size(dn.group_size)


def recognise_dn_mask(mask: torch.Tensor) -> tuple[int, int] | None:
    """(pad_size, group_size) if ``mask`` (W, W) bool equals dn_attn_mask(pad_size, group_size, W - pad_size)."""
    if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.shape[0] == 0:
        return None
    width = mask.shape[0]
    pad = int(mask[-1].sum())  # a matching query is blocked from exactly the DN part
    group = int((~mask[0, :pad]).sum()) if pad else 0
    if pad and (group == 0 or pad % group):
        return None
    idx = torch.arange(width, device=mask.device)
    blocked = torch.where(
        (idx < pad)[:, None],
        (idx[None, :] < pad) & ((idx // max(group, 1))[:, None] != (idx // max(group, 1))[None, :]),
        (idx[None, :] < pad),
    )
    return (pad, group) if torch.equal(blocked, mask) else None


# B * H * W * W at or below which the CPU runs the parent's math path instead of the block-sparse one. Measured on
# 2 threads of an AMD EPYC (docs/kernels.md): at DN-DETR's decoder shape at batch 2 (5 groups of 20 + 300 queries,
# 8 heads: 2.6e6) or smaller, the math path (one masked softmax over (B, H, W, W) scores) is as fast or up to 10%
# faster; from batch 4 or W = 500 on the block-sparse path is 1.2x-1.7x faster. On a GPU the block-sparse path
# runs at every size: the math path writes B * H * W * W scores to memory, which SDPA's kernels never do.
CPU_MATH_PATH_MAX = 3_000_000


def _math_path_pays(query: torch.Tensor, key: torch.Tensor, heads: int, seq_dim: int) -> bool:
    batch = query.shape[1 - seq_dim]
    return batch * heads * query.shape[seq_dim] * key.shape[seq_dim] <= CPU_MATH_PATH_MAX


class DNMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention that runs DN self-attention block-sparsely.

    Same constructor, parameters, state_dict keys and call signature as nn.MultiheadAttention (plus ``dn=``).
    The fast path (dnops.dn_self_attention, no (W, W) mask or scores) is taken when the call carries DN
    structure — ``dn=`` (a DNQueries, a (pad_size, group_size) pair, or DN-DETR's mask_dict / DINO's dn_meta) or
    a bool ``attn_mask`` equal to ``dnops.dn_attn_mask(...)`` (known without reading it when dn_attn_mask made it and
    it is unchanged, else recognised once per mask tensor and cached: reading a mask made elsewhere is a device sync
    on a GPU, once per new mask tensor, which ``dn=`` or a mask from dn_attn_mask avoids) — and it is
    self-attention (W queries, W keys) without key_padding_mask, bias_k/bias_v, add_zero_attn or attention weights.
    Attention dropout in training, key_padding_mask and need_weights=True fall back to the parent with the dense
    mask, so every call gives what nn.MultiheadAttention gives; so do small problems on the CPU
    (B * H * W * W <= CPU_MATH_PATH_MAX), where the parent's math path is the faster one.

    An ``attn_mask`` always decides what is attended: given with ``dn=``, it must be that structure's mask to take
    the fast path, and any other mask runs the parent's dense path with it. Under torch.compile a mask is not
    inspected (that would read its values while tracing): pass ``dn=`` without ``attn_mask`` for the fast path.

    Unlike the parent, ``need_weights`` defaults to False: True forces nn.MultiheadAttention's slow path.
    """

    _mask_cache: tuple[weakref.ref, int, tuple[int, int] | None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_mask_cache", None)  # a weak reference cannot be pickled; the cache refills on the next call
        return state

    def _mask_structure(self, mask: torch.Tensor) -> tuple[int, int] | None:
        made = made_mask_structure(mask)
        if made is not None:
            return made
        cached = self._mask_cache
        if cached is not None and cached[0]() is mask and cached[1] == mask._version:
            return cached[2]
        found = recognise_dn_mask(mask)
        self._mask_cache = (weakref.ref(mask), mask._version, found)
        return found

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        dn: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shapes as nn.MultiheadAttention: (L, B, E) or, with batch_first, (B, L, E); returns (out, weights)."""
        structure = _structure_of(dn)
        if attn_mask is not None:
            # not inspected while tracing (compile, export): the parent's dense path honours any mask
            tracing = torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
            structure = None if tracing else self._mask_structure(attn_mask)
        seq_dim = 1 if self.batch_first else 0
        fast = (
            structure is not None
            and query.dim() == 3
            and key.shape[seq_dim] == query.shape[seq_dim] == value.shape[seq_dim]
            and (attn_mask is None or attn_mask.shape[-1] == query.shape[seq_dim])
            and key_padding_mask is None
            and not need_weights
            and not is_causal
            and self.bias_k is None
            and not self.add_zero_attn
            and not (self.training and self.dropout > 0.0)
        )
        # small problems on the CPU: torch's math path (the parent's, with weights) beats the two-segment kernel
        math = fast and query.device.type == "cpu" and _math_path_pays(query, key, self.num_heads, seq_dim)
        if not fast or math:
            if structure is not None and attn_mask is None:
                width = query.shape[seq_dim]
                attn_mask = dn_attn_mask(structure[0], structure[1], width - structure[0], device=query.device)
            # exported to ONNX, the parent's weights path (plain matrix products, any opset; SDPA needs opset 14)
            # with the weights dropped when not asked for: the nn.MultiheadAttention it replaces exports, by default
            weights = need_weights or math or torch.onnx.is_in_onnx_export()
            out, attn = super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=weights,
                attn_mask=attn_mask,
                # weights nobody asked for are dropped: not averaged over the heads first
                average_attn_weights=average_attn_weights and need_weights,
                is_causal=is_causal,
            )
            return out, attn if need_weights else None
        return self._dn_forward(query, key, value, *structure), None

    def _dn_forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pad_size: int, group_size: int
    ) -> torch.Tensor:
        # The projections run in the caller's layout ((W, B, E) or (B, W, E): a 2D matrix product on a view) and
        # the heads are strided views of their results; the kernel reads any strides and writes its output in q's
        # memory order, so nothing is copied on either side of the attention. A query that is also the key (as
        # DN-DETR and DINO call it) shares one matrix product with it, as in nn.MultiheadAttention.
        embed = query.shape[-1]
        if self._qkv_same_embed_dim:

            def packed(x: torch.Tensor, first: int, last: int) -> torch.Tensor:
                # projections first..last-1 of (q, k, v), i.e. rows [first * E, last * E) of in_proj
                rows = slice(first * embed, last * embed)
                bias = None if self.in_proj_bias is None else self.in_proj_bias[rows]
                return F.linear(x, self.in_proj_weight[rows], bias)

            if query is key and key is value:
                q, k, v = packed(query, 0, 3).chunk(3, -1)
            elif query is key:
                (q, k), v = packed(query, 0, 2).chunk(2, -1), packed(value, 2, 3)
            else:
                q, k, v = packed(query, 0, 1), packed(key, 1, 2), packed(value, 2, 3)
        else:
            b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)
        # (B, W, E) or (W, B, E) -> (B, H, W, Dh) views, and the inverse permutation for the output
        order, inverse = ((0, 2, 1, 3),) * 2 if self.batch_first else ((1, 2, 0, 3), (2, 0, 1, 3))
        q, k, v = (t.unflatten(-1, (self.num_heads, embed // self.num_heads)).permute(order) for t in (q, k, v))
        out = dn_self_attention(q, k, v, pad_size, group_size)
        return self.out_proj(out.permute(inverse).flatten(-2))
