"""dnops.compat.use_dnops: every family through one call, what it routes per kind, what it leaves alone and why.

The families' own routing tests run through it too (tests/routing.py: test_transformers, test_rtdetr)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnops
import dnops.compat
from dnops.nn import DNMultiheadAttention


class MSDeformAttn(nn.Module):
    """Deformable-DETR's module as its research repositories define it (models/ops/modules/ms_deform_attn.py:
    Deformable-DETR, DN-DETR, DINO): its constructor, parameters and forward, the core on grid_sample."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.im2col_step = 64
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        query,
        reference_points,
        input_flatten,
        input_spatial_shapes,
        input_level_start_index,
        input_padding_mask=None,
    ):
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = dnops.reference.ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(out)


class DecoderLayer(nn.Module):
    """A DINO-style deformable decoder layer: self-attention under the DN mask, then deformable cross-attention."""

    def __init__(self, d_model=32):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, 4)
        self.cross_attn = MSDeformAttn(d_model, 2, 4, 2)

    def forward(self, tgt, reference_points, memory, shapes, starts, attn_mask):
        q = tgt.transpose(0, 1)
        tgt = tgt + self.self_attn(q, q, q, attn_mask=attn_mask)[0].transpose(0, 1)
        return tgt + self.cross_attn(tgt, reference_points, memory, shapes, starts)


class Unknown(nn.Module):
    """A deformable-attention module with another forward: dnops must leave it alone."""

    def __init__(self):
        super().__init__()
        self.sampling_offsets = nn.Linear(4, 4)
        self.attention_weights = nn.Linear(4, 4)

    def forward(self, x):
        return self.sampling_offsets(x) + self.attention_weights(x)


def test_research_repository_decoder_is_routed_and_equal():
    torch.manual_seed(0)
    theirs = nn.Sequential(DecoderLayer(), DecoderLayer()).double()
    with torch.no_grad():
        for layer in theirs:
            layer.cross_attn.sampling_offsets.bias.normal_()
            layer.cross_attn.attention_weights.weight.normal_(std=0.1)
    ours = copy.deepcopy(theirs)
    routing = dnops.compat.use_dnops(ours)
    assert routing.counts == {"ms_deform_attn": 2, "self_attention": 2}
    assert {e.family for e in routing.entries if e.family} == {"deformable_detr", "decoder_self_attention"}
    assert isinstance(ours[0].cross_attn, dnops.nn.MSDeformAttn) and isinstance(ours[0].self_attn, DNMultiheadAttention)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    again = dnops.compat.use_dnops(ours)
    assert again.routed == 0 and {e.why for e in again.entries} == {"already on dnops"}

    dn = dnops.dn_queries(torch.tensor([1, 2, 3]), torch.rand(3, 4) * 0.5 + 0.25, [2, 1], num_classes=5)
    mask = dnops.dn_attn_mask(dn.pad_size, dn.group_size, 10)
    shapes = torch.tensor([[4, 4], [2, 3]])
    starts = torch.tensor([0, 16])
    width = dn.pad_size + 10
    args = (torch.randn(2, width, 32, dtype=torch.float64), torch.rand(2, width, 2, 2, dtype=torch.float64))
    memory = torch.randn(2, 22, 32, dtype=torch.float64)
    outs = []
    for model in (theirs, ours):
        x = args[0]
        for layer in model:
            x = layer(x, args[1], memory, shapes, starts, mask)
        outs.append(x)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-10)


def test_unknown_modules_are_left_alone_with_the_reason(capsys):
    model = nn.ModuleDict({"encoder": nn.MultiheadAttention(8, 2), "odd": Unknown(), "linear": nn.Linear(2, 2)})
    before = {name: type(m) for name, m in model.named_modules()}
    routing = dnops.compat.use_dnops(model, explain=True)
    assert routing.routed == 0 and {name: type(m) for name, m in model.named_modules()} == before
    why = {e.path: e.why for e in routing.entries}
    assert why == {
        "encoder": "not a decoder layer's self-attention (no DN mask reaches it)",
        "odd": "tests.test_front_door.Unknown: not a module dnops knows",
    }
    printed = capsys.readouterr().out
    assert "0 module(s) routed" in printed and "left alone" in printed and "odd" in printed


def test_self_attention_false_leaves_decoder_attention_alone():
    model = DecoderLayer()
    routing = dnops.compat.use_dnops(model, self_attention=False)
    assert routing.counts == {"ms_deform_attn": 1}
    assert type(model.self_attn) is nn.MultiheadAttention
    assert [e.why for e in routing.entries if e.path == "self_attn"] == ["self_attention=False"]


def test_a_wrapper_holding_the_model_is_unwrapped():
    class Wrapper:  # rfdetr's RFDETR* classes: not modules, the network in .model.model
        def __init__(self, net):
            self.model = type("Context", (), {"model": net})()

    net = DecoderLayer()
    assert dnops.compat.use_dnops(Wrapper(net)).routed == 2
    with pytest.raises(TypeError, match="expected an nn.Module"):
        dnops.compat.use_dnops(object())


@pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None, reason="requirements-detectors.txt")
def test_ultralytics_model_through_the_front_door():
    from tests.test_ultralytics import build

    routing = dnops.compat.use_dnops(build())
    assert routing.counts == {"ms_deform_attn": 6, "self_attention": 6, "denoising": 1}
    assert {e.family for e in routing.entries if e.family} == {"ultralytics"}
    left = [e for e in routing.entries if e.family is None]
    assert len(left) == 1 and left[0].why.startswith("not a decoder layer's")  # the encoder's AIFI attention


@pytest.mark.skipif(importlib.util.find_spec("rfdetr") is None, reason="requirements-detectors.txt")
def test_rfdetr_model_through_the_front_door():
    from tests.test_rfdetr import build

    routing = dnops.compat.use_dnops(build())
    assert routing.counts == {"ms_deform_attn": 2}
    assert {e.family for e in routing.entries if e.family} == {"rfdetr"}
