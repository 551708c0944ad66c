"""The extension is built, registers what it declares, and the CUDA part was compiled where nvcc allows."""

import asyncio
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import dnops
from dnops import _backend
from dnops._registry import OPS
from tests.msda_utils import make_inputs

ROOT = Path(__file__).resolve().parents[1]

# every schema csrc/dnops.cpp defines, and the kernels a full build registers per device kind (dnops._registry)
SCHEMAS = [schema for op in OPS.values() for schema in op.schemas]
CPU_OPS = [schema for op in OPS.values() if "cpu" in op.compiled for schema in op.kernels]
CUDA_OPS = [schema for op in OPS.values() if "cuda" in op.compiled for schema in op.kernels]
COMPOSITE = [schema for op in OPS.values() for schema in op.composite]


def test_the_registry_lists_every_schema_the_extension_defines():
    defined = set(re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "dnops.cpp").read_text()))
    assert defined == set(SCHEMAS)


def _matching_nvcc() -> bool:
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    try:
        out = subprocess.run(
            [os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True
        ).stdout
    except OSError:
        return False
    m = re.search(r"release (\d+)\.", out)
    return bool(m) and m.group(1) == torch.version.cuda.split(".")[0]


def test_extension_loads():
    assert dnops.HAS_C, _backend.C_ERROR


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_registered(name):
    torch._C._dispatch_find_schema_or_throw(f"dnops::{name}", "")


@pytest.mark.parametrize("name", CPU_OPS)
def test_cpu_kernel_registered(name):
    assert _backend.has_kernel(name, "cpu")


@pytest.mark.parametrize("name", COMPOSITE)
def test_composite_kernel_registered(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dnops::{name}", "CompositeImplicitAutograd")
    assert not _backend.has_kernel(name, "cpu")


def test_cuda_built_when_nvcc_matches():
    if os.environ.get("DNOPS_CUDA") == "0" or not _matching_nvcc():
        pytest.skip("no nvcc matching torch's CUDA (or DNOPS_CUDA=0): the CUDA kernels are not expected")
    assert _backend._C.built_with_cuda()


@pytest.mark.parametrize("name", CUDA_OPS)
def test_cuda_kernel_registered(name):
    if not _backend._C.built_with_cuda():
        pytest.skip("extension built without CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dnops::{name}", "CUDA")


def test_info_runs():
    out = subprocess.run(
        [os.sys.executable, "-m", "dnops.info"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "dn_attn_mask" in out and "cpu" in out


def test_use_backend_overrides_and_restores(monkeypatch):
    monkeypatch.delenv("DNOPS_BACKEND", raising=False)
    cpu = torch.device("cpu")
    with _backend.use_backend("reference"):
        assert _backend.choose("ms_deform_attn", cpu) == "reference"
        with _backend.use_backend(None):
            assert _backend.requested_backend() == "reference"
    assert "DNOPS_BACKEND" not in os.environ
    monkeypatch.setenv("DNOPS_BACKEND", "cpp")
    with _backend.use_backend("reference"):
        pass
    assert os.environ["DNOPS_BACKEND"] == "cpp"


def test_use_backend_is_per_thread_and_restores_whatever_other_threads_do(monkeypatch):
    monkeypatch.delenv("DNOPS_BACKEND", raising=False)
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with _backend.use_backend("reference"):
            a_entered.set()
            assert b_entered.wait(10)
            seen["a, both inside"] = _backend.requested_backend()
        a_left.set()  # leaves before the block the other thread entered later: exits out of order
        seen["a, after"] = _backend.requested_backend()

    def second():
        assert a_entered.wait(10)
        seen["b, a inside"] = _backend.requested_backend()
        with _backend.use_backend("sdpa"):
            b_entered.set()
            assert a_left.wait(10)
            seen["b, a left"] = _backend.requested_backend()
        seen["b, after"] = _backend.requested_backend()

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {
        "a, both inside": "reference",
        "b, a inside": None,
        "b, a left": "sdpa",
        "a, after": None,
        "b, after": None,
    }
    assert _backend.requested_backend() is None and "DNOPS_BACKEND" not in os.environ
    # DNOPS_BACKEND is the process default: a thread in no block reads it while another thread is in one
    monkeypatch.setenv("DNOPS_BACKEND", "cpp")
    with _backend.use_backend("reference"):
        other = []
        t = threading.Thread(target=lambda: other.append(_backend.requested_backend()))
        t.start()
        t.join(10)
        assert other == ["cpp"] and _backend.requested_backend() == "reference"
    assert _backend.requested_backend() == "cpp" and os.environ["DNOPS_BACKEND"] == "cpp"


def test_use_backend_is_per_asyncio_task(monkeypatch):
    monkeypatch.delenv("DNOPS_BACKEND", raising=False)

    async def task(name, entered, other_entered):
        with _backend.use_backend(name):
            entered.set()
            await other_entered.wait()
            return _backend.requested_backend()

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(task("reference", a, b), task("sdpa", b, a))

    assert asyncio.run(main()) == ["reference", "sdpa"]
    assert _backend.requested_backend() is None


def test_use_backend_names_a_bad_backend(monkeypatch):
    monkeypatch.delenv("DNOPS_BACKEND", raising=False)
    with pytest.raises(ValueError, match="use_backend: name must be one of"):
        with _backend.use_backend("gpu"):
            pass
    assert _backend.requested_backend() is None


@pytest.mark.skipif(not _backend.HAS_C, reason="dnops._C is not built")
def test_backend_names_and_the_earlier_cpp_alias(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("DNOPS_BACKEND", raising=False)
    assert _backend.choose("ms_deform_attn", cpu) == "cpu"
    for name, on_cpu in (("cpu", "cpu"), ("cpp", "cpu"), ("reference", "reference"), ("sdpa", "sdpa")):
        monkeypatch.setenv("DNOPS_BACKEND", name)
        assert _backend.choose("dn_self_attention", cpu) == on_cpu
    # "cpp" is the compiled kernel of the tensors' device; "cuda" names the CUDA kernels, which CPU tensors lack
    assert _backend._resolve("cpp", "cuda") == "cuda" and _backend._resolve("cpp", "cpu") == "cpu"
    assert _backend.available("ms_deform_attn", "cuda")["cpu"] is False
    # an explicit request that cannot run raises, naming what is missing; only the default choice falls back
    monkeypatch.setenv("DNOPS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' was asked for, but the cuda kernels take cuda tensors"):
        _backend.choose("ms_deform_attn", cpu)
    with pytest.raises(RuntimeError, match="backend 'cuda' was asked for"):
        dnops.ms_deform_attn(*make_inputs())
    info = subprocess.run([sys.executable, "-m", "dnops.info"], capture_output=True, text=True)
    assert info.returncode == 0 and "-> raises: the cuda kernels take cuda tensors" in info.stdout, info.stderr
    # an op without any implementation of the requested kind is not concerned by the request: its default runs
    monkeypatch.setenv("DNOPS_BACKEND", "sdpa")
    assert _backend.choose("ms_deform_attn", cpu) == "cpu"
    monkeypatch.delenv("DNOPS_BACKEND")
    with dnops.use_backend("triton"):
        assert _backend.choose("dn_attn_mask", cpu) == "cpu"
    monkeypatch.setenv("DNOPS_BACKEND", "cpp")
    args = make_inputs()
    torch.testing.assert_close(dnops.ms_deform_attn(*args), torch.ops.dnops.ms_deform_attn(*args), rtol=0, atol=0)
    monkeypatch.setenv("DNOPS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="DNOPS_BACKEND must be one of"):
        _backend.choose("ms_deform_attn", cuda)


def test_op_test_files_collect_without_hypothesis():
    """The lent GPU machine has no hypothesis: each op's test file still collects there (its GPU tests run), and its
    property tests skip, saying why."""
    code = (
        "import sys; sys.modules['hypothesis'] = None; import pytest; "
        "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', "
        "'-k', 'equals_reference or invalid_inputs or opcheck', "
        + ", ".join(f"'tests/test_{op}.py'" for op in OPS)
        + "]))"
    )
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    root = Path(__file__).parents[1]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "hypothesis is not installed" in run.stdout
    assert re.search(r"\d+ passed", run.stdout), run.stdout[-2000:]
