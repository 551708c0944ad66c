"""dn_queries, every backend against the reference (dnops.reference.dn_queries): the reference's noise and layout,
the Philox numbers the backends share, the compiled and Triton kernels, bad inputs, properties, and the GPU
tests (``pytest -m cuda`` / ``-m emulated``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import dnops
from dnops import _backend
from dnops.reference import dn_layout
from dnops.reference import dn_queries as dn_queries_reference
from dnops.reference.philox import philox4x32, randint4x, uint32_to_uniform
from tests.backends import backends
from tests.dn_utils import make_gt, to_xyxy
from tests.gpu_utils import DTYPES, backend_fn, cuda, needs
from tests.property_utils import SETTINGS, given, run, st

# ---- the reference ---------------------------------------------------------------------------------------------------


def ref(*args, **kw):
    return dnops.dn_queries(*args, **kw)


@pytest.fixture
def reference_backend(backend_env):
    backend_env("reference")


@pytest.mark.usefixtures("reference_backend")
def test_dn_layout_and_padding():
    labels, boxes, counts = make_gt([2, 0, 3], num_classes=7)
    out = ref(labels, boxes, counts, num_classes=7, num_groups=4, seed=1)
    assert (out.num_groups, out.group_size, out.pad_size) == (4, 3, 12)
    assert out.labels.shape == (3, 12) and out.boxes.shape == (3, 12, 4)
    assert out.gt_index.shape == (3, 12) and out.negative.dtype == torch.bool and not out.negative.any()
    starts = [0, 2, 2]
    for b, c in enumerate(counts):
        for s in range(12):
            j = s % 3
            expect = starts[b] + j if j < c else -1
            assert out.gt_index[b, s] == expect
            if expect < 0:
                assert out.labels[b, s] == 7 and torch.all(out.boxes[b, s] == 0.5)
            else:
                assert 0 <= out.labels[b, s] < 7


@pytest.mark.usefixtures("reference_backend")
def test_no_noise_reconstructs_exactly():
    labels, boxes, counts = make_gt([3, 1], num_classes=5)
    out = ref(labels, boxes, counts, num_classes=5, label_noise_ratio=0.0, box_noise_scale=0.0, seed=3)
    valid = out.gt_index >= 0
    assert torch.equal(out.labels[valid], labels[out.gt_index[valid]])
    assert torch.equal(out.boxes[valid], boxes[out.gt_index[valid]])


@pytest.mark.usefixtures("reference_backend")
def test_cdn_layout():
    labels, boxes, counts = make_gt([2, 5], num_classes=3)
    out = ref(labels, boxes, counts, num_classes=3, mode="cdn", dn_number=100, seed=2)
    # DINO: 2 * dn_number = 200 >= 100 -> 200 // (2 * 5) = 20 groups of 2 * 5 slots.
    assert (out.num_groups, out.group_size, out.pad_size) == (20, 10, 200)
    within = torch.arange(200) % 10
    assert torch.equal(out.negative[1], within >= 5)
    assert torch.equal(out.negative[0], (within >= 5) & (within < 7))
    assert torch.equal(out.gt_index[1], 2 + within % 5)
    small = ref(labels, boxes, counts, num_classes=3, mode="cdn", dn_number=10, seed=2)
    assert small.num_groups == 20 and small.pad_size == 200  # d = 20 < 100 -> 20 groups, as DINO does


@pytest.mark.usefixtures("reference_backend")
def test_zero_gt_batch():
    labels, boxes, counts = make_gt([0, 0])
    for mode in ("dn", "cdn"):
        out = ref(labels, boxes, counts, num_classes=10, mode=mode, seed=0)
        assert out.pad_size == 0 and out.labels.shape == (2, 0) and out.boxes.shape == (2, 0, 4)
        assert out.gt_index.shape == (2, 0) and out.negative.shape == (2, 0)


@pytest.mark.usefixtures("reference_backend")
def test_cdn_noise_ranges():
    labels, boxes, counts = make_gt([40, 25], centered=True)
    # scale < 0.5 keeps the corners from crossing, so every move can be read back from the output box.
    lam = 0.45
    out = ref(labels, boxes, counts, num_classes=10, mode="cdn", box_noise_scale=lam, label_noise_ratio=0, seed=9)
    valid = out.gt_index >= 0
    gt = boxes[out.gt_index[valid]].double()
    moved = (to_xyxy(out.boxes[valid].double()) - to_xyxy(gt)).abs()
    half = torch.stack([gt[:, 2], gt[:, 3], gt[:, 2], gt[:, 3]], -1) / 2 * lam
    ratio = moved / half
    neg = out.negative[valid]
    eps = 1e-4
    assert ratio[~neg].max() < 1 + eps
    assert ratio[neg].min() > 1 - eps and ratio[neg].max() < 2 + eps
    # r ~ U[0, 1) for positives: the mean of |move| / half is 1/2, within 6 standard errors.
    pos = ratio[~neg].flatten()
    assert abs(float(pos.mean()) - 0.5) < 6 * math.sqrt(1 / 12 / pos.numel())


@pytest.mark.usefixtures("reference_backend")
def test_dn_box_noise_bounds_and_distribution():
    labels, boxes, counts = make_gt([300, 200], centered=True)
    lam = 0.4
    out = ref(labels, boxes, counts, num_classes=10, box_noise_scale=lam, num_groups=5, seed=4)
    valid = out.gt_index >= 0
    gt = boxes[out.gt_index[valid]].double()
    span = torch.stack([gt[:, 2] / 2, gt[:, 3] / 2, gt[:, 2], gt[:, 3]], -1) * lam
    u = (out.boxes[valid].double() - gt) / span  # should be U(-1, 1)
    assert u.abs().max() <= 1 + 1e-4
    n = u.numel()
    assert abs(float(u.mean())) < 6 * math.sqrt(1 / 3 / n)
    assert abs(float((u**2).mean()) - 1 / 3) < 6 * math.sqrt((1 / 5 - 1 / 9) / n)
    # Every coordinate gets its own draw: the four columns are uncorrelated.
    corr = torch.corrcoef(u.T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 6 / math.sqrt(u.shape[0])


@pytest.mark.usefixtures("reference_backend")
@pytest.mark.parametrize("mode,ratio,flip", [("dn", 0.2, 0.2), ("cdn", 0.5, 0.25), ("dn", 1.0, 1.0)])
def test_label_flip_rate(mode, ratio, flip):
    nc = 4
    labels, boxes, counts = make_gt([500, 500], num_classes=nc)
    out = ref(labels, boxes, counts, num_classes=nc, mode=mode, label_noise_ratio=ratio, num_groups=5, seed=11)
    valid = out.gt_index >= 0
    changed = (out.labels[valid] != labels[out.gt_index[valid]]).double()
    p = flip * (nc - 1) / nc  # a flipped label may land on the original class
    n = changed.numel()
    assert abs(float(changed.mean()) - p) < 6 * math.sqrt(p * (1 - p) / n) + 1e-12
    new = out.labels[valid]
    assert int(new.min()) >= 0 and int(new.max()) < nc


@pytest.mark.usefixtures("reference_backend")
def test_reproducible_under_manual_seed():
    labels, boxes, counts = make_gt([3, 4])
    torch.manual_seed(123)
    a = ref(labels, boxes, counts, num_classes=10)
    torch.manual_seed(123)
    b = ref(labels, boxes, counts, num_classes=10)
    c = ref(labels, boxes, counts, num_classes=10)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.boxes, c.boxes)


@pytest.mark.usefixtures("reference_backend")
@pytest.mark.parametrize("mode", ["dn", "cdn"])
def test_noise_depends_only_on_seed_group_and_gt(mode):
    labels, boxes, counts = make_gt([2, 3, 9], num_classes=10)
    small = ref(labels[:5], boxes[:5], counts[:2], num_classes=10, mode=mode, dn_number=3, seed=77)
    big = ref(labels, boxes, counts, num_classes=10, mode=mode, dn_number=3, seed=77)
    assert small.num_groups == big.num_groups and small.group_size != big.group_size

    def by_key(out):
        table = {}
        g = torch.arange(out.pad_size) // out.group_size
        for b in range(out.labels.shape[0]):
            for s in range(out.pad_size):
                k = int(out.gt_index[b, s])
                if k >= 0:
                    key = (int(g[s]), k, bool(out.negative[b, s]))
                    table[key] = (int(out.labels[b, s]), out.boxes[b, s].tolist())
        return table

    small_t, big_t = by_key(small), by_key(big)
    assert small_t and all(big_t[key] == val for key, val in small_t.items())


@pytest.mark.usefixtures("reference_backend")
def test_max_dn_queries_caps_crowded_images():
    labels, boxes, counts = make_gt([600, 3])
    out = ref(labels, boxes, counts, num_classes=10, mode="cdn", max_dn_queries=200, seed=0)
    assert out.pad_size <= 200 and out.num_groups == 1 and out.group_size == 200
    assert int(out.gt_index[0].max()) == 99
    dn = ref(labels, boxes, counts, num_classes=10, num_groups=5, max_dn_queries=1000, seed=0)
    assert dn.num_groups == 1 and dn.pad_size == 600


@pytest.mark.usefixtures("reference_backend")
def test_degenerate_and_outside_boxes():
    labels = torch.tensor([0, 1, 2])
    boxes = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.02, -0.01, 0.1, 0.2], [0.3, 0.3, 0.0, 0.4]])
    for mode in ("dn", "cdn"):
        out = ref(labels, boxes, [3], num_classes=1 + 2, mode=mode, seed=5)
        assert torch.isfinite(out.boxes).all() and out.boxes.min() >= 0 and out.boxes.max() <= 1


@pytest.mark.usefixtures("reference_backend")
def test_single_class():
    labels, boxes, counts = make_gt([4], num_classes=1)
    out = ref(labels, boxes, counts, num_classes=1, label_noise_ratio=1.0, seed=0)
    assert torch.equal(out.labels, torch.zeros_like(out.labels))


@pytest.mark.usefixtures("reference_backend")
@pytest.mark.parametrize(
    "labels,boxes,counts,match",
    [
        (torch.tensor([0, 10]), torch.rand(2, 4), [2], "labels must be in"),
        (torch.tensor([-1, 1]), torch.rand(2, 4), [2], "labels must be in"),
        (torch.tensor([0.0, 1.0]), torch.rand(2, 4), [2], "labels must be a"),
        (torch.tensor([0, 1]), torch.rand(2, 3), [2], "boxes must be a"),
        (torch.tensor([0, 1]), torch.rand(2, 4), [1], "counts sum"),
        (torch.tensor([0, 1]), torch.rand(2, 4).long(), [2], "boxes must be a floating"),
    ],
)
def test_reference_bad_inputs(labels, boxes, counts, match):
    with pytest.raises(ValueError, match=match):
        ref(labels, boxes, counts, num_classes=10, seed=0)


@pytest.mark.usefixtures("reference_backend")
def test_reference_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        ref(torch.tensor([0]), torch.rand(1, 4), [1], num_classes=2, mode="dino")


# ---- the counter-based random numbers (Philox-4x32) the backends share -----------------------------------------------


def test_known_answer():
    # tl.randint4x(1234, arange(8))[0][0] from the Triton interpreter, as int32 (FACTS.md).
    first = randint4x(1234, torch.arange(8))[0][0].item()
    assert first == 546353992


def test_words_are_uint32_and_uniforms_in_range():
    words = randint4x(2**40 + 7, torch.arange(4096) * 977 + (5 << 32))
    for w in words:
        assert int(w.min()) >= 0 and int(w.max()) < 2**32
    u = uint32_to_uniform(torch.cat(words))
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / u.numel()) ** 0.5


def test_counter_words_differ():
    a = philox4x32(1, torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    b = philox4x32(1, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([0]))
    assert [int(x) for x in a] != [int(x) for x in b]


@pytest.mark.triton
def test_matches_triton_interpreter():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, uni_ptr, off_ptr, seed, n, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        mask = idx < n
        off = tl.load(off_ptr + idx, mask=mask)
        r0, r1, r2, r3 = tl.randint4x(seed, off)
        tl.store(out_ptr + idx * 4 + 0, r0.to(tl.int64, bitcast=False) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + idx * 4 + 1, r1.to(tl.int64, bitcast=False) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + idx * 4 + 2, r2.to(tl.int64, bitcast=False) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + idx * 4 + 3, r3.to(tl.int64, bitcast=False) & 0xFFFFFFFF, mask=mask)
        tl.store(uni_ptr + idx, tl.rand(seed, off), mask=mask)

    offsets = torch.tensor([0, 1, 2, 77, 2**31 + 5, (3 << 32) | 11, (41 << 32) | 2**31], dtype=torch.int64)
    seed = (17 << 32) | 123456789
    out = torch.zeros(len(offsets), 4, dtype=torch.int64)
    uni = torch.zeros(len(offsets), dtype=torch.float32)
    kernel[(1,)](out, uni, offsets, seed, len(offsets), BLOCK=8)
    expected = torch.stack(randint4x(seed, offsets), -1)
    assert torch.equal(out, expected)
    assert torch.equal(uni, uint32_to_uniform(expected[:, 0]))


# ---- the kernels against the reference -------------------------------------------------------------------------------


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


def abs_size_args(abs_size=True):
    """CDN with box_noise_scale 1: negatives' corners cross often, where abs_size decides the size."""
    args = list(kernel_args([3, 0, 5], "cdn", {"dn_number": 20}))
    args[8] = 1.0
    return (*args, abs_size)


def test_reference_abs_size_turns_crossed_sizes_into_distances():
    crossed, kept = dn_queries_reference(*abs_size_args(True)), dn_queries_reference(*abs_size_args(False))
    assert torch.equal(crossed[0], kept[0]) and torch.equal(crossed[1][..., :2], kept[1][..., :2])
    zero = kept[1][..., 2:] == 0
    assert zero.any() and (crossed[1][..., 2:][zero] > 0).all()
    assert torch.equal(crossed[1][..., 2:][~zero], kept[1][..., 2:][~zero])


@cpp
def test_cpp_abs_size_matches_reference():
    for flag in (True, False):
        assert_same(torch.ops.dnops.dn_queries(*abs_size_args(flag)), dn_queries_reference(*abs_size_args(flag)))


@pytest.mark.triton
def test_triton_abs_size_matches_reference():
    from dnops.triton.dn_queries import dn_queries_triton

    for flag in (True, False):
        assert_same(dn_queries_triton(*abs_size_args(flag)), dn_queries_reference(*abs_size_args(flag)))


@pytest.mark.triton
@pytest.mark.parametrize("counts,mode,kw", CASES)
def test_triton_matches_reference(counts, mode, kw):
    from dnops.triton.dn_queries import dn_queries_triton

    args = kernel_args(counts, mode, kw)
    assert_same(dn_queries_triton(*args), dn_queries_reference(*args))


# ---- hardening: bad inputs, limits, double backward ------------------------------------------------------------------


# the Triton kernels run in the interpreter here, under the conftest's rules for the triton mark
BACKENDS = backends("dn_queries")
KERNELS = backends("dn_queries", without=("reference",))


DNQ_BACKENDS = BACKENDS


def _gt():
    labels = torch.tensor([1, 2, 0, 4])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 4)
    return labels, boxes, [3, 1]


@pytest.mark.parametrize("backend", DNQ_BACKENDS)
@pytest.mark.parametrize(
    "change,match",
    [
        ({"box_noise_scale": float("nan")}, "box_noise_scale"),
        ({"box_noise_scale": float("inf")}, "box_noise_scale"),
        ({"label_noise_ratio": float("nan")}, "label_noise_ratio"),
        ({"counts": [1.5, 2.5]}, "counts"),
        ({"counts": [[3], [1]]}, "counts"),
        ({"counts": torch.tensor([[3, 1]])}, "counts"),
        ({"counts": torch.tensor([3.0, 1.0])}, "counts"),
        ({"counts": "31"}, "counts"),
        ({"num_groups": 2**40}, "2\\*\\*31"),
        ({"mode": "cdn", "dn_number": 2**40}, "2\\*\\*31"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"nan_box": True}, "boxes must be finite"),
        ({"mode": "cdn", "nan_box": True}, "boxes must be finite"),
        ({"bad_label": True}, "labels must be in"),
    ],
    ids=str,
)
def test_dn_queries_rejects_bad_arguments_alike(backend, backend_env, change, match):
    backend_env(backend)
    labels, boxes, counts = _gt()
    change = dict(change)
    if change.pop("nan_box", False):
        boxes[2, 1] = float("nan")
    if change.pop("bad_label", False):
        labels[3] = 91
    kw = {"num_classes": 91, "counts": counts, **change}
    with pytest.raises(ValueError, match=match):
        dnops.dn_queries(labels, boxes, kw.pop("counts"), **kw)


@pytest.mark.parametrize("backend", KERNELS)
def test_dn_queries_backends_agree_on_large_seeds(backend):
    labels, boxes, counts = _gt()
    outs = []
    for name in ("reference", backend):
        with _backend.use_backend(name):
            outs.append(dnops.dn_queries(labels, boxes, counts, num_classes=91, mode="cdn", seed=2**63 - 1))
    assert torch.equal(outs[1].labels, outs[0].labels)
    torch.testing.assert_close(outs[1].boxes, outs[0].boxes, rtol=0, atol=1e-6)


# User errors inside torch.compile(fullgraph=True), inductor on two threads, in a child process: an out-of-range
# index inside a parallel region of inductor's code aborts the process instead of raising.
COMPILED_ERRORS = """
import torch, dnops
from dnops.compat import dino
torch.set_num_threads(2)
label_enc = torch.nn.Embedding(10, 8)
def queries(labels, boxes):
    return dnops.dn_queries(labels, boxes, [2, 1], num_classes=9, mode="cdn", seed=1).labels
def cdn(labels, boxes):
    targets = [{"labels": labels[:2], "boxes": boxes[:2]}, {"labels": labels[2:], "boxes": boxes[2:]}]
    return dino.prepare_for_cdn((targets, 100, 0.5, 1.0), True, 10, 9, 8, label_enc)[0]
boxes = torch.rand(3, 4) * 0.5 + 0.25
nan = boxes.index_fill(0, torch.tensor([1]), float("nan"))
bad = [(torch.tensor([1, 12, 3]), boxes), (torch.tensor([1, -1, 3]), boxes), (torch.tensor([1, 2, 3]), nan)]
with dnops.use_backend("reference"):
    for fn in (queries, cdn):
        for labels, b in bad:
            try:
                torch.compile(fn, fullgraph=True)(labels, b)
                print("no error")
            except ValueError as exc:
                print(exc)
"""


def test_user_errors_under_torch_compile_raise_as_in_eager():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", COMPILED_ERRORS], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    labels = "dnops.dn_queries: labels must be in [0, num_classes=9), got values in "
    boxes = "dnops.dn_queries: boxes must be finite, got NaN or infinite values"
    assert lines == [labels + "[1, 12]", labels + "[-1, 3]", boxes] * 2


@pytest.mark.parametrize("counts", [[2], [3], [2, 0]])
def test_reference_compiles_with_a_fixed_seed_in_seconds(counts):
    """Inductor once took over 15 minutes to lower the reference's Philox rounds for one image and a fixed seed."""
    import time

    labels, boxes, counts = make_gt(counts, num_classes=5)

    def f(labels, boxes):
        out = dnops.dn_queries(labels, boxes, counts, num_classes=5, mode="cdn", seed=1)
        return out.labels, out.boxes

    with _backend.use_backend("reference"):
        start = time.monotonic()
        compiled = torch.compile(f, fullgraph=True)(labels, boxes)
        seconds = time.monotonic() - start
        eager = f(labels, boxes)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True))
    assert seconds < 120, f"compiling took {seconds:.0f} s"


# ---- properties: random valid inputs equal the reference, random invalid ones name the argument (hypothesis) ---------


@st.composite
def dnq_inputs(draw):
    counts = draw(st.lists(st.integers(0, 6), min_size=1, max_size=5))
    k = sum(counts)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    num_classes = draw(st.integers(1, 30))
    labels = torch.randint(0, num_classes, (k,), generator=g)
    wh = 0.05 + 0.4 * torch.rand(k, 2, generator=g)
    boxes = torch.cat([wh / 2 + (1 - wh) * torch.rand(k, 2, generator=g), wh], 1)
    kw = {
        "num_classes": num_classes,
        "mode": draw(st.sampled_from(["dn", "cdn"])),
        "num_groups": draw(st.integers(1, 4)),
        "dn_number": draw(st.integers(1, 120)),
        "max_dn_queries": draw(st.none() | st.integers(2, 40)),
        "label_noise_ratio": draw(st.floats(0, 1)),
        "box_noise_scale": draw(st.floats(0, 2)),
        "seed": draw(st.integers(0, 2**63 - 1)),
    }
    return labels, boxes, counts, kw


@pytest.mark.parametrize("backend", KERNELS)
@SETTINGS
@given(case=dnq_inputs())
def test_dn_queries_equals_reference(backend, case):
    labels, boxes, counts, kw = case
    got = run(backend, dnops.dn_queries, labels, boxes, counts, **kw)
    want = run("reference", dnops.dn_queries, labels, boxes, counts, **kw)
    assert (got.num_groups, got.group_size, got.pad_size) == (want.num_groups, want.group_size, want.pad_size)
    for x, y in zip(got[:4], want[:4], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def _dnq_corruptions(labels, boxes, counts, kw):
    return [
        ("labels", (labels.float(), boxes, counts), {}),
        ("labels", (labels + kw["num_classes"], boxes, counts), {}),
        ("boxes", (labels, boxes[:, :3], counts), {}),
        ("boxes", (labels, boxes.long(), counts), {}),
        ("counts", (labels, boxes, [*counts, 1]), {}),
        ("counts", (labels, boxes, [c + 0.5 for c in counts]), {}),
        ("num_classes", (labels, boxes, counts), {"num_classes": 0}),
        ("box_noise_scale", (labels, boxes, counts), {"box_noise_scale": -1.0}),
        ("box_noise_scale", (labels, boxes, counts), {"box_noise_scale": math.nan}),
        ("label_noise_ratio", (labels, boxes, counts), {"label_noise_ratio": 1.5}),
        ("seed", (labels, boxes, counts), {"seed": -3}),
        ("mode", (labels, boxes, counts), {"mode": "dino"}),
        ("num_groups", (labels, boxes, counts), {"mode": "dn", "num_groups": 0}),
    ]


@pytest.mark.parametrize("backend", backends("dn_queries"))
@SETTINGS
@given(case=dnq_inputs(), pick=st.integers(0, 12))
def test_dn_queries_invalid_inputs_name_the_argument(backend, case, pick):
    labels, boxes, counts, kw = case
    name, args, change = _dnq_corruptions(labels, boxes, counts, kw)[pick]
    if name == "labels" and args[0].dtype != torch.float32 and not args[0].numel():
        return  # no GT: no label can be out of range
    with pytest.raises(ValueError, match=name):
        run(backend, dnops.dn_queries, *args, **(kw | change))


# ---- on the GPU (pytest -m cuda) and the CUDA emulator (pytest -m emulated) ------------------------------------------


# the last pattern is a batch of 72 images, past the 64 whose counts the CUDA kernel takes in its small parameter
# block (it then takes the large one)
COUNT_PATTERNS = [[3, 0, 5, 1], [0, 0], [7], [2, 9, 0, 4, 4, 1, 0, 3], [1, 0, 2] * 24]


def dnq(backend: str, device: str = "cuda"):
    name = needs("dn_queries", backend, device)
    return backend_fn(name, dnops.dn_queries)


def gt_batch(counts, dtype, device):
    k = sum(counts)
    labels = torch.randint(0, 20, (k,), device=device)
    wh = 0.05 + 0.4 * torch.rand(k, 2, device=device)
    return labels, torch.cat([wh / 2 + (1 - wh) * torch.rand(k, 2, device=device), wh], 1).to(dtype)


@pytest.mark.parametrize("backend", backends("dn_queries", "cuda"))
@pytest.mark.parametrize("mode", ["dn", "cdn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts", COUNT_PATTERNS, ids=lambda c: f"B{len(c)}-{sum(c)}")
def test_gpu_backends_equal_reference(dev, backend, mode, dtype, counts):
    fn = dnq(backend, dev)
    labels, boxes = gt_batch(counts, dtype, dev)
    got = fn(labels, boxes, counts, num_classes=20, mode=mode, seed=1234)
    want = backend_fn("reference", dnops.dn_queries)(
        labels.cpu(), boxes.cpu(), counts, num_classes=20, mode=mode, seed=1234
    )
    assert (got.num_groups, got.group_size, got.pad_size) == (want.num_groups, want.group_size, want.pad_size)
    assert torch.equal(got.labels.cpu(), want.labels)
    assert torch.equal(got.gt_index.cpu(), want.gt_index)
    assert torch.equal(got.negative.cpu(), want.negative)
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2  # FMA contraction on the GPU may move the last bit
    torch.testing.assert_close(got.boxes.cpu(), want.boxes, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", backends("dn_queries", "cuda"))
def test_gpu_abs_size_equals_reference(dev, backend):
    from dnops.ops.dn_queries import generate

    name = needs("dn_queries", backend, dev)
    args = [t.to(dev) if isinstance(t, torch.Tensor) else t for t in abs_size_args()]
    got = backend_fn(name, generate)(*args[:-1], abs_size=True)
    assert_same([t.cpu() for t in got], dn_queries_reference(*abs_size_args()))


def test_dn_queries_batch_limit(dev):
    """The CUDA kernel takes the counts of at most 2,000 images as launch parameters (what keeps a call free of
    host-to-device copies, so CUDA graphs capture it); more raise."""
    fn = dnq("cuda", dev)
    labels, boxes = gt_batch([1] * 2000, torch.float32, dev)
    assert fn(labels, boxes, [1] * 2000, num_classes=20, seed=3).labels.shape == (2000, 5)
    labels, boxes = gt_batch([1] * 2001, torch.float32, dev)
    with pytest.raises(RuntimeError, match="at most 2000 images"):
        fn(labels, boxes, [1] * 2001, num_classes=20, seed=3)


@cuda
@pytest.mark.parametrize("batch", [4, 72])
def test_dn_queries_cuda_kernel_is_captured_by_a_cuda_graph(batch):
    """Above and below the 64 images of the small parameter block: the replay gives the eager result."""
    fn = dnq("cuda")
    counts = COUNT_PATTERNS[-1][:batch] if batch > 4 else COUNT_PATTERNS[0]
    labels, boxes = gt_batch(counts, torch.float32, "cuda")
    want = fn(labels, boxes, counts, num_classes=20, mode="cdn", seed=11)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = fn(labels, boxes, counts, num_classes=20, mode="cdn", seed=11)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got.labels, want.labels) and torch.equal(got.boxes, want.boxes)


@cuda
def test_dn_queries_triton_copies_without_a_sync_and_refuses_capture():
    fn = dnq("triton")
    labels, boxes = gt_batch([3, 1], torch.float32, "cuda")
    fn(labels, boxes, [3, 1], num_classes=20, seed=3)  # warm-up: lazy initialization synchronizes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(labels, boxes, [3, 1], num_classes=20, seed=3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(RuntimeError, match="cannot capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            fn(labels, boxes, [3, 1], num_classes=20, seed=3)


@cuda
def test_sanitizer_dn_queries():
    for backend in ("cuda", "triton"):
        for pattern in COUNT_PATTERNS[0], COUNT_PATTERNS[-1]:
            test_gpu_backends_equal_reference("cuda", backend, "cdn", torch.float32, pattern)


@cpp
@pytest.mark.parametrize("mode", ["dn", "cdn"])
def test_cpu_draws_are_the_same_bits_at_any_thread_count(mode):
    """The noise is counter-based (Philox, keyed by the seed and each element's index): the thread count only splits
    the elements, so 1, 2 and 4 threads draw the same bits."""
    labels, boxes, counts = make_gt([30, 0, 17, 45])
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            with dnops.use_backend("cpu"):
                results.append(dnops.dn_queries(labels, boxes, counts, num_classes=91, mode=mode, seed=7))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert torch.equal(results[0].labels, other.labels) and torch.equal(results[0].boxes, other.boxes)
