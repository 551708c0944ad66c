import math

import pytest
import torch

import dnops
from tests.dn_utils import make_gt, to_xyxy


def ref(*args, **kw):
    return dnops.dn_queries(*args, **kw)


@pytest.fixture(autouse=True)
def _reference(backend_env):
    backend_env("reference")


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


def test_no_noise_reconstructs_exactly():
    labels, boxes, counts = make_gt([3, 1], num_classes=5)
    out = ref(labels, boxes, counts, num_classes=5, label_noise_ratio=0.0, box_noise_scale=0.0, seed=3)
    valid = out.gt_index >= 0
    assert torch.equal(out.labels[valid], labels[out.gt_index[valid]])
    assert torch.equal(out.boxes[valid], boxes[out.gt_index[valid]])


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


def test_zero_gt_batch():
    labels, boxes, counts = make_gt([0, 0])
    for mode in ("dn", "cdn"):
        out = ref(labels, boxes, counts, num_classes=10, mode=mode, seed=0)
        assert out.pad_size == 0 and out.labels.shape == (2, 0) and out.boxes.shape == (2, 0, 4)
        assert out.gt_index.shape == (2, 0) and out.negative.shape == (2, 0)


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


def test_reproducible_under_manual_seed():
    labels, boxes, counts = make_gt([3, 4])
    torch.manual_seed(123)
    a = ref(labels, boxes, counts, num_classes=10)
    torch.manual_seed(123)
    b = ref(labels, boxes, counts, num_classes=10)
    c = ref(labels, boxes, counts, num_classes=10)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.boxes, c.boxes)


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


def test_max_dn_queries_caps_crowded_images():
    labels, boxes, counts = make_gt([600, 3])
    out = ref(labels, boxes, counts, num_classes=10, mode="cdn", max_dn_queries=200, seed=0)
    assert out.pad_size <= 200 and out.num_groups == 1 and out.group_size == 200
    assert int(out.gt_index[0].max()) == 99
    dn = ref(labels, boxes, counts, num_classes=10, num_groups=5, max_dn_queries=1000, seed=0)
    assert dn.num_groups == 1 and dn.pad_size == 600


def test_degenerate_and_outside_boxes():
    labels = torch.tensor([0, 1, 2])
    boxes = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.02, -0.01, 0.1, 0.2], [0.3, 0.3, 0.0, 0.4]])
    for mode in ("dn", "cdn"):
        out = ref(labels, boxes, [3], num_classes=1 + 2, mode=mode, seed=5)
        assert torch.isfinite(out.boxes).all() and out.boxes.min() >= 0 and out.boxes.max() <= 1


def test_single_class():
    labels, boxes, counts = make_gt([4], num_classes=1)
    out = ref(labels, boxes, counts, num_classes=1, label_noise_ratio=1.0, seed=0)
    assert torch.equal(out.labels, torch.zeros_like(out.labels))


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
def test_bad_inputs(labels, boxes, counts, match):
    with pytest.raises(ValueError, match=match):
        ref(labels, boxes, counts, num_classes=10, seed=0)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        ref(torch.tensor([0]), torch.rand(1, 4), [1], num_classes=2, mode="dino")
