"""``dnops.compat.use_dnops(model)``: one call that routes every module of every model family dnops serves."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from dnops.compat import rfdetr, rtdetr, transformers, ultralytics
from dnops.compat._rebind import is_rebound
from dnops.nn.dn_mha import DNMultiheadAttention
from dnops.nn.ms_deform_attn import MSDeformAttn

# Deformable-DETR's MSDeformAttn forward (and DN-DETR's, DINO's, DAB-/Conditional-DETR descendants', which copy it)
_DEFORMABLE_DETR_FORWARD = (
    "self",
    "query",
    "reference_points",
    "input_flatten",
    "input_spatial_shapes",
    "input_level_start_index",
    "input_padding_mask",
)
_DEFORMABLE_DETR_CHILDREN = {"sampling_offsets", "attention_weights", "value_proj", "output_proj"}


def _is_deformable_detr_module(module: nn.Module) -> bool:
    """A research repository's ``MSDeformAttn`` (Deformable-DETR's module, its parameters and forward), whose
    compiled or grid_sample core is replaced by making it a dnops.nn.MSDeformAttn (the same attributes and
    state_dict)."""
    if isinstance(module, MSDeformAttn) or type(module).__name__ != "MSDeformAttn":
        return False
    forward = getattr(type(module), "forward", None)
    try:
        params = tuple(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return False
    names = {name for name, _ in module.named_children()}
    attrs = all(isinstance(getattr(module, a, None), int) for a in ("d_model", "n_levels", "n_heads", "n_points"))
    return params == _DEFORMABLE_DETR_FORWARD and _DEFORMABLE_DETR_CHILDREN <= names and attrs


def _deformable_detr(model: nn.Module, self_attention: bool) -> int:
    modules = [m for m in model.modules() if _is_deformable_detr_module(m)]
    for module in modules:
        module.__class__ = MSDeformAttn
    return len(modules)


def _transformers(model: nn.Module, self_attention: bool) -> int:
    return transformers.use_dnops(model)


def _rtdetr(model: nn.Module, self_attention: bool) -> int:
    return rtdetr.use_dnops(model, self_attention=False)


def _decoder_self_attention(model: nn.Module, self_attention: bool) -> int:
    # RF-DETR trains without denoising queries: no DN mask reaches its decoder's self-attention
    return rtdetr.route_decoder_self_attention(model, skip=_no_denoising) if self_attention else 0


def _no_denoising(layer: nn.Module) -> bool:
    return type(layer).__module__.startswith("rfdetr.")


def _ultralytics(model: nn.Module, self_attention: bool) -> int:
    return ultralytics.use_dnops(model, self_attention=self_attention)


def _rfdetr(model: nn.Module, self_attention: bool) -> int:
    return rfdetr.use_dnops(model)


# In this order: the packages' own modules first (ultralytics' MSDeformAttn has Deformable-DETR's parameters but
# not its forward), then the RT-DETR family's code, the research repositories' MSDeformAttn, and the decoder layers'
# self-attention of any family.
FAMILIES: dict[str, Callable[[nn.Module, bool], int]] = {
    "ultralytics": _ultralytics,
    "rfdetr": _rfdetr,
    "transformers": _transformers,
    "rtdetr": _rtdetr,
    "deformable_detr": _deformable_detr,
    "decoder_self_attention": _decoder_self_attention,
}


@dataclass
class Entry:
    path: str  # the module's name in model.named_modules() ("" for the model itself)
    kind: str  # "ms_deform_attn", "self_attention", "denoising", or "attention" for one left alone
    family: str | None  # who routed it; None: left alone
    why: str


@dataclass
class Routing:
    """What ``use_dnops`` did: ``counts[kind]`` modules routed per kind, ``entries`` every module routed or left
    alone with why; ``str()`` is the table ``explain=True`` prints."""

    counts: dict[str, int] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)

    @property
    def routed(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.entries:
            return "dnops.compat.use_dnops: no attention module found"
        width = max(len(e.path or "(model)") for e in self.entries)
        lines = [f"dnops.compat.use_dnops: {self.routed} module(s) routed {self.counts}"]
        for e in self.entries:
            state = f"routed ({e.family})" if e.family else "left alone"
            lines.append(f"  {e.path or '(model)':<{width}}  {e.kind:<15} {state}: {e.why}")
        return "\n".join(lines)


def _state(module: nn.Module) -> tuple:
    return type(module), id(getattr(module, "ms_deformable_attn_core", None))


def _snapshot(model: nn.Module) -> dict[str, tuple]:
    return {path: (id(m), *_state(m)) for path, m in model.named_modules()}


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return "self_attention"
    if hasattr(module, "denoising_class_embed"):
        return "denoising"
    return "ms_deform_attn"


_WHY = {
    "ms_deform_attn": "runs dnops.ms_deform_attn",
    "self_attention": "DNMultiheadAttention: block-sparse under a DN mask, nn.MultiheadAttention's path otherwise",
    "denoising": "its denoising group comes from dnops.dn_queries",
}


def _on_dnops(module: nn.Module) -> bool:
    """Whether an earlier call routed ``module``."""
    if isinstance(module, DNMultiheadAttention | MSDeformAttn | transformers.MultiScaleDeformableAttention):
        return True
    if is_rebound(module):
        return True
    core = getattr(module, "ms_deformable_attn_core", None)
    core = getattr(core, "func", core)
    return core in (
        rtdetr.deformable_attention_core_func,
        rtdetr.deformable_attention_core_func_v2,
        transformers.v2_dnops,
    )


def _left_alone(path: str, module: nn.Module, modules: dict[str, nn.Module]) -> Entry | None:
    if _on_dnops(module):
        return Entry(path, "attention", None, "already on dnops")
    if isinstance(module, nn.MultiheadAttention):
        parent, _, name = path.rpartition(".")
        layer = modules.get(parent)
        if name == "self_attn" and rtdetr.is_decoder_layer(layer):
            if _no_denoising(layer):
                return Entry(path, "attention", None, "RF-DETR has no denoising queries: no DN mask reaches it")
            return Entry(path, "attention", None, "self_attention=False")
        return Entry(path, "attention", None, "not a decoder layer's self-attention (no DN mask reaches it)")
    name = type(module).__name__
    if (hasattr(module, "sampling_offsets") and hasattr(module, "attention_weights")) or "DeformableAttention" in name:
        return Entry(path, "attention", None, f"{type(module).__module__}.{name}: not a module dnops knows")
    return None


def use_dnops(model: nn.Module, *, self_attention: bool = True, explain: bool = False) -> Routing:
    """Routes every module dnops serves in ``model``, in place, whatever family built it: ultralytics' RT-DETR,
    Roboflow's RF-DETR, HuggingFace transformers (Deformable DETR, RT-DETR v1 / v2, D-FINE, DEIMv2, Grounding DINO,
    ...), the RT-DETR / D-FINE / DEIM repositories' own code, and the research repositories' Deformable-DETR
    ``MSDeformAttn`` (Deformable-DETR, DN-DETR, DINO, ...); with ``self_attention`` also every decoder layer's
    self-attention (``self_attn`` beside a ``cross_attn``), which runs block-sparse under a DN mask.

    Each family's own ``use_dnops`` (``dnops.compat.<family>.use_dnops``) does the same for its models. Parameters and
    state_dict are unchanged. Routing twice is a no-op; a module dnops does not know is left as it is, never half
    routed. Returns a Routing: counts per kind ("ms_deform_attn", "self_attention", "denoising") and, per module, what
    was routed by which family and what was left alone and why; ``explain=True`` also prints it.
    """
    if not isinstance(model, nn.Module):
        inner = getattr(model, "model", None)  # rfdetr's RFDETR* classes (ultralytics' RTDETR is a module)
        model = inner if isinstance(inner, nn.Module) else getattr(inner, "model", model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"dnops.compat.use_dnops: expected an nn.Module (or a wrapper holding one), got {type(model)}")
    routing = Routing()
    seen = _snapshot(model)
    for family, route in FAMILIES.items():
        if not route(model, self_attention):
            continue
        now = _snapshot(model)
        modules = dict(model.named_modules())
        for path, state in now.items():
            if seen.get(path) != state:
                kind = _kind(modules[path])
                routing.counts[kind] = routing.counts.get(kind, 0) + 1
                routing.entries.append(Entry(path, kind, family, _WHY[kind]))
        seen = now
    routed = [e.path for e in routing.entries]
    modules = dict(model.named_modules())
    for path, module in modules.items():
        # a module routed, or holding one that was (transformers' attention around its kernel module), is served
        if not any(r == path or r.startswith(path + ".") for r in routed):
            entry = _left_alone(path, module, modules)
            if entry is not None:
                routing.entries.append(entry)
    if explain:
        print(routing)
    return routing
