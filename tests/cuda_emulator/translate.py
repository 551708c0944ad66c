"""The source step: a dnops .cu file as C++ the emulator compiles, line for line.

- ``kernel<<<grid, block[, shared[, stream]]>>>(args)`` becomes a call of ``cuemu::launch``;
- ``TORCH_LIBRARY_IMPL(dnops, CUDA, m)`` registers the kernels as the CPU kernels of another op library
  (``dnops_emulated``, whose schemas are dnops' own; see tests/cuda_emulator/__init__.py), and ``at::kCUDA``
  becomes ``at::kCPU``: emulated device memory is CPU memory;
- every ``reinterpret_cast`` goes through ``cuemu::reinterpret``, which checks the alignment a vector access needs;
- the emulator's header and ``__CUDA_ARCH__`` come after the last ``#include``, so torch's headers stay host code;
- a ``#line`` directive keeps every line where it was, so messages name the original file and line.

Constructs the emulator does not model (shared memory, inline PTX, cub / thrust, cooperative groups, ...) are
refused with the file and line, rather than compiled into something that runs differently.
"""

from __future__ import annotations

import re

# What the emulator cannot run yet: the source step refuses it by name.
UNSUPPORTED = {
    "__shared__": "shared memory",
    "asm(": "inline PTX",
    "asm volatile": "inline PTX",
    "cub::": "cub",
    "thrust::": "thrust",
    "cooperative_groups": "cooperative groups",
    "__syncthreads_count": "__syncthreads_count",
    "__syncthreads_and": "__syncthreads_and",
    "__syncthreads_or": "__syncthreads_or",
    "__match_any_sync": "__match_any_sync",
    "__match_all_sync": "__match_all_sync",
    "__reduce_add_sync": "__reduce_*_sync",
    "__nanosleep": "__nanosleep",
    "cudaMemcpy": "host-side CUDA runtime calls",
    "cudaMalloc": "host-side CUDA runtime calls",
    "__ldg": "__ldg",
    "clock64": "clock64",
    "atomicCAS": "atomicCAS",
}

# Mutations the tests switch on at run time (cuemu::mutant(id)): each inserted at the end of its anchor's line.
MUTANTS = {
    # lanes past D leave the channel pass before the group's shuffles (legal at D = 32, undefined at D = 130)
    1: (
        "ms_deform_attn_cuda.cu",
        "const bool active = c < dm.channels;",
        " if (::cuemu::mutant(1) && !active) continue;",
    ),
}


class TranslateError(ValueError):
    pass


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _match_back(text: str, end: int) -> int:
    """Start of the kernel expression that ends just before ``end`` (``name``, ``ns::name<T, N>``)."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if i > 0 and text[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses, brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _matching_paren(text: str, open_pos: int, where: str) -> int:
    depth = 0
    for i in range(open_pos, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise TranslateError(f"{where}: unbalanced parentheses in a kernel launch")


def _launches(text: str, path: str) -> str:
    out, pos = [], 0
    while True:
        start = text.find("<<<", pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        where = f"{path}:{_line_of(text, start)}"
        name_start = _match_back(text, start)
        kernel = text[name_start:start].strip()
        if not kernel:
            raise TranslateError(f"{where}: cannot read the kernel name of a launch")
        close = text.find(">>>", start)
        if close < 0:
            raise TranslateError(f"{where}: a launch without >>>")
        config = _split_top(text[start + 3 : close])
        if not 2 <= len(config) <= 4:
            raise TranslateError(f"{where}: a launch takes 2 to 4 configuration values, got {len(config)}")
        grid, block = config[0], config[1]
        shared = config[2] if len(config) > 2 else "0"
        stream = config[3] if len(config) > 3 else "nullptr"
        paren = close + 3
        while text[paren].isspace():
            paren += 1
        if text[paren] != "(":
            raise TranslateError(f"{where}: a launch's >>> must be followed by its arguments")
        end = _matching_paren(text, paren, where)
        args = text[paren + 1 : end]
        sep = ", " if args.strip() else ""
        call = (
            f'::cuemu::launch(::cuemu::Site{{"{kernel}", __FILE__, __LINE__}}, {grid}, {block}, {shared}, '
            f"::cuemu::stream_of({stream}), {kernel}{sep}{args})"
        )
        out.append(text[pos:name_start])
        out.append(call)
        pos = end + 1


def translate(text: str, path: str, namespace: str, arch: int, mutants: bool = True) -> str:
    """The emulator's C++ for the .cu source ``text`` (``path`` as messages should name it); its CUDA kernels
    registered as the CPU kernels of op library ``namespace`` (empty: the file registers its own ops)."""
    for i, line in enumerate(text.splitlines(), 1):
        code = line.split("//", 1)[0]
        for token, what in UNSUPPORTED.items():
            if token in code:
                raise TranslateError(f"{path}:{i}: {what} ({token.strip('(')}) is not emulated")
    if namespace and "TORCH_LIBRARY_IMPL(dnops, CUDA, m)" not in text:
        raise TranslateError(f"{path}: no TORCH_LIBRARY_IMPL(dnops, CUDA, m) block")
    if namespace:
        text = text.replace("TORCH_LIBRARY_IMPL(dnops, CUDA, m)", f"TORCH_LIBRARY_IMPL({namespace}, CPU, m)")
    text = re.sub(r"\bat::kCUDA\b", "at::kCPU", text)
    text = re.sub(r"\breinterpret_cast<", "::cuemu::reinterpret<", text)
    if mutants:
        for file, anchor, insertion in MUTANTS.values():
            if path.endswith(file):
                if text.count(anchor) != 1:
                    raise TranslateError(f"{path}: the mutant anchor {anchor!r} is not found exactly once")
                at = text.index(anchor) + len(anchor)
                text = text[:at] + insertion + text[at:]
    text = _launches(text, path)
    lines = text.split("\n")
    last_include = max((i for i, line in enumerate(lines) if line.lstrip().startswith("#include")), default=-1)
    if last_include < 0:
        raise TranslateError(f"{path}: no #include")
    epilogue = [
        '#include "cuemu.h"',
        f"#define __CUDA_ARCH__ {arch}",
        '#include "cuemu_arch.h"',
        f'#line {last_include + 2} "{path}"',
    ]
    lines[last_include + 1 : last_include + 1] = epilogue
    return f'#line 1 "{path}"\n' + "\n".join(lines)
