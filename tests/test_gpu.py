"""The GPU suite (``pytest -m cuda``, run by ``make gpu-check``; skipped without a CUDA device), and its emulated
half (``pytest -m emulated``, run by ``make test-cuda-emulated``): the tests that take the ``dev`` fixture run once
on the GPU and once on the CUDA emulator (tests/cuda_emulator), where the same .cu kernels run on CPU tensors.

Every op on every GPU backend (the CUDA kernels, and the Triton kernels compiled for the GPU) against its
reference run in float64 on the same inputs, forward and every gradient, in every dtype the backend takes; odd
shapes, empty batches, non-contiguous inputs, locations on and outside the borders; torch.compile(fullgraph) of
every op in float32 (the compile matrix of every op, module and backend, float64, dynamic and static, is
tests/test_compile_matrix.py, whose GPU half gpu-check runs too); a CUDA-graph capture of a thin DN-DETR
training step; no host sync in the adapters; bitwise-repeatable deterministic backward. Tests whose name holds
"sanitizer" are the small cases that gpu-check also runs under compute-sanitizer.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import dnops
from dnops import _backend, reference
from tests.msda_utils import make_inputs

DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("emulated", marks=pytest.mark.emulated)]
# ms_deform_attn's CUDA code differs per arch (sm_90's vector atomics, sm_80's scalar ones): both are emulated
ARCH_DEVICES = [*DEVICES, pytest.param("emulated-sm80", marks=pytest.mark.emulated)]


@contextlib.contextmanager
def on_device(name: str):
    """The tensors' device for a run on ``name``: the GPU, or CPU tensors routed to the emulated CUDA kernels."""
    if name == "cuda":
        yield "cuda"
        return
    from tests import cuda_emulator

    cuda_emulator.configure(*cuda_emulator.default_order())
    with cuda_emulator.routed(80 if name.endswith("sm80") else 90):
        yield "cpu"


@pytest.fixture(params=DEVICES)
def dev(request):
    with on_device(request.param) as device:
        yield device


@pytest.fixture(params=ARCH_DEVICES)
def arch_dev(request):
    with on_device(request.param) as device:
        yield device


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ||got - want|| / ||want|| allowed per dtype: the reference runs in float64 on the same (rounded) inputs, so
# this is the kernel's own error (accumulation order, half-type outputs rounded once).
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def assert_rel(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    got, want = got.double(), want.double()
    scale = want.norm().item()
    err = (got - want).norm().item() / (scale if scale > 0 else 1.0)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:.0e} ({dtype})"


def as_float64(args):
    return [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in args]


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


def check_against_reference(fn, ref_fn, args, dtype, what, deterministic_kernel: bool = False):
    """fn(*args) and every gradient against ref_fn on the same inputs in float64; with ``deterministic_kernel``,
    fn's forward and backward run under torch.use_deterministic_algorithms(True) and the reference outside it (on
    CUDA, grid_sample's backward raises there)."""
    ref_args = as_float64(args)
    with deterministic(deterministic_kernel):
        out = fn(*args)
    assert not torch.are_deterministic_algorithms_enabled(), "the reference runs outside deterministic mode"
    ref = ref_fn(*ref_args)
    assert out.dtype == dtype
    assert_rel(out, ref, dtype, f"{what} forward")
    grad_in = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not grad_in or out.numel() == 0:
        return
    g = torch.randn_like(ref)
    with deterministic(deterministic_kernel):
        got = torch.autograd.grad(out, grad_in, g.to(dtype))
    want = torch.autograd.grad(ref, [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad], g)
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        assert_rel(x, y, dtype, f"{what} grad of input {i}")


def backend_fn(backend: str, fn):
    def run(*args, **kw):
        with _backend.use_backend(backend):
            return fn(*args, **kw)

    return run


def needs(op: str, backend: str, device: str = "cuda") -> str:
    """Skips what this device cannot run; returns the backend name that runs ``backend`` there: the emulator's CUDA
    kernels are dnops' compiled ops on CPU tensors (tests/cuda_emulator routes them), the "cpu" backend."""
    if device != "cuda" and backend != "cuda":
        pytest.skip("the emulator runs the CUDA kernels; the Triton kernels run in their interpreter tests")
    name = "cpu" if device != "cuda" else backend
    if not _backend.available(op, device)[name]:
        pytest.skip(f"no {backend} kernel of {op} for {device} in this build")
    return name


# ---- ms_deform_attn ---------------------------------------------------------------------------------------------

MSDA_BACKENDS = ["cuda", "triton"]
MSDA_SHAPES = [
    {"d": 32},
    {"d": 1},
    {"d": 30},
    {"d": 71},
    {"d": 130, "lq": 2},  # the third channel pass of a 32-lane group has one active lane
    {"d": 257, "lq": 2, "m": 1},
    {"d": 8, "shapes": ((5, 7),)},
    {"d": 16, "p": 1},
    {"d": 4, "shapes": ((5, 2), (1, 1), (2, 7)), "m": 3, "p": 3},
    {"d": 64, "lq": 0},
    {"d": 32, "n": 0},
]


def msda_args(dtype, device="cuda", **kw):
    args = make_inputs(device=device, **kw)
    return [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in args]


def msda(backend: str, logits: bool = False, device: str = "cuda"):
    name = needs("ms_deform_attn", backend, device)
    return backend_fn(name, lambda *a: dnops.ms_deform_attn(*a, attention_logits=logits))


@pytest.mark.parametrize("backend", MSDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", MSDA_SHAPES, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("logits", [False, True])
def test_ms_deform_attn(arch_dev, backend, dtype, kw, logits):
    fn = msda(backend, logits, arch_dev)
    ref = lambda *a: reference.ms_deform_attn(*a, logits)  # noqa: E731
    check_against_reference(fn, ref, msda_args(dtype, arch_dev, **kw), dtype, f"ms_deform_attn[{backend}]")


@pytest.mark.parametrize("backend", MSDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ms_deform_attn_non_contiguous_and_borders(arch_dev, backend, dtype):
    fn = msda(backend, device=arch_dev)
    value, shapes, starts, loc, weights = make_inputs(
        n=2, shapes=((3, 4), (2, 2)), lq=9, m=2, d=8, p=2, device=arch_dev
    )
    edges = torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [-0.5, 0.5], [1.5, 0.2], [0.125, 1 / 6], [-1 / 8, 1.0], [2, 2]]
    )
    loc[:, :, :, :, 0] = edges.to(loc)[None, :, None, None, :]
    # value as a (N, M, S, D) tensor seen through a transpose, locations and weights as slices of wider tensors
    value_t = value.transpose(1, 2).contiguous().transpose(1, 2)
    loc_wide = torch.cat([loc, loc], -1)[..., :2]
    weights_wide = torch.cat([weights, weights], -1)[..., : weights.shape[-1]]
    args = [value_t, shapes, starts, loc_wide, weights_wide]
    assert not all(t.is_contiguous() for t in args)
    args = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in args]
    check_against_reference(fn, reference.ms_deform_attn, args, dtype, f"ms_deform_attn[{backend}] borders")


@pytest.mark.parametrize("logits", [False, True])
def test_ms_deform_attn_deterministic_backward_is_bitwise_repeatable(arch_dev, logits):
    fn = msda("cuda", logits, arch_dev)
    lq = 500 if arch_dev == "cuda" else 12  # the emulator runs one fiber per CUDA thread
    args = msda_args(torch.float32, arch_dev, n=2, shapes=((20, 30), (10, 15)), lq=lq, m=4, d=32, p=4)
    g = torch.randn(2, lq, 128, device=arch_dev)
    grads = []
    try:
        torch.use_deterministic_algorithms(True)
        for _ in range(3):
            grads.append(torch.autograd.grad(fn(*args), [args[0], args[3], args[4]], g))
    finally:
        torch.use_deterministic_algorithms(False)
    for again in grads[1:]:
        for x, y in zip(grads[0], again, strict=True):
            assert torch.equal(x, y)
    atomic = torch.autograd.grad(fn(*args), [args[0], args[3], args[4]], g)
    for x, y in zip(grads[0], atomic, strict=True):
        assert_rel(x, y, torch.float32, "deterministic vs atomic backward")


def test_ms_deform_attn_deterministic_matches_reference(dev):
    fn = msda("cuda", device=dev)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        args = msda_args(dtype, dev, d=30)
        check_against_reference(fn, reference.ms_deform_attn, args, dtype, "deterministic", deterministic_kernel=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("d", [8, 32])
def test_ms_deform_attn_misaligned_storage(arch_dev, dtype, d):
    """value and grad_output starting one element into their storage: the kernels fall back to narrower vectors
    (a 16-byte load or atomic on a misaligned address faults on the GPU)."""
    fn = msda("cuda", device=arch_dev)
    args = msda_args(dtype, arch_dev, d=d)

    def shifted(t):
        return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)

    args[0] = shifted(args[0].detach()).requires_grad_()
    assert args[0].is_contiguous() and args[0].data_ptr() % 16 != 0
    ref_args = as_float64(args)
    out, ref = fn(*args), reference.ms_deform_attn(*ref_args)
    assert_rel(out, ref, dtype, "misaligned forward")
    g = torch.randn_like(ref)
    g_shifted = shifted(g.to(dtype))
    assert g_shifted.data_ptr() % 16 != 0
    got = torch.autograd.grad(out, [args[0], args[3], args[4]], g_shifted)
    want = torch.autograd.grad(ref, [ref_args[0], ref_args[3], ref_args[4]], g)
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        assert_rel(x, y, dtype, f"misaligned grad {i}")


def test_ms_deform_attn_non_finite_locations_read_zero(arch_dev):
    fn = msda("cuda", device=arch_dev)
    value, shapes, starts, loc, weights = make_inputs(n=1, lq=5, m=1, p=1, d=32, dtype=torch.float32, device=arch_dev)
    for q, x in enumerate([float("nan"), float("inf"), -float("inf"), 3e38, -3e38]):
        loc[0, q] = x
    loc.requires_grad_()
    value.requires_grad_()
    out = fn(value, shapes, starts, loc, weights)
    assert torch.equal(out, torch.zeros_like(out))
    g_value, g_loc = torch.autograd.grad(out.sum(), [value, loc])
    assert torch.equal(g_loc, torch.zeros_like(g_loc)) and torch.equal(g_value, torch.zeros_like(g_value))


@pytest.mark.cuda
def test_sanitizer_ms_deform_attn():
    for backend in MSDA_BACKENDS:
        for dtype in (torch.float32, torch.bfloat16):
            for kw in ({"d": 32}, {"d": 7, "p": 1}):
                check_against_reference(msda(backend), reference.ms_deform_attn, msda_args(dtype, **kw), dtype, "san")
    args = msda_args(torch.float32)
    fn = msda("cuda")
    check_against_reference(fn, reference.ms_deform_attn, args, torch.float32, "det", deterministic_kernel=True)


# ---- dn_self_attention --------------------------------------------------------------------------------------------

DSA_SHAPES = [(2, 3, 5, 16), (2, 4, 0, 8), (3, 5, 7, 30), (1, 8, 10, 64), (0, 1, 9, 71), (5, 1, 1, 32)]
cuda = pytest.mark.cuda


def dsa(backend: str):
    needs("dn_self_attention", backend)
    return backend_fn(backend, dnops.dn_self_attention)


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "sdpa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups,group_size,num_queries,dh", DSA_SHAPES)
def test_dn_self_attention(backend, dtype, groups, group_size, num_queries, dh):
    fn = dsa(backend)
    pad = groups * group_size
    width = pad + num_queries
    qkv = [torch.randn(2, 3, width, dh, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]

    def call(f):
        return lambda q, k, v: f(q, k, v, pad, group_size if pad else 0)

    check_against_reference(call(fn), call(reference.dn_self_attention), qkv, dtype, f"dn_self_attention[{backend}]")


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "sdpa"])
def test_dn_self_attention_non_contiguous(backend):
    fn = dsa(backend)
    x = torch.randn(2, 40, 3, 32, device="cuda")  # (B, W, H, Dh) seen as (B, H, W, Dh)
    qkv = [x.transpose(1, 2).clone().transpose(1, 2).transpose(1, 2).requires_grad_() for _ in range(3)]
    assert not qkv[0].is_contiguous()

    def call(f):
        return lambda q, k, v: f(q, k, v, 20, 5)

    check_against_reference(call(fn), call(reference.dn_self_attention), qkv, torch.float32, "non-contiguous")


# ---- dn_queries and dn_attn_mask ----------------------------------------------------------------------------------

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


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["dn", "cdn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts", COUNT_PATTERNS, ids=lambda c: f"B{len(c)}-{sum(c)}")
def test_dn_queries(dev, backend, mode, dtype, counts):
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


@pytest.mark.parametrize("pad,group,queries", [(40, 8, 17), (0, 0, 5), (6, 3, 0), (120, 24, 200)])
def test_dn_attn_mask(dev, pad, group, queries):
    got = dnops.dn_attn_mask(pad, group, queries, device=dev)
    assert got.device.type == dev
    assert torch.equal(got.cpu(), reference.dn_attn_mask(pad, group, queries))


@cuda
def test_sanitizer_dn_queries_and_mask():
    for backend in ("cuda", "triton"):
        for pattern in COUNT_PATTERNS[0], COUNT_PATTERNS[-1]:
            test_dn_queries("cuda", backend, "cdn", torch.float32, pattern)
    for pad, group, queries in ((40, 8, 17), (0, 0, 5), (6, 3, 0)):
        test_dn_attn_mask("cuda", pad, group, queries)


@cuda
def test_adapters_dispatch_no_host_sync():
    from dnops.compat import dino, dn_detr

    targets = [
        {"labels": torch.randint(0, 91, (c,), device="cuda"), "boxes": torch.rand(c, 4, device="cuda") * 0.5 + 0.2}
        for c in (3, 0, 7)
    ]
    anchors = torch.rand(300, 4, device="cuda")
    enc_dn, enc_cdn = torch.nn.Embedding(92, 255).cuda(), torch.nn.Embedding(92, 256).cuda()
    dnops.dn_queries(targets[0]["labels"], targets[0]["boxes"], [3], num_classes=91)  # warm-up: lazy inits sync
    dn_detr.prepare_for_dn((targets, 5, 0.2, 0.4, 1), anchors, 3, True, 300, 91, 256, enc_dn)
    dino.prepare_for_cdn((targets, 100, 0.5, 1.0), True, 900, 91, 256, enc_cdn)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dnops.dn_queries(targets[2]["labels"], targets[2]["boxes"], [7], num_classes=91, mode="cdn")
        dn_detr.prepare_for_dn((targets, 5, 0.2, 0.4, 1), anchors, 3, True, 300, 91, 256, enc_dn)
        dino.prepare_for_cdn((targets, 100, 0.5, 1.0), True, 900, 91, 256, enc_cdn)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---- torch.compile, CUDA graphs -----------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "sdpa"])
def test_compile_fullgraph_ops(backend):
    torch._dynamo.reset()
    if backend == "triton" and _backend.triton_available():
        # imported before tracing: the public functions import their Triton module on first use
        import dnops.triton.dn_queries
        import dnops.triton.dn_self_attention
        import dnops.triton.ms_deform_attn  # noqa: F401
    args = msda_args(torch.float32, d=32)
    if _backend.available("ms_deform_attn", "cuda")[backend]:
        with _backend.use_backend(backend):
            compiled = torch.compile(dnops.ms_deform_attn, fullgraph=True)
            out = compiled(*args)
        check_against_reference(lambda *a: out, reference.ms_deform_attn, args, torch.float32, "compiled msda")
    qkv = [torch.randn(2, 3, 40, 32, device="cuda", requires_grad=True) for _ in range(3)]
    if _backend.available("dn_self_attention", "cuda")[backend]:
        with _backend.use_backend(backend):
            out = torch.compile(dnops.dn_self_attention, fullgraph=True)(*qkv, 20, 5)
        ref = lambda q, k, v: reference.dn_self_attention(q, k, v, 20, 5)  # noqa: E731
        check_against_reference(lambda *a: out, ref, qkv, torch.float32, "compiled dn_self_attention")
    if _backend.available("dn_queries", "cuda")[backend]:
        labels, boxes = torch.randint(0, 20, (9,), device="cuda"), torch.rand(9, 4, device="cuda") * 0.5 + 0.2

        def gen(labels, boxes):
            return dnops.dn_queries(labels, boxes, [4, 5], num_classes=20, mode="cdn", seed=7)

        with _backend.use_backend(backend):
            got = torch.compile(gen, fullgraph=True)(labels, boxes)
            want = gen(labels, boxes)
        assert torch.equal(got.labels, want.labels) and torch.equal(got.boxes, want.boxes)
    mask = torch.compile(lambda: dnops.dn_attn_mask(40, 8, 17, device="cuda"), fullgraph=True)()
    assert torch.equal(mask.cpu(), reference.dn_attn_mask(40, 8, 17))


@cuda
def test_cuda_graph_of_a_dn_detr_training_step():
    """Forward with denoising queries, the denoising losses (no matching: DN's targets are known), backward and a
    capturable AdamW step, captured once; replays from the same parameters and optimizer state give the same
    gradients, and each replay moves the parameters."""
    from models.config import Config
    from models.model import DNDETR

    cfg = Config(d_model=32, n_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64, num_queries=20, image_size=64)
    cfg.backbone_width, cfg.dn_groups = 8, 3
    torch.manual_seed(0)
    model = DNDETR(cfg, 10).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    images = torch.rand(2, 3, 64, 64, device="cuda")
    targets = [
        {"labels": torch.randint(0, 10, (c,), device="cuda"), "boxes": torch.rand(c, 4, device="cuda") * 0.4 + 0.3}
        for c in (3, 5)
    ]
    gt_boxes = torch.cat([t["boxes"] for t in targets])

    def step():
        out = model(images, targets)
        dn = out["dn"]
        # padding slots masked arithmetically: boolean indexing would read the mask on the host
        valid = (dn.gt_index >= 0).unsqueeze(-1)
        err = (out["dn_boxes"] - gt_boxes[dn.gt_index.clamp_min(0)]).abs() * valid
        loss = err.mean() + out["logits"].sigmoid().mean()
        loss.backward()
        optimizer.step()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step()

    params = [p for p in model.parameters() if p.grad is not None]
    state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    saved = [t.detach().clone() for t in params + state]
    grads = []
    for _ in range(2):
        with torch.no_grad():
            for t, v in zip(params + state, saved, strict=True):
                t.copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(static_loss)
        grads.append([p.grad.clone() for p in params])
        assert any(not torch.equal(p, v) for p, v in zip(params, saved, strict=False))
    assert params and all(torch.isfinite(g).all() for g in grads[0])
    for x, y in zip(grads[0], grads[1], strict=True):
        assert_rel(y, x, torch.float32, "replayed gradients")


# ---- hardening on the GPU ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", MSDA_BACKENDS)
def test_levels_outside_value_raise_or_read_nothing(arch_dev, backend):
    fn = msda(backend, device=arch_dev)
    value, _, _, loc, weights = make_inputs(n=1, shapes=((2, 3), (1, 2)), lq=2, m=1, d=2, p=1, device=arch_dev)
    for rows in ([[2**32, 2**32], [1, 2]], [[2**62, 4], [1, 2]], [[2, 3], [4, 4]]):
        shapes = torch.tensor(rows, device=arch_dev)
        starts = torch.tensor([0, 6], device=arch_dev)
        with pytest.raises(ValueError, match="spatial_shapes"):
            fn(value, shapes, starts, loc, weights)
        if backend == "cuda":  # the raw kernel, past the checks: the bad levels read as zeros, nothing out of range
            out = torch.ops.dnops.ms_deform_attn(value, shapes, starts, loc, weights)
            synchronize(arch_dev)
            assert torch.isfinite(out).all()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_msdeformattn_under_cuda_autocast(dtype):
    from dnops.nn import MSDeformAttn

    torch.manual_seed(0)
    mod = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2).cuda()
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.2)
    shapes, starts = torch.tensor([[6, 8], [3, 4]], device="cuda"), torch.tensor([0, 48], device="cuda")
    src = torch.randn(2, 60, 64, device="cuda", requires_grad=True)
    query, refs = torch.randn(2, 11, 64, device="cuda"), torch.rand(2, 11, 2, 2, device="cuda")
    want = mod(query, refs, src, shapes, starts)
    (want_g,) = torch.autograd.grad(want.sum(), [src])
    with torch.autocast("cuda", dtype=dtype):
        got = mod(query, refs, src, shapes, starts)
    (got_g,) = torch.autograd.grad(got.float().sum(), [src])
    assert got.dtype == dtype
    assert (got.float() - want).norm() / want.norm() < 2e-2
    assert (got_g - want_g).norm() / want_g.norm() < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_scale_deformable_attention_module_interface(dev, dtype):
    from dnops.compat import multi_scale_deformable_attention as msda

    args = msda_args(dtype, dev, d=32)
    out = msda.ms_deform_attn_forward(*args, 64)
    ref_args = as_float64(args)
    ref = reference.ms_deform_attn(*ref_args)
    assert_rel(out, ref, dtype, "MSDA.ms_deform_attn_forward")
    g = torch.randn_like(ref)
    got = msda.ms_deform_attn_backward(*args, g.to(dtype), 64)
    want = torch.autograd.grad(ref, [ref_args[0], ref_args[3], ref_args[4]], g)
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        assert_rel(x, y, dtype, f"MSDA.ms_deform_attn_backward grad {i}")
