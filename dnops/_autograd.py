"""The autograd of each differentiable op, written once and registered on every kernel pair that implements it
(the ``dnops::`` C++ / CUDA ops and the Triton ops alike)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _register(op: Any, backward: Callable, setup_context: Callable | None = None) -> None:
    """``op``: a ``"dnops::name"`` or a torch.library custom op (a triton_op)."""
    if isinstance(op, str):
        torch.library.register_autograd(op, backward, setup_context=setup_context)
    else:
        op.register_autograd(backward, setup_context=setup_context)


def _callable(op: Any) -> Callable:
    if isinstance(op, str):
        namespace, name = op.split("::")
        return getattr(getattr(torch.ops, namespace), name).default
    return op


def forbid_double_backward(backward_op: Any, public_name: str) -> None:
    """Makes differentiating through ``backward_op`` (an op name or a triton_op) raise a clear error.

    The backward kernels have no derivative of their own; without a formula, autograd would treat their outputs
    as constants under create_graph=True and return zeros for second derivatives, with only a warning.
    """

    def backward(ctx, *grads):
        raise RuntimeError(f"double backward is not supported by dnops.{public_name}")

    _register(backward_op, backward)


def register_ms_deform_attn(forward_op: Any, backward_op: Any) -> None:
    """ms_deform_attn's autograd on a kernel pair: ``forward_op(value, spatial_shapes, level_start_index,
    sampling_locations, attention_weights, logits, points_per_level, discrete) -> (N, Lq, M * D)`` and
    ``backward_op(grad_output, <the same eight>) -> (grad_value, grad_sampling_locations, grad_attention_weights)``."""
    backward_kernel = _callable(backward_op)

    def setup_context(ctx, inputs, output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *options = inputs
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        ctx.options = options

    def backward(ctx, grad_output):
        grads = backward_kernel(grad_output, *ctx.saved_tensors, *ctx.options)
        return grads[0], None, None, grads[1], grads[2], *(None for _ in ctx.options)

    _register(forward_op, backward, setup_context)
    forbid_double_backward(backward_op, "ms_deform_attn")


def register_dn_self_attention(forward_op: Any, backward_op: Any) -> None:
    """dn_self_attention's autograd on a kernel pair: ``forward_op(q, k, v, pad_size, group_size, scale) -> (out,
    lse)`` with q, k, v, out (B, H, W, Dh) and the log-sum-exp lse (B, H, W), and ``backward_op(grad_out, q, k, v,
    out, lse, pad_size, group_size, scale) -> (dq, dk, dv)``. The lse output has no gradient of its own."""
    backward_kernel = _callable(backward_op)

    def setup_context(ctx, inputs, output):
        q, k, v, pad_size, group_size, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.structure = (pad_size, group_size, scale)

    def backward(ctx, grad_out, _grad_lse):
        dq, dk, dv = backward_kernel(grad_out, *ctx.saved_tensors, *ctx.structure)
        return dq, dk, dv, None, None, None

    _register(forward_op, backward, setup_context)
    forbid_double_backward(backward_op, "dn_self_attention")
