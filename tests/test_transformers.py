"""HuggingFace transformers' deformable-attention models routed to dnops by one call: outputs and gradients equal
to the models' own path, on small randomly initialised configs (nothing is downloaded)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dnops  # noqa: E402
from dnops.compat import transformers as compat  # noqa: E402
from dnops.compat.transformers import use_dnops  # noqa: E402
from tests.routing import front_door  # noqa: E402

# the transformer sizes of every small config
SMALL = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_queries=10,
)


def _resnet(config_cls, **kw):
    return config_cls(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], **kw)


def deformable_detr():
    cfg = transformers.DeformableDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=_resnet(transformers.ResNetConfig, out_features=["stage2", "stage3", "stage4"]),
        **SMALL,
    )
    return transformers.DeformableDetrModel(cfg), {"pixel_values": torch.rand(2, 3, 96, 96)}


def _rt_detr(config_cls, model_cls, **kw):
    backbone = _resnet(transformers.RTDetrResNetConfig, out_features=["stage2", "stage3", "stage4"])
    cfg = config_cls(
        backbone_config=backbone,
        encoder_in_channels=[16, 16, 16],
        decoder_in_channels=[32, 32, 32],
        encoder_hidden_dim=32,
        **SMALL,
        **kw,
    )
    return model_cls(cfg), {"pixel_values": torch.rand(2, 3, 96, 96)}


def rt_detr():
    return _rt_detr(transformers.RTDetrConfig, transformers.RTDetrModel)


def rt_detr_v2():
    return _rt_detr(transformers.RTDetrV2Config, transformers.RTDetrV2Model)


def rt_detr_v2_discrete():
    return _rt_detr(transformers.RTDetrV2Config, transformers.RTDetrV2Model, decoder_method="discrete")


def _d_fine(method="default", points=(3, 6, 3)):
    """D-FINE with its configs' point counts per level, on a small HGNetV2 backbone."""
    backbone = transformers.HGNetV2Config(
        embedding_size=8,
        depths=[1, 1, 1, 1],
        hidden_sizes=[16, 32, 32, 32],
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 32, 32],
        stage_mid_channels=[8, 8, 16, 16],
        stage_out_channels=[16, 32, 32, 32],
        stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[2, 2, 2, 2],
        out_features=["stage2", "stage3", "stage4"],
    )
    small = {**SMALL, "decoder_layers": 2}
    cfg = transformers.DFineConfig(
        backbone_config=backbone,
        encoder_in_channels=[32, 32, 32],
        decoder_in_channels=[32, 32, 32],
        encoder_hidden_dim=32,
        decoder_n_points=list(points),
        decoder_method=method,
        **small,
    )
    return transformers.DFineModel(cfg), {"pixel_values": torch.rand(2, 3, 96, 96)}


def d_fine():
    return _d_fine()


def d_fine_discrete():
    return _d_fine("discrete")


def grounding_dino():
    text = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32
    )
    cfg = transformers.GroundingDinoConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=_resnet(transformers.ResNetConfig, out_features=["stage2", "stage3", "stage4"]),
        text_config=text,
        **SMALL,
        max_text_len=16,
    )
    ids = torch.randint(1, 50, (2, 7))
    return transformers.GroundingDinoModel(cfg), {"pixel_values": torch.rand(2, 3, 96, 96), "input_ids": ids}


@pytest.mark.parametrize(
    "build",
    [deformable_detr, rt_detr, rt_detr_v2, rt_detr_v2_discrete, grounding_dino, d_fine, d_fine_discrete],
    ids=lambda f: f.__name__,
)
@pytest.mark.parametrize("route", [use_dnops, front_door], ids=["transformers.use_dnops", "compat.use_dnops"])
def test_use_dnops_gives_the_models_own_outputs_and_gradients(build, route, monkeypatch):
    theirs, inputs = _off_grid(*build())
    ours = copy.deepcopy(theirs)
    assert route(ours) > 0 and route(ours) == 0  # idempotent
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # each model's decoder runs its deformable attention (the encoder too, but for RT-DETR's)
    assert _assert_same_outputs_and_gradients(theirs, ours, inputs, monkeypatch) >= 1


def _off_grid(model, inputs):
    """The model in float64 and eval mode (no dropout), its sampling offsets moved off the pixel grid: at the initial
    whole-pixel offsets bilinear sampling has a kink, where the gradient of a location is one-sided and grid_sample
    and the kernel may pick either side."""
    torch.manual_seed(0)
    model = model.double().eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "sampling_offsets"):
                module.sampling_offsets.bias.add_(torch.randn_like(module.sampling_offsets.bias) * 0.1)
    return model, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def _assert_same_outputs_and_gradients(theirs, ours, inputs, monkeypatch) -> int:
    """The routed model's output and parameter gradients equal the model's own; returns how often dnops ran."""
    calls = []
    monkeypatch.setattr(compat, "ms_deform_attn", lambda *a, **kw: calls.append(1) or dnops.ms_deform_attn(*a, **kw))
    results = []
    for model in (theirs, ours):
        out = model(**inputs).last_hidden_state
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((out, torch.autograd.grad(out.square().sum(), params, allow_unused=True)))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)
    return len(calls)


@pytest.mark.parametrize(
    "build", [deformable_detr, rt_detr, rt_detr_v2, grounding_dino, d_fine], ids=lambda f: f.__name__
)
def test_routed_models_pickle_deepcopy_and_round_trip_their_state(build, tmp_path):
    """torch.save / pickle, deepcopy and state_dict of a routed model of every family: the copies stay routed and
    give the routed model's outputs."""
    import pickle

    torch.manual_seed(0)
    model, inputs = build()
    model = model.double().eval()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    assert use_dnops(model) > 0
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    torch.save(model, tmp_path / "model.pt")
    copies = [
        pickle.loads(pickle.dumps(model)),
        copy.deepcopy(model),
        torch.load(tmp_path / "model.pt", weights_only=False),
    ]
    fresh, _ = build()
    fresh = fresh.double().eval()
    use_dnops(fresh)
    fresh.load_state_dict(model.state_dict())
    for other in [*copies, fresh]:
        assert use_dnops(other) == 0  # already routed
        assert list(other.state_dict()) == list(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(other(**inputs).last_hidden_state, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["INFERENCE", "TRAINING"])
def test_kernels_kernelize_runs_the_hub_routed_layer_on_dnops(mode, monkeypatch):
    """Deformable DETR's MultiScaleDeformableAttention is decorated use_kernel_forward_from_hub: with dnops' local
    kernel repository mapped, the kernels package's own kernelize routes it to dnops (outputs and gradients equal to
    the model's own path; eval mode in both kernels modes, so that no dropout differs)."""
    kernels = pytest.importorskip("kernels")
    theirs, inputs = _off_grid(*deformable_detr())
    ours = copy.deepcopy(theirs)
    with kernels.use_kernel_mapping(compat.kernel_mapping(("cpu",))):
        ours = kernels.kernelize(ours, mode=getattr(kernels.Mode, mode), device="cpu")
    assert _assert_same_outputs_and_gradients(theirs, ours, inputs, monkeypatch) >= 1, "kernelize routed it to dnops"
