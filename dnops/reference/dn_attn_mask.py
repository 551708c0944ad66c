"""The DN attention structure as a dense mask: the definition of ``dnops.dn_attn_mask``, and the structure
``dnops.dn_self_attention`` computes without forming it."""

from __future__ import annotations

import torch

from dnops.validation import check_dn_structure


def dn_attn_mask(
    pad_size: int, group_size: int, num_queries: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(W, W) bool mask, W = pad_size + num_queries, True = blocked (nn.MultiheadAttention's convention).

    A matching query sees matching keys only; a DN query of group g sees group g and every matching key.
    """
    check_dn_structure(pad_size, group_size, num_queries)
    idx = torch.arange(pad_size + num_queries, device=device)
    row, col = idx[:, None], idx[None, :]
    group = idx // max(group_size, 1)
    other_group = group[:, None] != group[None, :]
    return torch.where(row < pad_size, (col < pad_size) & other_group, col < pad_size)
