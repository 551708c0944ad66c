from __future__ import annotations

import torch

from dnops import _backend, reference
from dnops.validation import check_dn_structure, structure_int

if _backend.HAS_C:

    @torch.library.register_fake("dnops::dn_attn_mask")
    def _(pad_size: int, group_size: int, num_queries: int, *, device: torch.device | None = None) -> torch.Tensor:
        width = pad_size + num_queries
        return torch.empty((width, width), dtype=torch.bool, device=device if device is not None else "cpu")


def dn_attn_mask(
    pad_size: int, group_size: int, num_queries: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The dense DN self-attention mask, (W, W) bool with W = pad_size + num_queries, True = blocked.

    Same layout and convention as the masks DN-DETR and DINO build for nn.MultiheadAttention: queries are
    [DN part | matching part]; matching queries see matching keys only; a DN query of group g (slots
    g * group_size .. (g + 1) * group_size - 1) sees its own group and every matching key.
    """
    pad_size, group_size, num_queries = (
        structure_int(x, name, "dn_attn_mask")
        for x, name in ((pad_size, "pad_size"), (group_size, "group_size"), (num_queries, "num_queries"))
    )
    check_dn_structure(pad_size, group_size, num_queries)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if _backend.is_compiled(_backend.choose("dn_attn_mask", device)):
        return torch.ops.dnops.dn_attn_mask.default(pad_size, group_size, num_queries, device=device)
    return reference.dn_attn_mask(pad_size, group_size, num_queries, device=device)
