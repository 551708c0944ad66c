"""ONNX export with both exporters: the deformable attention as standard ops that onnxruntime runs, correct for
any spatial_shapes fed as a graph input; DNMultiheadAttention without DN structure as plain attention; the
training-time DN path refused with a clear error."""

import warnings

import pytest
import torch

import dnops
from dnops import reference

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

EXPORTERS = ["dynamo", "legacy"]


def export(module, args, path, exporter, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' notes on tracing, not the test's concern
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=exporter == "dynamo",
            input_names=names,
            output_names=["out"],
            opset_version=18,
        )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(session, names, tensors):
    feeds = {n: t.detach().numpy() for n, t in zip(names, tensors, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_msdeformattn_exports_and_follows_spatial_shapes_given_as_input(tmp_path, exporter):
    torch.manual_seed(0)
    module = dnops.nn.MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2).eval()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    query, refs, src = torch.randn(2, 7, 32), torch.rand(2, 7, 2, 2), torch.randn(2, 39, 32)
    shapes, starts = torch.tensor([[5, 6], [3, 3]]), torch.tensor([0, 30])
    names = ["query", "refs", "src", "shapes", "starts"]
    session = export(module, (query, refs, src, shapes, starts), tmp_path / "msda.onnx", exporter, names)
    # the traced shapes, then others covering the same S = 39: a graph that baked the shapes in would be wrong
    for other_shapes, other_starts in (
        ([[5, 6], [3, 3]], [0, 30]),
        ([[6, 5], [1, 9]], [0, 30]),
        ([[3, 12], [1, 3]], [0, 36]),
    ):
        feed = (query, refs, src, torch.tensor(other_shapes), torch.tensor(other_starts))
        with dnops._backend.use_backend("reference"):
            want = module(*feed)
        torch.testing.assert_close(run(session, names, feed), want, rtol=1e-4, atol=1e-5)


def test_gather_formulation_equals_the_reference():
    from tests.msda_utils import make_inputs

    for kw in ({}, {"d": 1, "p": 1}, {"shapes": ((5, 2), (1, 1), (2, 7)), "m": 3, "d": 3, "p": 3}, {"n": 0}):
        args = make_inputs(requires_grad=True, **kw)
        for logits in (False, True):
            got, want = reference.ms_deform_attn_gather(*args, logits), reference.ms_deform_attn(*args, logits)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            if got.numel():
                g = torch.randn_like(got)
                inputs = [args[0], args[3], args[4]]
                for x, y in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g), strict=True):
                    torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


class Attention(torch.nn.Module):
    def __init__(self, dn=None, mask=None):
        super().__init__()
        self.mha = dnops.nn.DNMultiheadAttention(16, 2)
        self.dn, self.mask = dn, mask

    def forward(self, x):
        return self.mha(x, x, x, attn_mask=self.mask, dn=self.dn)[0]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dn_mha_without_dn_structure_exports_as_plain_attention(tmp_path, exporter):
    torch.manual_seed(0)
    for mask in (None, dnops.dn_attn_mask(12, 4, 15)):
        module = Attention(mask=mask).eval()
        x = torch.randn(27, 2, 16)
        session = export(module, (x,), tmp_path / "mha.onnx", exporter, ["x"])
        torch.testing.assert_close(run(session, ["x"], (x,)), module(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_exporting_the_dn_path_raises_a_clear_error(tmp_path, exporter):
    module = Attention(dn=(12, 4)).eval()
    # before torch 2.14 the dynamo exporter's last (strict) attempt cannot be told from torch.compile, so the
    # error there is the exporter's own (no ONNX function for the op), raised all the same
    clear = exporter == "legacy" or dnops._backend._EXPORT_FLAG_EXACT
    with pytest.raises(Exception, match="dnops.dn_self_attention is not exported" if clear else None):
        export(module, (torch.randn(27, 2, 16),), tmp_path / "dn.onnx", exporter, ["x"])


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_tensorrt_plugin_node_behind_its_flag(tmp_path, exporter):
    import onnx

    from dnops.compat import tensorrt

    module = dnops.nn.MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2).eval()
    args = (torch.randn(2, 7, 32), torch.rand(2, 7, 2, 2), torch.randn(2, 39, 32))
    args += (torch.tensor([[5, 6], [3, 3]]), torch.tensor([0, 30]))
    extra = {"custom_translation_table": tensorrt.translation_table()} if exporter == "dynamo" else {}
    path = tmp_path / "trt.onnx"
    with tensorrt.plugin_export(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=exporter == "dynamo", opset_version=18, **extra)
    assert not tensorrt.enabled()
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    produced = {out: node for node in model.graph.node for out in node.output}
    plugins = [n for n in model.graph.node if n.op_type == tensorrt.PLUGIN]
    assert len(plugins) == 1 and plugins[0].domain == tensorrt.DOMAIN and len(plugins[0].input) == 5
    for name in plugins[0].input[1:3]:  # spatial_shapes and level_start_index, as int32
        cast = produced[name]
        assert cast.op_type == "Cast" and onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.INT32
    # the weights reach the plugin normalized: MSDeformAttn's logits go through a Softmax first
    assert any(n.op_type == "Softmax" for n in model.graph.node)
    # without the flag the same export has no plugin node
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=exporter == "dynamo", opset_version=18)
    assert not any(n.op_type == tensorrt.PLUGIN for n in onnx.load(str(path)).graph.node)


class RealTimeAttention(torch.nn.Module):
    """The real-time DETRs' core call: dnops.compat.rtdetr's deformable_attention_core_func_v2 on D-FINE's point
    counts per level, with the model's own softmax of the weights."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, value, loc, logits):
        from dnops.compat.rtdetr import deformable_attention_core_func_v2

        weights = logits.softmax(-1)
        return deformable_attention_core_func_v2(value, [(6, 6), (3, 3), (2, 2)], loc, weights, [3, 6, 3], self.method)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_real_time_detr_attention_exports_without_grid_sample(tmp_path, exporter, method, dtype):
    """Per-level point counts and discrete sampling export as standard ops (no GridSample, which older TensorRT
    lacks and FP16 TensorRT mis-computes), and onnxruntime gives PyTorch's output, in float32 and in float16 (a
    graph computed in float16 throughout: within float16's rounding of the float64 result)."""
    import onnx

    torch.manual_seed(0)
    value = torch.randn(2, 49, 4, 8).to(dtype)
    loc = (torch.rand(2, 5, 4, 12, 2) * 0.9 + 0.05).to(dtype)
    logits = torch.randn(2, 5, 4, 12).to(dtype)
    names = ["value", "loc", "logits"]
    module = RealTimeAttention(method).eval()
    session = export(module, (value, loc, logits), tmp_path / "rt.onnx", exporter, names)
    model = onnx.load(str(tmp_path / "rt.onnx"))
    ops = {node.op_type for graph in (model.graph, *model.functions) for node in graph.node}
    assert "GridSample" not in ops and ops & {"Gather", "GatherElements"}
    got = run(session, names, (value, loc, logits))
    assert got.dtype == dtype
    with dnops._backend.use_backend("reference"):
        if dtype == torch.float32:
            torch.testing.assert_close(got, module(value, loc, logits), rtol=1e-4, atol=1e-5)
        else:
            want = module(value.double(), loc.double(), logits.double())
            torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=3e-3)
            torch.testing.assert_close(got, module(value, loc, logits), rtol=1e-2, atol=3e-3)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_tensorrt_plugin_takes_point_counts_per_level_padded(tmp_path, exporter):
    """D-FINE's [3, 6, 3] points reach TensorRT's plugin, which takes one count for all levels, as (N, Lq, M, 3, 6)
    weights whose padding is zero: exact (the padded points add nothing)."""
    import onnx

    from dnops.compat import tensorrt

    args = (torch.randn(2, 49, 4, 8), torch.rand(2, 5, 4, 12, 2), torch.randn(2, 5, 4, 12))
    extra = {"custom_translation_table": tensorrt.translation_table()} if exporter == "dynamo" else {}
    path = tmp_path / "trt.onnx"
    with tensorrt.plugin_export(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(RealTimeAttention("default"), args, str(path), dynamo=exporter == "dynamo", **extra)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    plugins = [n for n in model.graph.node if n.op_type == tensorrt.PLUGIN]
    assert len(plugins) == 1 and not any(n.op_type == "GridSample" for n in model.graph.node)
    shapes = {v.name: v for v in (*model.graph.value_info, *model.graph.input)}
    dims = [[d.dim_value for d in shapes[name].type.tensor_type.shape.dim] for name in plugins[0].input[3:]]
    assert dims == [[2, 5, 4, 3, 6, 2], [2, 5, 4, 3, 6]]  # locations and weights, the levels padded to six points


class FoldedAttention(torch.nn.Module):
    """The op as ultralytics (8.4+) and rfdetr's export mode call it: levels and points folded into one axis, no
    tensor above rank 5 on the caller's side."""

    def __init__(self, sampling="bilinear", points=(2, 2)):
        super().__init__()
        self.sampling, self.points = sampling, list(points)

    def forward(self, value, shapes, starts, loc, weights):
        return dnops.ms_deform_attn(
            value, shapes, starts, loc, weights, points_per_level=self.points, sampling=self.sampling
        )


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("sampling,points", [("bilinear", (2, 2)), ("discrete", (2, 2)), ("bilinear", (3, 1))], ids=str)
def test_every_export_formulation_stays_at_rank_5(tmp_path, exporter, sampling, points):
    """CoreML converts tensors of rank <= 5: the exported deformable attention, one count or one per level, bilinear
    or discrete, holds none larger (walked over the graph after shape inference), and is still the op."""
    from tests.msda_utils import onnx_max_rank

    torch.manual_seed(0)
    shapes, starts = torch.tensor([[5, 6], [3, 3]]), torch.tensor([0, 30])
    args = (
        torch.randn(2, 39, 4, 8),
        shapes,
        starts,
        torch.rand(2, 7, 4, sum(points), 2),
        torch.rand(2, 7, 4, sum(points)),
    )
    module = FoldedAttention(sampling, points)
    names = ["value", "shapes", "starts", "loc", "weights"]
    session = export(module, args, tmp_path / "folded.onnx", exporter, names)
    assert onnx_max_rank(str(tmp_path / "folded.onnx")) <= 5
    with dnops._backend.use_backend("reference"):
        want = module(*args)
    torch.testing.assert_close(run(session, names, args), want, rtol=1e-4, atol=1e-5)
    program = torch.export.export(module, args)
    ranks = [n.meta["val"].dim() for n in program.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert max(ranks) <= 5
