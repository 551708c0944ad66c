"""dnops' caches keep their most recently used entries only: multi-scale training meets a new image size every few
steps, and 1,000 distinct sizes (their tensors kept alive) leave each cache at its bound."""

from __future__ import annotations

import importlib

import torch

import dnops
from dnops import _constants
from dnops._cache import LRU
from dnops.compat import rtdetr
from dnops.compat._levels import level_tensors

mask_module = importlib.import_module("dnops.ops.dn_attn_mask")  # the package's attribute of that name is the function

SIZES = [(h, w) for h in range(1, 41) for w in range(1, 26)]  # 1,000 distinct single-level maps


def test_lru_keeps_the_most_recently_used():
    cache = LRU(3)
    for key in "abcd":
        cache[key] = key.upper()
    assert list(cache) == ["b", "c", "d"]
    assert cache.get("b") == "B" and cache.get("z") is None
    cache["e"] = "E"
    assert list(cache) == ["d", "b", "e"]  # "c" was the least recently used


def test_level_constants_stay_bounded():
    for h, w in SIZES:
        level_tensors([(h, w)], torch.device("cpu"))
    assert len(_constants._MADE) <= _constants._MADE.size < len(SIZES)
    shapes, starts = level_tensors([(40, 25)], torch.device("cpu"))  # the latest size is still there
    assert level_tensors([(40, 25)], torch.device("cpu"))[0] is shapes


def test_made_masks_and_converted_values_stay_bounded():
    masks = [dnops.dn_attn_mask(g, 1, 2) for g in range(1, 1001)]
    assert len(mask_module._MADE) <= mask_module._MADE.size < len(masks)
    assert mask_module.made_mask_structure(masks[-1]) == (1000, 1)
    views = []
    for h, w in SIZES[:200]:
        levels = [torch.randn(1, 1, 2, h * w)]
        rtdetr.channel_major_levels_as_value(levels)
        views.append(levels)
    assert len(rtdetr._CONVERTED) <= rtdetr._CONVERTED.size
