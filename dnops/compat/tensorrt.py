"""ONNX export of the deformable attention as TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` node (opt-in).

By default an exported ``dnops.ms_deform_attn`` is standard ONNX ops (see ``dnops.ms_deform_attn``), which every
runtime runs. For TensorRT, whose plugin library carries a fused kernel of this op, export inside
``plugin_export()``: each call becomes one plugin node with TensorRT's five inputs (value, spatial_shapes and
level_start_index as int32, sampling_locations, attention_weights; softmaxed first when the weights are logits)
and output (N, Lq, M * D). With the dynamo exporter pass ``custom_translation_table=translation_table()`` as well::

    with dnops.compat.tensorrt.plugin_export():
        torch.onnx.export(model, args, "model.onnx", dynamo=True, custom_translation_table=translation_table())

onnxruntime cannot run such a graph (it has no kernel for the node); TensorRT's ONNX parser maps it to the plugin.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dnops import reference
from dnops.ops.ms_deform_attn import EXPORT_OVERRIDE
from dnops.reference.ms_deform_attn import softmax_rows

PLUGIN = "MultiscaleDeformableAttnPlugin_TRT"
DOMAIN = "trt"
_INT32 = 6  # onnx.TensorProto.INT32: the plugin reads the level sizes and starts as int32


def enabled() -> bool:
    """Whether exports now write the plugin node (inside ``plugin_export()``)."""
    return _plugin_node in EXPORT_OVERRIDE


def _plugin_node(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, logits):
    """The exported op as the plugin node: the plugin takes normalized weights."""
    weights = softmax_rows(attention_weights) if logits else attention_weights
    return ms_deform_attn_trt(value, spatial_shapes, level_start_index, sampling_locations, weights)


@torch.library.custom_op("dnops::_ms_deform_attn_trt", mutates_args=())
def ms_deform_attn_trt(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The plugin's computation, a graph node of its own while exporting: value (N, S, M, D), spatial_shapes
    (L, 2), level_start_index (L,), sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P)
    already normalized -> (N, Lq, M * D)."""
    return reference.ms_deform_attn_gather(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@ms_deform_attn_trt.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, lq, m = sampling_locations.shape[:3]
    return value.new_empty((n, lq, m * value.shape[3]))


def _legacy_symbolic(g, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    shapes = g.op("Cast", spatial_shapes, to_i=_INT32)
    starts = g.op("Cast", level_start_index, to_i=_INT32)
    out = g.op(f"{DOMAIN}::{PLUGIN}", value, shapes, starts, sampling_locations, attention_weights)
    # the output's type for the exporter's shape inference, which knows nothing of the plugin: (N, Lq, M * D)
    v, loc = value.type().varyingSizes(), sampling_locations.type().varyingSizes()
    if v is not None and loc is not None:
        heads_dim = v[2] * v[3] if None not in (v[2], v[3]) else None
        out.setType(value.type().with_sizes([loc[0], loc[1], heads_dim]))
    return out


def _plugin_schema():
    """The plugin's ONNX signature, which ONNX itself does not define: five inputs, one output."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    return OpSchema(
        PLUGIN,
        DOMAIN,
        1,
        inputs=[
            param("value", "T"),
            param("spatial_shapes", "I"),
            param("level_start_index", "I"),
            param("sampling_locations", "T"),
            param("attention_weights", "T"),
        ],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("I", ["tensor(int32)"], "")],
    )


def translation_table() -> dict:
    """For ``torch.onnx.export(..., dynamo=True, custom_translation_table=translation_table())``."""
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    plugin = Op(Opset(DOMAIN, 1), PLUGIN, _plugin_schema())

    def translate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        shapes, starts = op.Cast(spatial_shapes, to=_INT32), op.Cast(level_start_index, to=_INT32)
        return plugin(value, shapes, starts, sampling_locations, attention_weights)

    return {torch.ops.dnops._ms_deform_attn_trt.default: translate}


@contextlib.contextmanager
def plugin_export() -> Iterator[None]:
    """Exports made inside write ``dnops.ms_deform_attn`` as the TensorRT plugin node."""
    torch.onnx.register_custom_op_symbolic("dnops::_ms_deform_attn_trt", _legacy_symbolic, 9)
    EXPORT_OVERRIDE.append(_plugin_node)
    try:
        yield
    finally:
        EXPORT_OVERRIDE.remove(_plugin_node)
