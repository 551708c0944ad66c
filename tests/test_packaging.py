"""What `pip install` of dnops gets: the sources an sdist must carry, the torch it pins, the message without
torch, and the package layout after `import dnops`."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _setup(*args: str, tmp: Path, prelude: str = "") -> subprocess.CompletedProcess:
    code = (
        f"import sys; {prelude}sys.argv = ['setup.py', *{list(args)!r}]; "
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__file__': 'setup.py', '__name__': '__main__'})"
    )
    env = {"DNOPS_CUDA": "0", "PATH": "/usr/bin:/bin", "HOME": str(tmp)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_sdist_carries_every_source_the_build_compiles(tmp_path):
    done = _setup("-q", "sdist", "-d", str(tmp_path), tmp=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (archive,) = tmp_path.glob("dnops-*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True, text=True, check=True)
    missing = set(tracked.stdout.split()) - shipped
    assert not missing, f"the sdist lacks {sorted(missing)}"
    assert {"setup.py", "pyproject.toml", "MANIFEST.in"} <= shipped
    repo = "dnops/compat/kernel_repo/build/torch-universal/"  # the kernels package's local repository: data files
    assert {repo + "metadata.json", repo + "__init__.py"} <= shipped


def test_wheel_pins_the_torch_it_was_built_against(tmp_path):
    done = _setup("-q", "egg_info", "-e", str(tmp_path), tmp=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (requires,) = tmp_path.glob("*.egg-info/requires.txt")
    major, minor = torch.__version__.split(".")[:2]
    assert requires.read_text().splitlines()[0] == f"torch=={major}.{minor}.*"
    (info,) = tmp_path.glob("*.egg-info/PKG-INFO")
    assert "License: Apache-2.0" in info.read_text().splitlines()
    assert "LICENSE" in (tmp_path / "dnops.egg-info" / "SOURCES.txt").read_text().split()


def test_building_without_torch_says_install_torch_first(tmp_path):
    done = _setup("--version", tmp=tmp_path, prelude="sys.modules['torch'] = None; ")
    assert done.returncode != 0
    assert "install torch first" in done.stderr and "ModuleNotFoundError" not in done.stderr


def test_subpackages_are_attributes_after_import_dnops():
    code = "import dnops; dnops.nn.MSDeformAttn; dnops.nn.DNMultiheadAttention; dnops.compat.dn_detr.prepare_for_dn"
    done = subprocess.run([sys.executable, "-c", code + "; dnops.compat.dino.prepare_for_cdn"], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_load_failure_warning_names_both_torches_and_the_fix():
    code = (
        "import sys, warnings; sys.modules['dnops._C'] = None; warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import dnops\n"
        "print(str(caught[0].message)); assert not dnops.HAS_C"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"this is torch {torch.__version__}" in done.stdout and "built for torch" in done.stdout
    assert "pip install --no-build-isolation" in done.stdout
