"""DN-Deformable-DAB-DETR-lite: a small CNN, a deformable encoder and a DAB decoder with denoising queries.

Every hot spot runs on dnops: MSDeformAttn in the encoder and the cross-attention, dn_queries for the noised
GT, DNMultiheadAttention (block-sparse, no W x W mask) for the decoder self-attention. ``Config.ops`` =
"reference" runs the same model on the pure-PyTorch references instead (grid_sample deformable attention,
the reference generator, nn.MultiheadAttention with the dense mask); the parameters are the same either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import dnops
from dnops.dn import dn_box_queries, dn_concat, dn_label_queries, flatten_targets, inverse_sigmoid
from dnops.nn import DNMultiheadAttention, MSDeformAttn
from models.config import Config


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: batches of 2 per process and no running statistics to keep in sync across ranks
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True)
    )


def _group_norm(d: int) -> nn.GroupNorm:
    # at least 8 channels per group (Deformable-DETR's 32 groups of 256), so a 1 x 1 map still normalises
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if d % g == 0 and (d // g >= 8 or g == 1))
    return nn.GroupNorm(groups, d)


class Backbone(nn.Module):
    """Trained from scratch (nothing downloaded): (B, 3, H, W) -> feature maps at strides 8, 16, 32."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(3, w, 2), _conv(w, w, 1), _conv(w, 2 * w, 2))  # stride 4
        self.stages = nn.ModuleList(
            [
                nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w, 1)),  # 8
                nn.Sequential(_conv(4 * w, 8 * w, 2), _conv(8 * w, 8 * w, 1)),  # 16
                nn.Sequential(_conv(8 * w, 8 * w, 2), _conv(8 * w, 8 * w, 1)),  # 32
            ]
        )
        self.channels = [4 * w, 8 * w, 8 * w]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def sine_embed(coords: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(..., k) coordinates in [0, 1] -> (..., k * dim) sine/cosine features, ``dim`` (even) per coordinate."""
    freqs = temperature ** (torch.arange(dim // 2, dtype=torch.float32, device=coords.device) * (2.0 / dim))
    angles = coords.float()[..., None] * (2.0 * math.pi) / freqs
    return torch.stack([angles.sin(), angles.cos()], -1).flatten(-3).to(coords.dtype)


class MLP(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class FFN(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(cfg.d_model, cfg.n_levels, cfg.n_heads, cfg.n_points)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FFN(cfg.d_model, cfg.ffn_dim, cfg.dropout)

    def forward(self, src, pos, reference_points, shapes, starts):
        src = self.norm(src + self.dropout(self.self_attn(src + pos, reference_points, src, shapes, starts)))
        return self.ffn(src)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        # Same parameters and state_dict keys either way; only the reference run pays for the dense mask.
        attn = DNMultiheadAttention if cfg.ops == "dnops" else nn.MultiheadAttention
        self.self_attn = attn(cfg.d_model, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = MSDeformAttn(cfg.d_model, cfg.n_levels, cfg.n_heads, cfg.n_points)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.ffn = FFN(cfg.d_model, cfg.ffn_dim, cfg.dropout)

    def forward(self, tgt, query_pos, ref_boxes, memory, shapes, starts, dn_structure: dict):
        """``dn_structure``: {} (all queries see all), {"dn": (pad, group)} or {"attn_mask": dense (W, W) mask}."""
        q = tgt + query_pos
        attn = self.self_attn(q, q, tgt, need_weights=False, **dn_structure)[0]
        tgt = self.norm1(tgt + self.dropout(attn))
        levels = ref_boxes[:, :, None, :].expand(-1, -1, shapes.shape[0], -1)
        tgt = self.norm2(tgt + self.dropout(self.cross_attn(tgt + query_pos, levels, memory, shapes, starts)))
        return self.ffn(tgt)


class DNDETR(nn.Module):
    """images (B, 3, H, W) (+ targets in training) -> per-decoder-layer class logits and boxes.

    Output dict: ``logits`` (layers, B, num_queries, num_classes), ``boxes`` (layers, B, num_queries, 4)
    normalized (cx, cy, w, h); in training with DN also ``dn`` (the DNQueries), ``dn_logits`` and ``dn_boxes``
    (layers, B, pad_size, ...).
    """

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        d = cfg.d_model
        self.backbone = Backbone(cfg.backbone_width)
        extra = cfg.n_levels - len(self.backbone.channels)
        if not 0 <= extra:
            raise ValueError(f"n_levels must be >= {len(self.backbone.channels)}")
        chans = self.backbone.channels
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, d, 1), _group_norm(d)) for c in chans]
            + [nn.Sequential(nn.Conv2d(chans[-1] if i == 0 else d, d, 3, 2, 1), _group_norm(d)) for i in range(extra)]
        )
        self.level_embed = nn.Parameter(torch.empty(cfg.n_levels, d).normal_())
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.tgt_embed = nn.Embedding(cfg.num_queries, d)
        self.refpoint_embed = nn.Embedding(cfg.num_queries, 4)  # DAB anchors, inverse-sigmoid space
        self.label_enc = nn.Embedding(num_classes + 1, d)
        self._levels: dict = {}  # (level sizes, device) -> (spatial_shapes, level_start_index), see _level_index
        self.ref_point_head = MLP([2 * d, d, d])
        self.class_embed = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(cfg.dec_layers))
        self.bbox_embed = nn.ModuleList(MLP([d, d, d, 4]) for _ in range(cfg.dec_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        prior = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: every class starts at p = 0.01
        for head in self.class_embed:
            nn.init.constant_(head.bias, prior)
        for mlp in self.bbox_embed:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        with torch.no_grad():
            anchors = torch.rand(self.cfg.num_queries, 4) * 0.96 + 0.02
            anchors[:, 2:] = 0.1
            self.refpoint_embed.weight.copy_(inverse_sigmoid(anchors, 1e-5))

    def _level_index(self, sizes: tuple[tuple[int, int], ...], device: torch.device):
        """spatial_shapes (L, 2) and level_start_index (L,) of these level sizes, made once per sizes and device:
        a tensor built from host values is a host-to-device copy, which a CUDA graph capture cannot contain."""
        key = (sizes, device)
        if torch.compiler.is_compiling():  # traced sizes may be symbolic: build them in the graph, cache nothing
            shapes = torch.tensor(sizes, dtype=torch.int64, device=device)
            return shapes, torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
        if key not in self._levels:
            shapes = torch.tensor(sizes, dtype=torch.int64)
            starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
            self._levels[key] = (shapes.to(device), starts.to(device))
        return self._levels[key]

    def encode(self, images: torch.Tensor):
        """(memory (B, S, d), spatial_shapes (L, 2), level_start_index (L,))."""
        feats = self.backbone(images)
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats, strict=False)]
        for proj in self.input_proj[len(feats) :]:
            srcs.append(proj(feats[-1] if len(srcs) == len(feats) else srcs[-1]))
        shapes, starts = self._level_index(tuple(tuple(s.shape[-2:]) for s in srcs), images.device)
        flat, pos, refs = [], [], []
        for lvl, src in enumerate(srcs):
            h, w = src.shape[-2:]
            ys = (torch.arange(h, device=src.device, dtype=src.dtype) + 0.5) / h
            xs = (torch.arange(w, device=src.device, dtype=src.dtype) + 0.5) / w
            grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(1, h * w, 2)
            flat.append(src.flatten(2).transpose(1, 2))
            pos.append(sine_embed(grid, self.cfg.d_model // 2) + self.level_embed[lvl])
            refs.append(grid.flip(-1))  # (x, y)
        memory, pos = torch.cat(flat, 1), torch.cat(pos, 1)
        reference_points = torch.cat(refs, 1)[:, :, None, :].expand(memory.shape[0], -1, len(srcs), -1)
        for layer in self.encoder:
            memory = layer(memory, pos, reference_points, shapes, starts)
        return memory, shapes, starts

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> dict:
        # --ops reference: every dnops call inside runs its pure-PyTorch reference
        with dnops.use_backend("reference" if self.cfg.ops == "reference" else None):
            return self._forward(images, targets)

    def _forward(self, images: torch.Tensor, targets: list[dict] | None) -> dict:
        cfg = self.cfg
        memory, shapes, starts = self.encode(images)
        batch = images.shape[0]
        tgt = self.tgt_embed.weight[None].expand(batch, -1, -1)
        anchors = self.refpoint_embed.weight[None].expand(batch, -1, -1)
        dn = None
        if self.training and cfg.dn and targets is not None:
            labels, boxes, counts = flatten_targets(targets)
            dn = dnops.dn_queries(
                labels.to(images.device),
                boxes.to(images.device),
                counts,
                num_classes=self.num_classes,
                mode=cfg.dn_mode,
                num_groups=cfg.dn_groups,
                dn_number=cfg.dn_number,
                label_noise_ratio=cfg.label_noise,
                box_noise_scale=cfg.box_noise,
            )
            if dn.pad_size == 0:
                dn = None
            else:
                tgt = dn_concat(dn_label_queries(dn, self.label_enc, self.num_classes), tgt)
                anchors = dn_concat(dn_box_queries(dn), anchors)
        structure = {}
        if dn is not None and cfg.dn_mask:
            if cfg.ops == "dnops":
                structure = {"dn": (dn.pad_size, dn.group_size)}
            else:  # what DN-DETR runs: the dense mask, built once for all layers
                mask = dnops.reference.dn_attn_mask(dn.pad_size, dn.group_size, cfg.num_queries, device=images.device)
                structure = {"attn_mask": mask}
        ref = anchors.sigmoid()
        all_logits, all_boxes = [], []
        for layer, cls_head, box_head in zip(self.decoder, self.class_embed, self.bbox_embed, strict=True):
            query_pos = self.ref_point_head(sine_embed(ref, self.cfg.d_model // 2))
            tgt = layer(tgt, query_pos, ref, memory, shapes, starts, structure)
            new_ref = (box_head(tgt) + inverse_sigmoid(ref, 1e-5)).sigmoid()
            all_logits.append(cls_head(tgt))
            all_boxes.append(new_ref)
            ref = new_ref.detach()  # iterative refinement: each layer's boxes are learnt as its own correction
        logits, boxes = torch.stack(all_logits), torch.stack(all_boxes)
        if dn is None:
            return {"logits": logits, "boxes": boxes}
        pad = dn.pad_size
        return {
            "logits": logits[:, :, pad:],
            "boxes": boxes[:, :, pad:],
            "dn": dn,
            "dn_logits": logits[:, :, :pad],
            "dn_boxes": boxes[:, :, :pad],
        }
