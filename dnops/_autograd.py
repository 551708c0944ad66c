"""Autograd helpers shared by the registrations of every backend (ops and Triton kernels alike)."""

from __future__ import annotations

from typing import Any

import torch


def forbid_double_backward(backward_op: Any, public_name: str) -> None:
    """Makes differentiating through ``backward_op`` (an op name or a triton_op) raise a clear error.

    The backward kernels have no derivative of their own; without a formula, autograd would treat their outputs
    as constants under create_graph=True and return zeros for second derivatives, with only a warning.
    """

    def backward(ctx, *grads):
        raise RuntimeError(f"double backward is not supported by dnops.{public_name}")

    if isinstance(backward_op, str):
        torch.library.register_autograd(backward_op, backward)
    else:
        backward_op.register_autograd(backward)
