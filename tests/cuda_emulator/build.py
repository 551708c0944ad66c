"""Builds the emulated CUDA library: dnops' .cu files through the source step, compiled with g++ for the CPU.

    python -m tests.cuda_emulator.build [--variant o2|asan ...] [--jobs N]

prints one line per variant, ``<variant> <path of the .so>``. Variants: ``o2`` (-O2), ``asan`` (-O1 with
AddressSanitizer and UndefinedBehaviorSanitizer; run it with the LD_PRELOAD that ``preload()`` names) and
``count`` (-O2, every memory access of the kernels counted: tests/cuda_emulator/counts.py).

Every translation unit is cached by the hash of everything it can read (its translated text, every header of
csrc/ and of the emulator, the flags and the torch version), under ``$DNOPS_EMULATOR_CACHE`` (default
~/.cache/dnops/cuda-emulator), outside the checkout, so a fresh clone on the same machine rebuilds nothing. Each
build keeps the ``KEEP`` most recently used versions of every object, library and generated source and deletes the
older ones (every header edit makes new ones, ~100 MB each, and nothing else would ever delete them).

Translation units: the emulator's runtime; each csrc/*/cuda/*.cu for sm_90 as op library ``dnops_emulated``, and
once more for sm_80 (``dnops_emulated_sm80``) when it has code that depends on ``__CUDA_ARCH__``; the emulator's
own test kernels (tests/cuda_emulator/broken_kernels.cu).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import cpp_extension

from tests.cuda_emulator.translate import translate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
NAMESPACES = {900: "dnops_emulated", 800: "dnops_emulated_sm80"}

FLAGS = {
    "o2": ["-O2"],
    "asan": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "count": ["-O2", "-g1"],
}
LINK_FLAGS = {"o2": [], "asan": ["-fsanitize=address,undefined"], "count": []}
# the counting build's kernels call a hook on every memory access (cuemu_count.cpp), linked without TSan's runtime
INSTRUMENT = {"count": ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-fno-tree-sra"]}
# versions kept per cached file: switching between a few checkouts or commits rebuilds nothing
KEEP = 4


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dnops" / "cuda-emulator"
    return Path(os.environ.get("DNOPS_EMULATOR_CACHE", default))


@dataclass
class Unit:
    name: str
    text: str
    kernels: bool = True  # holds CUDA code (instrumented in the counting build)


def units(variant: str) -> list[Unit]:
    """The translation units of the library, largest first (they start compiling first)."""
    out = [Unit("cuemu", (HERE / "cuemu.cpp").read_text(), kernels=False)]
    if variant in INSTRUMENT:
        out.append(Unit("cuemu_count", (HERE / "cuemu_count.cpp").read_text(), kernels=False))
    for cu in sorted(CSRC.glob("*/cuda/*.cu")):
        rel = cu.relative_to(ROOT).as_posix()
        source = cu.read_text()
        for arch in (900, 800) if "__CUDA_ARCH__" in source else (900,):
            out.append(Unit(f"{cu.stem}_sm{arch // 10}", translate(source, rel, NAMESPACES[arch], arch)))
    broken = HERE / "broken_kernels.cu"
    out.append(Unit("broken_kernels", translate(broken.read_text(), broken.relative_to(ROOT).as_posix(), "", 900)))
    return sorted(out, key=lambda u: -len(u.text))


def _headers_digest() -> str:
    h = hashlib.sha256()
    for folder in (CSRC, HERE):
        for path in sorted(folder.rglob("*.h")):
            h.update(path.relative_to(ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _include_flags(src: Path) -> list[str]:
    flags = [f"-I{src / 'emu' / 'shim'}", f"-I{src / 'emu'}", f"-I{src / 'csrc'}"]
    for path in cpp_extension.include_paths():
        flags.append(f"-isystem{path}")
    return flags


def _mirror(src: Path) -> None:
    """The headers the units read, copied under ``src`` (rewritten only when changed)."""
    for folder, dest in ((CSRC, src / "csrc"), (HERE, src / "emu")):
        for path in folder.rglob("*.h"):
            target = dest / path.relative_to(folder)
            data = path.read_bytes()
            if not target.exists() or target.read_bytes() != data:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)


def _compile(cmd: list[str], obj: Path) -> None:
    tmp = obj.with_suffix(".tmp.o")
    proc = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cuda emulator: compiling {obj.name} failed:\n{proc.stderr[-6000:]}")
    tmp.replace(obj)


def build(variants: list[str], jobs: int = 2) -> dict[str, Path]:
    """Builds (or finds cached) each variant's library and returns its path."""
    version = torch.__version__
    root = cache_root() / f"torch-{version}"
    src = root / "src"
    _mirror(src)
    digest = _headers_digest()
    cxx = os.environ.get("CXX", "g++")
    base = ["-std=c++20", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    base += _include_flags(src)
    todo, libs = [], {}
    for variant in variants:
        objs = []
        for unit in units(variant):
            flags = base + FLAGS[variant] + (INSTRUMENT.get(variant, []) if unit.kernels else [])
            key = hashlib.sha256("\n".join([unit.text, digest, cxx, version, *flags]).encode()).hexdigest()[:20]
            obj = root / variant / f"{unit.name}-{key}.o"
            objs.append(obj)
            if not obj.exists():
                gen = src / "gen" / f"{unit.name}-{key}.cpp"
                gen.parent.mkdir(parents=True, exist_ok=True)
                if not gen.exists() or gen.read_text() != unit.text:
                    gen.write_text(unit.text)
                obj.parent.mkdir(parents=True, exist_ok=True)
                todo.append(([cxx, *flags, "-c", str(gen)], obj))
        libs[variant] = objs
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        for f in [pool.submit(_compile, cmd, obj) for cmd, obj in todo]:
            f.result()
    out = {}
    torch_lib = Path(torch.__file__).parent / "lib"
    for variant, objs in libs.items():
        key = hashlib.sha256("".join(o.name for o in objs).encode()).hexdigest()[:20]
        lib = root / variant / f"libdnops_emulated-{key}.so"
        if not lib.exists():
            cmd = [cxx, "-shared", *LINK_FLAGS[variant], *map(str, objs), f"-L{torch_lib}", "-lc10", "-ltorch_cpu"]
            cmd += ["-ltorch", f"-Wl,-rpath,{torch_lib}", "-o", str(lib.with_suffix(".tmp"))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"cuda emulator: linking {variant} failed:\n{proc.stderr[-6000:]}")
            lib.with_suffix(".tmp").replace(lib)
        out[variant] = lib
        _prune(root / variant, [*objs, lib])
    _prune(src / "gen", [src / "gen" / f"{obj.stem}.cpp" for objs in libs.values() for obj in objs])
    return out


def _prune(folder: Path, used: list[Path]) -> None:
    """Marks ``used`` as just used and deletes all but the KEEP most recently used versions of each file in
    ``folder`` (versions: names ``<stem>-<key>.<suffix>`` that differ only in the key)."""
    for path in used:
        try:
            os.utime(path)
        except FileNotFoundError:  # pruned by a build of another checkout since
            pass
    versions: dict[tuple[str, str], list[tuple[float, Path]]] = {}
    for path in folder.iterdir() if folder.is_dir() else ():
        stem, sep, key = path.stem.rpartition("-")
        if sep and "." not in key and path.suffix in (".o", ".so", ".cpp"):
            try:  # another build may have pruned it meanwhile
                versions.setdefault((stem, path.suffix), []).append((path.stat().st_mtime, path))
            except FileNotFoundError:
                pass
    for found in versions.values():
        for _, path in sorted(found, reverse=True)[KEEP:]:
            path.unlink(missing_ok=True)


def preload() -> str:
    """LD_PRELOAD for a process that loads the asan variant: libasan first, and libstdc++ (without it the first
    C++ exception thrown through the instrumented library crashes)."""
    cxx = os.environ.get("CXX", "g++")
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        libs.append(os.path.realpath(path))
    return " ".join(libs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=sorted(FLAGS), help="default: o2 and asan")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    parser.add_argument("--preload", action="store_true", help="print the LD_PRELOAD of the asan variant and exit")
    args = parser.parse_args()
    if args.preload:
        print(preload())
        return
    for variant, lib in build(args.variant or ["o2", "asan"], args.jobs).items():
        print(variant, lib)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
