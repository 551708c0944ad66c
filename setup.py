"""Build dnops._C: C++ CPU kernels always, CUDA kernels when a matching nvcc exists.

Environment:
  DNOPS_CUDA=0|1         skip / force the CUDA kernels (default: build when torch is a CUDA build and nvcc matches)
  DNOPS_DEBUG=1          keep debug information in the extension (stripped by default)
  DNOPS_ALLOW_TORCH_MISMATCH=1  build even when the build's torch differs from the installed one
  TORCH_CUDA_ARCH_LIST   CUDA archs (default "8.0;9.0")
  MAX_JOBS               parallel compile jobs (honoured by torch's ninja build)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup


def _toolkit_root() -> str | None:
    """The CUDA toolkit holding nvcc *and* its libraries. torch guesses CUDA_HOME from the nvcc on PATH, which
    may be a wrapper script (e.g. /usr/local/bin/nvcc) whose parent has no lib64/libcudart."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.isdir(os.path.join(root, "lib64")):
            return root
    return None


if not os.environ.get("CUDA_HOME") and _toolkit_root():
    os.environ["CUDA_HOME"] = _toolkit_root()

try:
    import torch
    from torch.utils import cpp_extension
except ModuleNotFoundError as exc:
    raise SystemExit(
        "dnops builds against the installed PyTorch: install torch first (pip install torch), then build dnops "
        "without build isolation (pip install --no-build-isolation .), so that it compiles against that torch"
    ) from exc


def _log(msg: str) -> None:
    print(f"[dnops build] {msg}", file=sys.stderr, flush=True)


def _nvcc_version(cuda_home: str | None) -> tuple[int, int] | None:
    if not cuda_home:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cxx_is_gcc() -> bool:
    """Whether the C++ compiler the extension build uses (CXX, else c++) is GCC rather than Clang."""
    try:
        out = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return False
    return "free software foundation" in out.lower()  # GCC's banner; Clang's names LLVM


def _want_cuda() -> bool:
    flag = os.environ.get("DNOPS_CUDA", "").strip()
    if flag == "0":
        _log("DNOPS_CUDA=0: skipping the CUDA kernels")
        return False
    if torch.version.cuda is None:
        if flag == "1":
            raise RuntimeError("DNOPS_CUDA=1 but this torch is not a CUDA build")
        _log(f"torch {torch.__version__} is not a CUDA build: skipping the CUDA kernels")
        return False
    nvcc = _nvcc_version(cpp_extension.CUDA_HOME)
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc is None or nvcc[0] != torch_major:
        msg = f"no nvcc of CUDA {torch_major}.x found (CUDA_HOME={cpp_extension.CUDA_HOME}, nvcc={nvcc})"
        if flag == "1":
            raise RuntimeError(f"DNOPS_CUDA=1 but {msg}")
        _log(f"{msg}: skipping the CUDA kernels")
        return False
    _log(f"building CUDA kernels with nvcc {nvcc[0]}.{nvcc[1]} for torch CUDA {torch.version.cuda}")
    BUILD_INFO["nvcc"] = f"{nvcc[0]}.{nvcc[1]}"
    return True


HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO: dict[str, str] = {"torch": torch.__version__}


class BuildExt(cpp_extension.BuildExtension):
    """Keeps objects under build/ (pip's editable build would use a fresh temp dir and recompile everything)
    and records what was built in dnops/_build_info.py for ``python -m dnops.info``: in the source tree (in-place
    and editable builds) and in the build directory a wheel is made from."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(HERE, "build", "temp")

    def run(self):
        text = f"# Written by setup.py at build time.\nBUILD = {BUILD_INFO!r}\n"
        targets = [os.path.join(HERE, "dnops")]
        if not self.inplace:
            targets.append(os.path.join(self.build_lib, "dnops"))
        for folder in targets:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "_build_info.py"), "w") as f:
                f.write(text)
        super().run()


def _installed_torch() -> str | None:
    """The torch version of the environment being installed into, seen from outside a build-isolation overlay
    (pip's isolated build puts its own torch first on the path); None when it cannot be told."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run(
            [sys.executable, "-S", "-c", "import site, sys; site.main(); import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _check_build_torch() -> None:
    installed = _installed_torch()
    if installed and installed.split("+")[0] != torch.__version__.split("+")[0]:
        msg = (
            f"building against torch {torch.__version__}, but the environment has torch {installed}: the extension "
            "would not load there and every op would fall back to its reference. Build with "
            "`pip install --no-build-isolation .` so that dnops compiles against the installed torch"
        )
        if os.environ.get("DNOPS_ALLOW_TORCH_MISMATCH") != "1":
            raise SystemExit(msg + " (or set DNOPS_ALLOW_TORCH_MISMATCH=1 to build anyway).")
        _log(msg)


def _extension():
    here = HERE
    cpu_sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp"))
        + glob.glob(os.path.join("csrc", "*", "*.cpp"))
        + glob.glob(os.path.join("csrc", "*", "cpu", "*.cpp"))
    )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*", "cuda", "*.cu")))
    cxx_flags = ["-O3", "-fopenmp"]
    # release builds drop the debug sections (most of the library's size); DNOPS_DEBUG=1 keeps them
    link_flags = ["-fopenmp"] + ([] if os.environ.get("DNOPS_DEBUG") == "1" else ["-Wl,--strip-debug"])
    if _cxx_is_gcc():
        # GCC's -O3 unroll-and-jam fuses the deformable-attention sample loop with its channel loop and then gives
        # up vectorizing the channels (a scalar loop, twice as slow). Clang has no such flag.
        cxx_flags.append("-fno-loop-unroll-and-jam")
    common = dict(
        name="dnops._C",
        include_dirs=[os.path.join(here, "csrc")],
        extra_link_args=link_flags,
    )
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _log(
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}"
        )
        _log(f"compiling {len(cpu_sources)} C++ and {len(cuda_sources)} CUDA sources")
        BUILD_INFO.update(cuda="yes", torch_cuda=str(torch.version.cuda), arch_list=os.environ["TORCH_CUDA_ARCH_LIST"])
        return cpp_extension.CUDAExtension(
            sources=cpu_sources + cuda_sources,
            define_macros=[("DNOPS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            **common,
        )
    _log(f"compiling {len(cpu_sources)} C++ sources (CPU only)")
    BUILD_INFO.update(cuda="no")
    return cpp_extension.CppExtension(sources=cpu_sources, extra_compile_args={"cxx": cxx_flags}, **common)


_check_build_torch()
_major, _minor = torch.__version__.split(".")[:2]

setup(
    packages=find_packages(include=["dnops", "dnops.*"]),
    # the local kernel repository of the kernels package (dnops.compat.transformers.kernel_mapping): data, not a package
    package_data={"dnops.compat": ["kernel_repo/build/torch-universal/*"]},
    install_requires=[f"torch=={_major}.{_minor}.*"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt},
)
