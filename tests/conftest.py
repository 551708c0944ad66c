import os

# The Triton interpreter must be chosen before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dnops import _backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="triton is not installed")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "triton" in item.keywords and not _backend.triton_available():
            item.add_marker(skip_triton)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def backend_env(monkeypatch):
    """Force DNOPS_BACKEND for one test: ``backend_env("cpp")``."""

    def force(name: str) -> None:
        monkeypatch.setenv("DNOPS_BACKEND", name)

    return force


def requires_cpp(op: str):
    return pytest.mark.skipif(not _backend.has_kernel(op, "cpu"), reason=f"dnops._C has no CPU kernel for {op}")
