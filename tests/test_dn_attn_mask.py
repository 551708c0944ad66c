"""dn_attn_mask, every backend against the reference (dnops.reference.dn_attn_mask) and DN-DETR's own mask;
the GPU tests (``pytest -m cuda`` / ``-m emulated``)."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import dnops
from dnops import reference
from originals import dn_detr_group_mask
from tests.conftest import requires_cpp
from tests.gpu_utils import cuda


def dn_detr_mask(pad_size: int, single_pad: int, scalar: int, num_queries: int) -> torch.Tensor:
    return dn_detr_group_mask(pad_size, single_pad, scalar, pad_size + num_queries)


LAYOUTS = [(0, 0, 5), (3, 3, 0), (6, 2, 3), (10, 2, 7), (100, 20, 300), (7, 1, 4), (12, 12, 1)]


@pytest.mark.parametrize("pad_size,group_size,num_queries", LAYOUTS)
def test_reference_matches_dn_detr(pad_size, group_size, num_queries):
    expected = dn_detr_mask(pad_size, group_size, pad_size // max(group_size, 1), num_queries)
    assert torch.equal(reference.dn_attn_mask(pad_size, group_size, num_queries), expected)


@requires_cpp("dn_attn_mask")
@pytest.mark.parametrize("pad_size,group_size,num_queries", LAYOUTS)
def test_cpp_matches_reference(pad_size, group_size, num_queries):
    out = torch.ops.dnops.dn_attn_mask(pad_size, group_size, num_queries)
    assert out.dtype == torch.bool and out.device.type == "cpu"
    assert torch.equal(out, reference.dn_attn_mask(pad_size, group_size, num_queries))


def test_public_uses_cpp_and_honours_override(backend_env):
    assert torch.equal(dnops.dn_attn_mask(6, 2, 3), reference.dn_attn_mask(6, 2, 3))
    backend_env("reference")
    assert torch.equal(dnops.dn_attn_mask(6, 2, 3), reference.dn_attn_mask(6, 2, 3))


@requires_cpp("dn_attn_mask")
@pytest.mark.parametrize("args", [(6, 2, 3), (0, 0, 4), (40, 8, 17)])
def test_opcheck(args):
    opcheck(torch.ops.dnops.dn_attn_mask.default, args)


@requires_cpp("dn_attn_mask")
def test_compile_fullgraph():
    fn = torch.compile(lambda pad, nq: dnops.dn_attn_mask(pad, 4, nq), fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(12, 5), reference.dn_attn_mask(12, 4, 5))


@pytest.mark.parametrize(
    "args,match",
    [((5, 2, 3), "multiple of group_size"), ((-1, 2, 3), "pad_size must be >= 0"), ((4, 0, 3), "group_size")],
)
def test_bad_structure_raises(args, match):
    with pytest.raises(ValueError, match=match):
        dnops.dn_attn_mask(*args)


@requires_cpp("dn_attn_mask")
def test_cpp_kernel_checks_too():
    with pytest.raises(RuntimeError, match="multiple of group_size"):
        torch.ops.dnops.dn_attn_mask(5, 2, 3)


@pytest.mark.cuda
def test_cuda_matches_reference():
    out = dnops.dn_attn_mask(40, 8, 17, device="cuda")
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), reference.dn_attn_mask(40, 8, 17))


# ---- on the GPU (pytest -m cuda) and the CUDA emulator (pytest -m emulated) ------------------------------------------


@pytest.mark.parametrize("pad,group,queries", [(40, 8, 17), (0, 0, 5), (6, 3, 0), (120, 24, 200)])
def test_gpu_equals_reference(dev, pad, group, queries):
    got = dnops.dn_attn_mask(pad, group, queries, device=dev)
    assert got.device.type == dev
    assert torch.equal(got.cpu(), reference.dn_attn_mask(pad, group, queries))


@cuda
def test_sanitizer_dn_attn_mask():
    for pad, group, queries in ((40, 8, 17), (0, 0, 5), (6, 3, 0)):
        test_gpu_equals_reference("cuda", pad, group, queries)
