"""The level tensors of the adapters: from Python lists of sizes (RT-DETR, D-FINE, DEIM, ultralytics, rfdetr,
transformers' v2 function), and the level starts of a spatial_shapes tensor (Deformable-DETR's and rfdetr's
functions, which take no level_start_index)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dnops._constants import device_constant


def level_tensors(sizes: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """spatial_shapes (L, 2) and level_start_index (L,) of a list of (H, W), made once per sizes and device: a tensor
    from host values is a blocking host-to-device copy, and the op checks a level tensor it has seen only once. Built
    in the graph, uncached, under torch.compile."""

    key = tuple((int(h), int(w)) for h, w in sizes)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        shapes = torch.tensor(key, dtype=torch.int64, device=device)
        return shapes, torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])

    return device_constant("levels", key, device, build)


def level_start_index(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(L,) exclusive cumsum of H_l * W_l of an (L, 2) spatial_shapes, on its device (nothing read to the host)."""
    sizes = spatial_shapes.prod(1)
    return torch.cumsum(sizes, 0) - sizes
