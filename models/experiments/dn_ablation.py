"""``python -m models.experiments.dn_ablation``: DN-DETR's ablation at small scale, on the embedded digits data.

Three runs on one schedule and seed: ``dn`` (denoising with its attention mask), ``no_dn`` (plain
DAB-Deformable-DETR) and ``no_dn_mask`` (denoising queries the matching queries can see). Each epoch records
COCO AP and IS, the matching instability (the fraction of GT of a fixed set of training images whose matched
query changed since the previous epoch). Writes models/experiments/dn_ablation.json and .png.

The runs go in parallel, one process and one thread each (``--threads``), or one after the other with
``--sequential``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from models.config import Config

HERE = Path(__file__).resolve().parent
RUNS = {"dn": [], "no_dn": ["--no-dn"], "no_dn_mask": ["--no-dn-mask"]}
SCHEDULE = Config(
    data="data/digits-1000",
    num_train=1000,
    num_val=200,
    epochs=8,
    batch_size=8,
    track_is=64,
    progress=False,
)


def _flags(cfg: Config) -> list[str]:
    default = Config()
    flags = []
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if value != getattr(default, f.name) and not isinstance(value, bool):
            flags.append(f"--{f.name.replace('_', '-')}={value}")
    return flags + ([] if cfg.progress else ["--no-progress"])


def summarise(runs: dict[str, list[dict]]) -> dict:
    """The paper's three claims, read off the logs."""
    final_no_dn = runs["no_dn"][-1]["AP"]
    reach = next((e["epoch"] for e in runs["dn"] if e["AP"] >= final_no_dn), None)
    mean_is = {name: sum(e["IS"] for e in log[1:]) / max(len(log) - 1, 1) for name, log in runs.items()}
    return {
        "final_AP": {name: log[-1]["AP"] for name, log in runs.items()},
        "dn_epoch_reaching_no_dn_final_AP": reach,
        "epochs": len(runs["dn"]),
        "mean_IS": mean_is,
    }


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ap, ax_is) = plt.subplots(1, 2, figsize=(10, 4))
    for name, run in result["runs"].items():
        ax_ap.plot(run["epoch"], run["AP"], marker="o", label=name)
        ax_is.plot(run["epoch"][1:], run["IS"][1:], marker="o", label=name)
    ax_ap.set(xlabel="epoch", ylabel="COCO AP (val)", title="AP")
    ax_is.set(xlabel="epoch", ylabel="fraction of GT re-matched", title="matching instability (IS)")
    for ax in (ax_ap, ax_is):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("DN-DETR ablation, digits data (" + ", ".join(f"{k}={v}" for k, v in result["schedule"].items()) + ")")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/dn_ablation", help="directory of the three runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--epochs", type=int, default=SCHEDULE.epochs)
    args = p.parse_args(argv)
    cfg = dataclasses.replace(SCHEDULE, epochs=args.epochs, threads=args.threads)
    out = Path(args.out)
    # generate the dataset once, before the runs race for it
    from models.data import DigitsConfig, ensure_digits_dataset

    ensure_digits_dataset(cfg.data, num_train=cfg.num_train, num_val=cfg.num_val, cfg=DigitsConfig(cfg.image_size))
    start = time.time()
    procs = {}
    for name, extra in RUNS.items():
        cmd = [sys.executable, "-m", "models.train", *_flags(cfg), f"--out={out / name}", *extra]
        print(" ".join(cmd[1:]), flush=True)
        procs[name] = subprocess.Popen(cmd)
        if args.sequential and procs[name].wait():
            return 1
    if any(proc.wait() for proc in procs.values()):
        return 1
    logs = {name: json.loads((out / name / "log.json").read_text()) for name in RUNS}
    result = {
        "config": cfg.to_dict() | {"runs": {name: extra for name, extra in RUNS.items()}},
        "schedule": {"epochs": cfg.epochs, "train_images": cfg.num_train, "batch": cfg.batch_size},
        "runs": {
            name: {key: [e.get(key) for e in log] for key in ("epoch", "AP", "AP50", "AP75", "IS", "loss")}
            for name, log in logs.items()
        },
        "wall_s": round(time.time() - start),
    }
    result["summary"] = summarise(logs)
    (HERE / "dn_ablation.json").write_text(json.dumps(result, indent=1))
    plot(result, HERE / "dn_ablation.png")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
