"""``python -m benchmarks.dn_detr_adapter``: DN-DETR's ``prepare_for_dn`` training branch (dnops.compat.dn_detr) on
its fused op (one dispatch of ``dnops::_dn_detr_prepare``, csrc/dn_queries/dn_detr_prepare.cpp) against the same
steps dispatched one by one from Python, forward and forward + backward, at B = 2, 8, 32 (the report's GT counts,
DN-DETR's 5 groups and noise 0.2 / 0.4, 300 queries, 256 channels). One thread, the two paths interleaved, median
of the timed repetitions after warm-up. The figures are in docs/kernels.md."""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from collections.abc import Callable

import torch

from benchmarks import cases
from dnops import _backend
from dnops.compat import dn_detr

# the Python path: dn_detr's choice of path reads these three names of dnops._backend
_PYTHON_PATH = types.SimpleNamespace(
    choose=lambda op, device: "reference", is_compiled=lambda backend: False, draw_seed=_backend.draw_seed
)


def _step(targets: list[dict], batch: int, anchors, label_enc, backward: bool) -> None:
    label, bbox, _, _ = dn_detr.prepare_for_dn(
        (targets, 5, 0.2, 0.4, 1), anchors, batch, True, 300, 91, label_enc.weight.shape[1] + 1, label_enc
    )
    if backward:
        (label.sum() + bbox.sum()).backward()


def _median_us(fns: dict[str, Callable[[], None]], reps: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def measure(batches: tuple[int, ...] = (2, 8, 32), reps: int = 600, warmup: int = 50) -> list[dict]:
    """One row per (B, pass): the median microseconds of the fused op and of the Python path."""
    if not _backend.HAS_C:
        raise SystemExit("dnops._C is not built: there is no fused op to measure")
    torch.manual_seed(0)
    label_enc = torch.nn.Embedding(92, 255)
    anchors = torch.rand(300, 4, requires_grad=True)
    rows = []
    for batch in batches:
        labels, boxes, counts = cases.dn_inputs(batch)
        targets = [{"labels": x, "boxes": y} for x, y in zip(labels.split(counts), boxes.split(counts), strict=True)]
        for backward in (False, True):

            def on(path, b=batch, t=targets, bw=backward):
                def run():
                    dn_detr._backend = path
                    try:
                        _step(t, b, anchors, label_enc, bw)
                    finally:
                        dn_detr._backend = _backend

                return run

            med = _median_us({"fused op": on(_backend), "python": on(_PYTHON_PATH)}, reps, warmup)
            rows.append({"B": batch, "gt": sum(counts), "pass": "fwd+bwd" if backward else "fwd", **med})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the rows as json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'B':>3} {'GT':>4} {'pass':<8} {'fused op us':>12} {'python us':>10} {'python / fused':>15}")
    for r in rows:
        ratio = r["python"] / r["fused op"]
        print(f"{r['B']:>3} {r['gt']:>4} {r['pass']:<8} {r['fused op']:>12.0f} {r['python']:>10.0f} {ratio:>15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
