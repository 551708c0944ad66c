from __future__ import annotations

import weakref

import torch

from dnops import _backend, reference
from dnops._cache import LRU
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
        mask = torch.ops.dnops.dn_attn_mask.default(pad_size, group_size, num_queries, device=device)
    else:
        mask = reference.dn_attn_mask(pad_size, group_size, num_queries, device=device)
    if not torch.compiler.is_compiling():
        key = id(mask)
        _MADE[key] = (weakref.ref(mask, lambda _, key=key: _MADE.pop(key, None)), mask._version, (pad_size, group_size))
    return mask


# The masks dn_attn_mask made and still alive, unchanged since: their structure is known without reading them (on a
# GPU reading a mask's values is a device-to-host copy that stalls the stream).
_MADE: LRU[int, tuple[weakref.ref, int, tuple[int, int]]] = LRU(256)


def made_mask_structure(mask: torch.Tensor) -> tuple[int, int] | None:
    """(pad_size, group_size) of a mask that dn_attn_mask returned and nobody modified since, else None."""
    seen = _MADE.get(id(mask))
    if seen is not None and seen[0]() is mask and seen[1] == mask._version:
        return seen[2]
    return None
