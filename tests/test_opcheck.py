"""torch.library.opcheck on every argument variant of every registered dnops op, as the public functions call them:
each variant's calls are recorded (the op and its exact arguments, forward and backward) and each is checked
(schema, fake-tensor kernel, autograd registration, AOT dispatch). On the CPU the compiled kernels; on a GPU the
CUDA kernels and the Triton ops (in Triton's CPU interpreter opcheck cannot run: it touches fake tensors' data)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

import dnops
from dnops import _backend
from dnops.compat import dn_detr
from dnops.ops.dn_queries import generate
from tests.dn_utils import make_gt
from tests.msda_utils import make_inputs


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dnops":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _recorded(run: Callable[[], None]) -> list[tuple]:
    with _Recorder() as recorder:
        run()
    return recorder.calls


def _msda(device: str, **kw) -> Callable[[], None]:
    def run() -> None:
        points = kw.get("points_per_level")
        if points is None:
            args = make_inputs(n=2, lq=3, m=2, d=5, p=2, requires_grad=True, device=device)
        else:
            value, shapes, starts, loc, weights = make_inputs(n=2, lq=3, m=2, d=5, p=3, device=device)
            loc = loc.flatten(3, 4)[:, :, :, : sum(points)].contiguous().requires_grad_()
            weights = weights.flatten(3, 4)[:, :, :, : sum(points)].contiguous().requires_grad_()
            args = (value.requires_grad_(), shapes, starts, loc, weights)
        dnops.ms_deform_attn(*args, **kw).sum().backward()

    return run


def _dn_queries(device: str, mode: str, abs_size: bool) -> Callable[[], None]:
    def run() -> None:
        labels, boxes, counts = make_gt([3, 0, 5], num_classes=7)
        generate(labels.to(device), boxes.to(device), counts, 3, 5, mode == "cdn", 7, 0.3, 0.4, 12345, abs_size)

    return run


def _dn_detr_prepare(device: str) -> Callable[[], None]:
    def run() -> None:
        labels, boxes, counts = make_gt([3, 1], num_classes=9)
        targets = [
            {"labels": t.to(device), "boxes": b.to(device)}
            for t, b in zip(labels.split(counts), boxes.split(counts), strict=True)
        ]
        label_enc = torch.nn.Embedding(10, 15).to(device)
        embed = torch.rand(12, 4, device=device)
        dn_detr.prepare_for_dn((targets, 5, 0.2, 0.4, 1), embed, 2, True, 12, 9, 16, label_enc)

    return run


def _dn_self_attention(device: str) -> Callable[[], None]:
    def run() -> None:
        q, k, v = (torch.randn(2, 3, 13, 8, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3))
        dnops.dn_self_attention(q, k, v, 8, 4).sum().backward()

    return run


def _dn_attn_mask(device: str) -> Callable[[], None]:
    return lambda: dnops.dn_attn_mask(8, 4, 5, device=device)


VARIANTS = {
    "ms_deform_attn": lambda d: _msda(d),
    "ms_deform_attn logits": lambda d: _msda(d, attention_logits=True),
    "ms_deform_attn points_per_level": lambda d: _msda(d, points_per_level=[3, 1]),
    "ms_deform_attn discrete": lambda d: _msda(d, sampling="discrete"),
    "ms_deform_attn points_per_level discrete logits": lambda d: _msda(
        d, points_per_level=[2, 3], sampling="discrete", attention_logits=True
    ),
    "dn_queries dn": lambda d: _dn_queries(d, "dn", False),
    "dn_queries cdn": lambda d: _dn_queries(d, "cdn", False),
    "dn_queries cdn abs_size": lambda d: _dn_queries(d, "cdn", True),
    "_dn_detr_prepare": _dn_detr_prepare,
    "dn_self_attention": _dn_self_attention,
    "dn_attn_mask": _dn_attn_mask,
}
OP_OF = {
    "ms_deform_attn": "ms_deform_attn",
    "dn_queries": "dn_queries",
    "_dn_detr_prepare": "dn_queries",
    "dn_self_attention": "dn_self_attention",
    "dn_attn_mask": "dn_attn_mask",
}

TARGETS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
    pytest.param("cuda", "triton", id="triton", marks=pytest.mark.cuda),
]


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_every_variant(variant, device, backend):
    op = OP_OF[variant.split()[0]]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not _backend.available(op, device)[backend] or not _backend.formulates(op, backend):
        pytest.skip(f"no {backend} implementation of {op} on {device} here")
    with dnops.use_backend(backend):
        calls = _recorded(VARIANTS[variant](device))
    assert calls, f"{variant}: no dnops op was dispatched on the {backend} backend"
    for func, args, kwargs in calls:
        if func.__name__.split(".")[0].endswith(
            "_backward"
        ):  # a backward is not differentiated again (no double backward)
            args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        opcheck(func, tuple(args), kwargs)
