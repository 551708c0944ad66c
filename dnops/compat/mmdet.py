"""mmdetection's DINO denoising on dnops: ``CdnQueryGenerator`` (mmdet/models/layers/transformer/dino_layers.py,
mmdet 3.x), the module its ``DINO`` detector builds from ``dn_cfg``.

Same constructor, attributes, state_dict (``label_embedding.weight``) and call as the original, with the noise from
dnops.dn_queries (counter-based random numbers, the same laws) and no host syncs (the original reads per-image GT
counts and group indices from the device). Swap it into a built detector::

    from dnops.compat.mmdet import CdnQueryGenerator
    model.dn_query_generator = CdnQueryGenerator.from_module(model.dn_query_generator)

(its learned embedding kept), or register it in the config's scope in place of mmdet's.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from dnops._constants import host_to_device
from dnops.compat._generators import noised_groups, query_tensors
from dnops.ops.dn_attn_mask import dn_attn_mask


class CdnQueryGenerator(nn.Module):
    """DINO's contrastive denoising queries as mmdetection builds them.

    Called with ``batch_data_samples`` (mmdet's DetDataSample list: ``img_shape`` (h, w), ``gt_instances.bboxes``
    (n, 4) x1y1x2y2 in pixels, ``gt_instances.labels`` (n,)); returns (dn_label_query (B, Q, embed_dims), dn_bbox_query
    (B, Q, 4) normalised cxcywh through inverse_sigmoid (eps 1e-3), attn_mask (Q + num_matching_queries,) * 2 bool
    (True = blocked), dn_meta {"num_denoising_queries": Q, "num_denoising_groups": G}), Q = 2 * M * G with M the
    largest GT count. G: ``num_dn_queries // M`` (at least 1; 1 without GT) when ``group_cfg["dynamic"]`` (the
    default), else ``group_cfg["num_groups"]``. Each group holds M positives then M negatives; labels are redrawn
    uniformly with label_noise_scale / 2; corners move by sign * r * half-size * box_noise_scale, r in [0, 1) for
    positives and [1, 2) for negatives, clipped to [0, 1]; padding slots are zeros. Both noise scales must be > 0,
    as mmdetection asserts on each call."""

    def __init__(
        self,
        num_classes: int,
        embed_dims: int,
        num_matching_queries: int,
        label_noise_scale: float = 0.5,
        box_noise_scale: float = 1.0,
        group_cfg: dict | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_matching_queries = num_matching_queries
        self.label_noise_scale = label_noise_scale
        self.box_noise_scale = box_noise_scale
        group_cfg = {} if group_cfg is None else group_cfg
        self.dynamic_dn_groups = group_cfg.get("dynamic", True)
        if self.dynamic_dn_groups:
            if "num_dn_queries" not in group_cfg:
                warnings.warn(
                    "'num_dn_queries' should be set when using dynamic dn groups, use 100 as default.", stacklevel=2
                )
            self.num_dn_queries = group_cfg.get("num_dn_queries", 100)
            if not isinstance(self.num_dn_queries, int):
                raise TypeError(
                    f"CdnQueryGenerator: group_cfg['num_dn_queries'] must be an int, got {self.num_dn_queries!r}"
                )
        else:
            if "num_groups" not in group_cfg:
                raise ValueError("CdnQueryGenerator: group_cfg['num_groups'] must be set when using static dn groups")
            self.num_groups = group_cfg["num_groups"]
            if not isinstance(self.num_groups, int):
                raise TypeError(f"CdnQueryGenerator: group_cfg['num_groups'] must be an int, got {self.num_groups!r}")
        self.label_embedding = nn.Embedding(self.num_classes, self.embed_dims)

    @classmethod
    def from_module(cls, original: nn.Module) -> CdnQueryGenerator:
        """This generator with ``original``'s settings and label embedding (a built mmdet CdnQueryGenerator)."""
        group_cfg = {"dynamic": original.dynamic_dn_groups}
        if original.dynamic_dn_groups:
            group_cfg["num_dn_queries"] = original.num_dn_queries
        else:
            group_cfg["num_groups"] = original.num_groups
        made = cls(
            original.num_classes,
            original.embed_dims,
            original.num_matching_queries,
            original.label_noise_scale,
            original.box_noise_scale,
            group_cfg,
        )
        made.label_embedding = original.label_embedding
        return made

    def get_num_groups(self, max_num_target: int | None = None) -> int:
        """The group count for a batch whose largest GT count is ``max_num_target``."""
        if self.dynamic_dn_groups:
            if max_num_target is None:
                raise ValueError("CdnQueryGenerator.get_num_groups: max_num_target is needed with dynamic dn groups")
            groups = 1 if max_num_target == 0 else self.num_dn_queries // max_num_target
        else:
            groups = self.num_groups
        return int(max(groups, 1))

    def forward(self, batch_data_samples: Sequence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        for name in ("label_noise_scale", "box_noise_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CdnQueryGenerator: {name} must be > 0, got {getattr(self, name)}")
        labels = [sample.gt_instances.labels for sample in batch_data_samples]
        pixels = torch.cat([sample.gt_instances.bboxes for sample in batch_data_samples])
        # one asynchronous host-to-device copy of every row's (w, h, w, h), where the original copies one per image
        sizes = torch.tensor([(w, h, w, h) for h, w in (s.img_shape for s in batch_data_samples)], dtype=pixels.dtype)
        counts = torch.tensor([len(t) for t in labels])
        rows = torch.repeat_interleave(sizes.reshape(-1, 4), counts, dim=0, output_size=pixels.shape[0])
        xyxy = pixels / host_to_device(rows, pixels.device, "compat.mmdet.CdnQueryGenerator")
        boxes = [torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)]
        groups = self.get_num_groups(max(len(t) for t in labels))
        dn = noised_groups(
            labels, boxes, groups, True, self.num_classes, self.label_noise_scale * 0.5, self.box_noise_scale
        )
        label_query, bbox_query = query_tensors(dn, self.label_embedding, self.num_classes, 1e-3)
        attn_mask = dn_attn_mask(dn.pad_size, dn.group_size, self.num_matching_queries, device=label_query.device)
        return (
            label_query,
            bbox_query,
            attn_mask,
            {"num_denoising_queries": dn.pad_size, "num_denoising_groups": groups},
        )
