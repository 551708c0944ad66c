"""``python -m models.plot RUN_DIR... [--out ap.png]``: AP-vs-epoch curves of training runs (their log.json)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def plot_runs(run_dirs: list[str | Path], out: str | Path, metric: str = "AP") -> Path:
    """One curve of ``metric`` per run directory (labelled by its name) into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in map(Path, run_dirs):
        log = json.loads((run / "log.json").read_text())
        ax.plot([e["epoch"] for e in log], [e[metric] for e in log], marker="o", label=run.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"COCO {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories holding log.json")
    p.add_argument("--out", default="ap.png")
    p.add_argument("--metric", default="AP", help="AP, AP50, AP75, APs, APm, APl or IS")
    args = p.parse_args(argv)
    print(plot_runs(args.runs, args.out, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
