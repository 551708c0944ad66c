"""The compiled extensions codebases build for their deformable attention, provided by dnops under the names they
import (dnops.compat.extensions): each codebase's own file (tests/upstream, byte for byte) imported unmodified in a
checkout laid out as the codebase's, its autograd Function on dnops against the file's own pure-PyTorch path."""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dnops.compat import extensions, provide
from dnops.compat import multi_scale_deformable_attention as ddetr
from tests.msda_utils import make_inputs

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = Path(__file__).resolve().parent / "upstream"


@dataclass(frozen=True)
class Codebase:
    file: str  # in tests/upstream
    blob: str  # git blob hash of the upstream file (tests/upstream/README.md)
    module: str  # where the file sits in the codebase's checkout
    name: str  # what it imports
    function: str  # its autograd Function
    pytorch: str  # its pure-PyTorch path


CODEBASES = {
    "groundingdino": Codebase(
        "groundingdino_ms_deform_attn.py",
        "489d501bef364020212306d81e9b85c8daa27491",
        "groundingdino.models.GroundingDINO.ms_deform_attn",
        "groundingdino._C",
        "MultiScaleDeformableAttnFunction",
        "multi_scale_deformable_attn_pytorch",
    ),
    "detrex": Codebase(
        "detrex_multi_scale_deform_attn.py",
        "0e91e94ef6672e9bfd69788f614a73da82270b2f",
        "detrex.layers.multi_scale_deform_attn",
        "detrex._C",
        "MultiScaleDeformableAttnFunction",
        "multi_scale_deformable_attn_pytorch",
    ),
    "relation_detr": Codebase(
        "relation_detr_ms_deform_attn.py",
        "0676b1573ad947915937fa60a0fd4601a3a5bf08",
        "models.bricks.ms_deform_attn",
        "models.bricks.ms_deform_attn._C",  # a module global, None when its JIT build did not run or failed
        "MultiScaleDeformableAttnFunction",
        "multi_scale_deformable_attn_pytorch",
    ),
    "mask2former": Codebase(
        "mask2former_ms_deform_attn_func.py",
        "94a36ab85b7c5f9ecee342db91a5d5731740740f",
        "mask2former.modeling.pixel_decoder.ops.functions.ms_deform_attn_func",
        "MultiScaleDeformableAttention",
        "MSDeformAttnFunction",
        "ms_deform_attn_core_pytorch",
    ),
}


@pytest.mark.parametrize("codebase", CODEBASES.values(), ids=CODEBASES.keys())
def test_upstream_files_are_the_originals(codebase):
    data = (UPSTREAM / codebase.file).read_bytes()
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == codebase.blob


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """Lays a codebase's file out in a checkout on sys.path (empty package __init__s, as GroundingDINO's is) and
    returns a loader of its module; every module imported from the checkout is forgotten afterwards (the repository's
    own ``models`` package included, which Relation-DETR's ``models`` shadows meanwhile)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(sys.modules)

    def lay_out(codebase: Codebase) -> Path:
        top = codebase.module.split(".")[0]
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            monkeypatch.delitem(sys.modules, name)
        parts = codebase.module.split(".")
        for depth in range(1, len(parts)):
            folder = tmp_path.joinpath(*parts[:depth])
            folder.mkdir(exist_ok=True)
            (folder / "__init__.py").touch()
        path = tmp_path.joinpath(*parts[:-1], parts[-1] + ".py")
        path.write_bytes((UPSTREAM / codebase.file).read_bytes())
        importlib.invalidate_caches()
        return path

    def load(codebase: Codebase):
        if codebase is CODEBASES["relation_detr"]:  # its module imports torchvision (not in test-compat's environment)
            pytest.importorskip("torchvision", reason="Relation-DETR's file imports torchvision")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GroundingDINO / Relation-DETR warn when their extension is missing
            return importlib.import_module(codebase.module)

    yield lay_out, load
    for name in set(sys.modules) - set(before):
        del sys.modules[name]


def _provided(checkout, codebase: Codebase, how: str):
    """The codebase's module with dnops provided as its extension: by the install command's function (a file where
    the import resolves), or by provide() (before the import, or after it for a module global)."""
    lay_out, load = checkout
    path = lay_out(codebase)
    if codebase.name.endswith("._C") and codebase.name.startswith(codebase.module):  # Relation-DETR's global
        module = load(codebase)
        assert module._C is None  # no GPU here: its import skipped the JIT build
        provide(codebase.name)
        return module
    if how == "install":
        root = path.parents[codebase.module.count(".")]
        target = root if "." not in codebase.name else None  # a top-level name: a folder on sys.path
        written = extensions.install(codebase.name, target)
        assert written.read_text() == extensions.shim_text(codebase.name)
    else:
        provide(codebase.name)
    return load(codebase)


INTERFACES = [
    pytest.param(codebase, how, id=f"{key}-{how}")
    for key, codebase in CODEBASES.items()
    for how in ("install", "provide")
    if key != "relation_detr" or how == "provide"  # a module global: provide() only
]


@pytest.mark.parametrize(("codebase", "how"), INTERFACES)
@pytest.mark.parametrize("levels", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("im2col_step", [1, 64])
def test_function_equals_the_files_own_pytorch_path(checkout, codebase, how, levels, im2col_step):
    """float64, forward and the three gradients, to 1e-12, through the file's own Function calling ``_C``."""
    module = _provided(checkout, codebase, how)
    function, pytorch = getattr(module, codebase.function), getattr(module, codebase.pytorch)
    value, shapes, starts, loc, weights = make_inputs(n=3, d=8, requires_grad=True)
    out = function.apply(value, shapes.to(levels), starts.to(levels), loc, weights, im2col_step)
    want = pytorch(value, shapes, loc, weights)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    inputs = (value, loc, weights)
    for got, ref in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(want, inputs, grad), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "codebase", [CODEBASES["groundingdino"], CODEBASES["relation_detr"]], ids=["groundingdino", "relation_detr"]
)
def test_half_precision_casts_of_the_callers(checkout, codebase):
    """GroundingDINO's module casts float16 value, locations and weights to float32 before its Function;
    Relation-DETR's casts only value (locations and weights stay in the autocast dtype). Both on dnops give float32
    within float32 rounding of the file's own path on the same rounded inputs."""
    module = _provided(checkout, codebase, "provide")
    value, shapes, starts, loc, weights = make_inputs(n=2, d=8, dtype=torch.float16)
    if codebase is CODEBASES["groundingdino"]:
        args = (value.float(), loc.float(), weights.float())
    else:
        args = (value.float(), loc, weights)
    args = [a.requires_grad_() for a in args]
    out = getattr(module, codebase.function).apply(args[0], shapes, starts, args[1], args[2], 64)
    assert out.dtype == torch.float32
    exact = [a.detach().double().requires_grad_() for a in args]
    want = getattr(module, codebase.pytorch)(exact[0], shapes, exact[1], exact[2])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    want.sum().backward()
    for got, ref in zip(args, exact, strict=True):
        assert got.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=2e-3, atol=2e-3)


def test_gradcheck_through_groundingdinos_function(checkout):
    module = _provided(checkout, CODEBASES["groundingdino"], "install")
    args = make_inputs(n=1, shapes=((3, 4), (2, 2)), lq=2, m=2, d=3, p=2, low=0.05, high=0.95, requires_grad=True)
    function = module.MultiScaleDeformableAttnFunction
    assert torch.autograd.gradcheck(lambda *a: function.apply(*a, 2), args, eps=1e-6, atol=1e-5)


def test_detrex_module_is_built_and_dcnv3_says_it_is_not_provided(checkout):
    """Without ``detrex._C`` detrex replaces its module by a class that raises ImportError when built; with dnops
    provided the real module is built, and DCNv3's ops raise an error naming the op."""
    codebase = CODEBASES["detrex"]
    module = _provided(checkout, codebase, "provide")
    layer = module.MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=2, num_points=2)
    assert isinstance(layer, torch.nn.Module)
    from detrex import _C

    assert _C.ms_deform_attn_forward is ddetr.ms_deform_attn_forward
    with pytest.raises(NotImplementedError, match=r"detrex\._C\.dcnv3_forward: .*not dcnv3_forward: .*DCNv3"):
        _C.dcnv3_forward(torch.zeros(1))
    with pytest.raises(AttributeError):
        _C.__wrapped__  # noqa: B018  (dunder names stay missing: hasattr probes by the import system and tools)


def test_without_dnops_the_originals_fail_as_their_users_report(checkout):
    """The failures dnops answers, from the unmodified files: GroundingDINO leaves ``_C`` undefined (NameError at the
    first GPU forward), detrex's module raises ImportError when built."""
    lay_out, load = checkout
    for key in ("groundingdino", "detrex"):
        lay_out(CODEBASES[key])
    grounding = load(CODEBASES["groundingdino"])
    assert not hasattr(grounding, "_C")
    detrex = load(CODEBASES["detrex"])
    with pytest.raises(ImportError, match="Cannot import 'detrex._C'"):
        detrex.MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=2, num_points=2)


def test_install_refuses_a_compiled_original_and_uninstall_removes_only_its_file(checkout, tmp_path):
    lay_out, _ = checkout
    lay_out(CODEBASES["groundingdino"])
    package = tmp_path / "groundingdino"
    compiled = package / "_C.cpython-311-x86_64-linux-gnu.so"
    compiled.write_bytes(b"\x7fELF")
    with pytest.raises(SystemExit, match=r"a groundingdino\._C is already installed at .*_C\.cpython"):
        extensions.install("groundingdino._C")
    assert not (package / "_C.py").exists()
    assert extensions.install("groundingdino._C", force=True) == package / "_C.py"
    assert extensions.uninstall("groundingdino._C") == package / "_C.py" and compiled.exists()
    (package / "_C.py").write_text("# the user's own file\n")
    assert extensions.uninstall("groundingdino._C") is None and (package / "_C.py").exists()
    with pytest.raises(SystemExit, match="no_such_codebase is not installed here"):
        extensions.install("no_such_codebase._C")


def test_provide_loads_past_a_broken_compiled_original(checkout, tmp_path):
    """A compiled ``_C`` that fails to load (built against another torch: the common complaint) is passed over; one
    that loads would answer the names dnops does not serve."""
    lay_out, load = checkout
    lay_out(CODEBASES["groundingdino"])
    (tmp_path / "groundingdino" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not an ELF file")
    provided = provide("groundingdino._C")
    assert load(CODEBASES["groundingdino"])._C is provided
    compiled = type(sys)("compiled")
    compiled.nms = len
    merged = extensions.extension("mmcv._ext", compiled)
    assert merged.nms is len and merged.ms_deform_attn_backward is extensions.MMCV["ms_deform_attn_backward"]


def test_install_command_by_name(checkout, tmp_path):
    lay_out, _ = checkout
    lay_out(CODEBASES["detrex"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    run = [sys.executable, "-m", "dnops.compat.multi_scale_deformable_attention"]
    done = subprocess.run([*run, "install", "--name", "detrex._C"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and (tmp_path / "detrex" / "_C.py").exists(), done.stderr
    code = "from detrex import _C; print(_C.ms_deform_attn_backward.__module__)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert imported.stdout.strip() == "dnops.compat.multi_scale_deformable_attention", imported.stderr
    done = subprocess.run([*run, "uninstall", "--name", "detrex._C"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and not (tmp_path / "detrex" / "_C.py").exists(), done.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("codebase", "how"), INTERFACES)
def test_function_on_cuda_tensors(checkout, codebase, how):
    """The GPU path these files take (``value.is_cuda``): float32 as their kernels run it, within float32 rounding
    of the file's own path in float64."""
    module = _provided(checkout, codebase, how)
    value, shapes, starts, loc, weights = make_inputs(n=3, d=8, dtype=torch.float32, device="cuda")
    args = [t.requires_grad_() for t in (value, loc, weights)]
    out = getattr(module, codebase.function).apply(args[0], shapes, starts, args[1], args[2], 64)
    exact = [t.detach().double().requires_grad_() for t in args]
    want = getattr(module, codebase.pytorch)(exact[0], shapes, exact[1], exact[2])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    want.sum().backward()
    for got, ref in zip(args, exact, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)
