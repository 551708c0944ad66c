"""``python -m dnops.info``: versions, what was compiled, and which implementation each op runs per device."""

from __future__ import annotations

import os
import platform

import torch

from dnops import _backend
from dnops._registry import OPS


def build_info() -> dict[str, str]:
    try:
        from dnops import _build_info

        return dict(_build_info.BUILD)
    except ImportError:
        return {}


def report() -> str:
    lines = [f"dnops {__import__('dnops').__version__}  python {platform.python_version()}  {platform.machine()}"]
    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
    triton_version = "not installed"
    if _backend.triton_available():
        import triton

        triton_version = triton.__version__
    lines.append(f"triton {triton_version}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    if _backend.HAS_C:
        cuda = "yes" if _backend._C.built_with_cuda() else "no"
        lines.append(f"dnops._C: loaded; C++ CPU kernels: yes; CUDA kernels: {cuda}")
    else:
        lines.append(f"dnops._C: NOT loaded ({_backend.C_ERROR}): every op runs its reference")
    for key, value in build_info().items():
        lines.append(f"  build {key}: {value}")
    lines.append(f"DNOPS_BACKEND={os.environ.get('DNOPS_BACKEND', '')!r}")
    lines.append("")
    lines.append(f"{'op':<20} {'device':<6} " + " ".join(f"{b:<9}" for b in _backend.BACKENDS) + " -> runs")
    for op in OPS:
        for device in ("cpu", "cuda"):
            can = _backend.available(op, device)
            try:
                runs = _backend.choose(op, torch.device(device))
            except RuntimeError:  # DNOPS_BACKEND asks for a backend this op cannot run here
                runs = (
                    f"raises: {_backend.missing(op, _backend._resolve(_backend.requested_backend(), device), device)}"
                )
            flags = " ".join(f"{'yes' if can[b] else '-':<9}" for b in _backend.BACKENDS)
            lines.append(f"{op:<20} {device:<6} {flags} -> {runs}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
