"""HuggingFace transformers' deformable-attention models on dnops: ``use_dnops(model)``.

Deformable DETR, RT-DETR, Grounding DINO (and the other transformers models built the same way: MM Grounding
DINO, OmDet-Turbo, LW-DETR, ...) compute their deformable attention in a ``MultiScaleDeformableAttention``
submodule (grid_sample in PyTorch, or a kernel from the hub). ``use_dnops`` replaces each of them in a loaded
model with one that calls ``dnops.ms_deform_attn``: same inputs, same outputs, no parameters (so state_dicts are
unchanged). RT-DETR v2, D-FINE and DEIMv2 compute theirs in a module-level function instead
(``multi_scale_deformable_attention_v2``: a point count per level, "default" or "discrete" sampling), which
becomes ``dnops.ms_deform_attn`` with ``points_per_level`` and ``sampling``: RT-DETR v2's attention modules get a
subclass whose forward is the original's code reading that name from dnops; D-FINE's and DEIMv2's hold the function
in their ``ms_deformable_attn_core`` attribute, which is replaced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from dnops.compat._levels import level_tensors
from dnops.compat._rebind import calls_global, is_rebound, rebound_class
from dnops.ops.ms_deform_attn import ms_deform_attn


class MultiScaleDeformableAttention(nn.Module):
    """transformers' MultiScaleDeformableAttention interface on dnops kernels (any device, dtype and backend)."""

    # what the kernels package's kernelize reads of a layer (kernel_mapping): it has a backward and compiles
    has_backward = True
    can_torch_compile = True

    def forward(
        self,
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int,
    ) -> torch.Tensor:
        """value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P) ->
        (N, Lq, M * D); value_spatial_shapes_list and im2col_step are accepted and not needed."""
        return ms_deform_attn(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)


KERNEL_REPO = Path(__file__).parent / "kernel_repo"


def kernel_mapping(devices: Sequence[str] = ("cuda", "cpu")) -> dict:
    """A mapping for the ``kernels`` package that runs transformers' kernel-routed deformable attention (the layers
    decorated ``use_kernel_forward_from_hub("MultiScaleDeformableAttention")``: Deformable DETR and the models
    sharing its module) on dnops through kernels' own ``kernelize``::

        from kernels import Mode, kernelize, use_kernel_mapping

        with use_kernel_mapping(kernel_mapping()):
            model = kernelize(model, mode=Mode.TRAINING, device="cuda")

    The repository is local (``KERNEL_REPO``, a universal build that imports the installed dnops): nothing is
    downloaded. ``use_dnops(model)`` does the same without the kernels package."""
    from kernels import LocalLayerRepository

    layer = "MultiScaleDeformableAttention"
    repo = LocalLayerRepository(repo_path=KERNEL_REPO, layer_name=layer, check_arch=False)
    return {layer: dict.fromkeys(devices, repo)}


_V2_FUNCTION = "multi_scale_deformable_attention_v2"


def v2_dnops(
    original: Callable[..., torch.Tensor],
    value: torch.Tensor,
    value_spatial_shapes: Sequence[Sequence[int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list: list[int],
    method: str = "default",
) -> torch.Tensor:
    """transformers' multi_scale_deformable_attention_v2 on dnops.ms_deform_attn: value (N, S, M, D),
    sampling_locations (N, Lq, M, sum_l P_l, 2), attention_weights (N, Lq, M, sum_l P_l), level-major ->
    (N, Lq, M * D). transformers' "discrete" clamps each axis to its own size, as dnops' discrete sampling does; a
    method transformers does not know goes to its function (which fails on it)."""
    if method not in ("default", "discrete"):
        return original(value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list, method)
    shapes, starts = level_tensors(value_spatial_shapes, value.device)
    sampling = "discrete" if method == "discrete" else "bilinear"
    points = list(num_points_list)
    return ms_deform_attn(
        value, shapes, starts, sampling_locations, attention_weights, points_per_level=points, sampling=sampling
    )


def _v2_on_dnops(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The dnops version of ``original`` (a partial of module-level functions: it pickles with its module)."""
    return functools.partial(v2_dnops, original)


def _is_v2_function(fn: object) -> bool:
    return getattr(fn, "__name__", None) == _V2_FUNCTION and getattr(fn, "__module__", "").startswith("transformers.")


def _is_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def use_dnops(model: nn.Module) -> int:
    """Routes the deformable attention of a transformers model to dnops, in place: every
    ``MultiScaleDeformableAttention`` submodule is replaced, every RT-DETR v2 attention module takes the dnops
    function (see the module docstring). Parameters and state_dict keys are unchanged. Returns how many modules
    were routed (0: none, or already routed)."""
    swaps = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child).__name__ == "MultiScaleDeformableAttention"
        and _is_transformers(child)
        and not isinstance(child, MultiScaleDeformableAttention)
    ]
    for parent, name in swaps:
        setattr(parent, name, MultiScaleDeformableAttention())
    v2 = [
        module
        for module in model.modules()
        if _is_transformers(module) and not is_rebound(module) and calls_global(type(module), _V2_FUNCTION)
    ]
    for module in v2:
        module.__class__ = rebound_class(type(module), _V2_FUNCTION, _v2_on_dnops)
    # D-FINE and DEIMv2 keep the function in an attribute, ms_deformable_attn_core
    held = [
        module
        for module in model.modules()
        if _is_transformers(module) and _is_v2_function(getattr(module, "ms_deformable_attn_core", None))
    ]
    for module in held:
        module.ms_deformable_attn_core = _v2_on_dnops(module.ms_deformable_attn_core)
    return len(swaps) + len(v2) + len(held)
