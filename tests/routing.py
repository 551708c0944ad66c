"""The front door as the per-family ``use_dnops`` functions are called in their tests: a model in, how many modules
were routed out. Each family's routing test runs through both."""

from __future__ import annotations

from torch import nn

import dnops.compat


def front_door(model: nn.Module) -> int:
    return dnops.compat.use_dnops(model).routed
