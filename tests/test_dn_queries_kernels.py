"""Every dn_queries backend against the reference: identical labels, gt_index, negative; boxes within 1e-6."""

import pytest
import torch
from torch.library import opcheck

import dnops
from dnops import _backend
from dnops.reference import dn_layout
from dnops.reference import dn_queries as dn_queries_reference
from tests.dn_utils import make_gt

CASES = [
    ([3, 0, 5, 1], "dn", {}),
    ([2, 7], "cdn", {}),
    ([0, 0], "dn", {}),
    ([0, 4], "cdn", {"dn_number": 3}),
    ([600, 2], "cdn", {"max_dn_queries": 200}),
    ([9, 1, 1], "dn", {"num_groups": 1, "label_noise_ratio": 1.0}),
]


def kernel_args(counts, mode, kw, dtype=torch.float32, num_classes=7, seed=12345):
    labels, boxes, counts = make_gt(counts, num_classes=num_classes, dtype=dtype)
    contrastive = mode == "cdn"
    groups, max_gt = dn_layout(
        counts, contrastive, kw.get("num_groups", 5), kw.get("dn_number", 100), kw.get("max_dn_queries")
    )
    ratio = kw.get("label_noise_ratio", 0.5 if contrastive else 0.2) * (0.5 if contrastive else 1.0)
    return (labels, boxes, counts, groups, max_gt, contrastive, num_classes, ratio, 0.4, seed)


def assert_same(got, want):
    assert torch.equal(got[0], want[0]), "labels"
    assert got[1].dtype == want[1].dtype
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=0, atol=1e-6)
    assert torch.equal(got[2], want[2]), "gt_index"
    assert torch.equal(got[3], want[3]), "negative"


cpp = pytest.mark.skipif(not _backend.has_kernel("dn_queries", "cpu"), reason="no C++ dn_queries kernel")


@cpp
@pytest.mark.parametrize("counts,mode,kw", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpp_matches_reference(counts, mode, kw, dtype):
    args = kernel_args(counts, mode, kw, dtype)
    assert_same(torch.ops.dnops.dn_queries(*args), dn_queries_reference(*args))


@cpp
def test_cpp_large_seed_and_many_groups():
    args = list(kernel_args([4, 6], "dn", {"num_groups": 300}))
    args[-1] = 2**62 - 3
    assert_same(torch.ops.dnops.dn_queries(*args), dn_queries_reference(*args))


@cpp
def test_public_function_uses_cpp_and_matches_reference(backend_env):
    labels, boxes, counts = make_gt([3, 9, 0], num_classes=11)
    for mode in ("dn", "cdn"):
        fast = dnops.dn_queries(labels, boxes, counts, num_classes=11, mode=mode, seed=9)
        backend_env("reference")
        slow = dnops.dn_queries(labels, boxes, counts, num_classes=11, mode=mode, seed=9)
        backend_env("cpu")
        assert_same(tuple(fast)[:4], tuple(slow)[:4])
        assert fast[4:] == slow[4:]


@cpp
def test_cpp_rejects_bad_labels():
    labels, boxes, counts = make_gt([3], num_classes=5)
    labels[1] = 5
    with pytest.raises(ValueError, match="labels must be in"):
        torch.ops.dnops.dn_queries(labels, boxes, counts, 2, 3, False, 5, 0.2, 0.4, 0)
    boxes[0, 2] = float("nan")
    with pytest.raises(ValueError, match="boxes must be finite"):
        torch.ops.dnops.dn_queries(labels.clamp(max=4), boxes, counts, 2, 3, False, 5, 0.2, 0.4, 0)
    with pytest.raises(RuntimeError, match="counts sum"):
        torch.ops.dnops.dn_queries(labels.clamp(max=4), boxes, [2], 2, 3, False, 5, 0.2, 0.4, 0)


@cpp
def test_opcheck():
    opcheck(torch.ops.dnops.dn_queries.default, kernel_args([2, 5], "cdn", {"dn_number": 4}))


@cpp
def test_compile_fullgraph():
    labels, boxes, counts = make_gt([2, 5], num_classes=7)

    def fn(lab, box):
        return dnops.dn_queries(lab, box, counts, num_classes=7, seed=3).boxes

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(labels, boxes), fn(labels, boxes))


@cpp
def test_fused_op_dispatches_one_op_and_no_sync():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    labels, boxes, counts = make_gt([3, 7, 12, 5, 30, 1, 9, 0])
    with Count() as mode:
        dnops.dn_queries(labels, boxes, counts, num_classes=10)
    assert mode.ops == ["dnops.dn_queries.default"]


@pytest.mark.cuda
def test_cuda_matches_reference():
    args = list(kernel_args([3, 0, 5], "cdn", {}))
    args[0], args[1] = args[0].cuda(), args[1].cuda()
    got = torch.ops.dnops.dn_queries(*args)
    assert_same([t.cpu() for t in got], dn_queries_reference(*kernel_args([3, 0, 5], "cdn", {})))


@pytest.mark.triton
@pytest.mark.parametrize("counts,mode,kw", CASES)
def test_triton_matches_reference(counts, mode, kw):
    from dnops.triton.dn_queries import dn_queries_triton

    args = kernel_args(counts, mode, kw)
    assert_same(dn_queries_triton(*args), dn_queries_reference(*args))
