"""``python -m models.experiments.dn_ablation``: DN-DETR's ablation at small scale, on the embedded digits data.

Three arms on one schedule, each trained with every seed of ``--seeds``: ``dn`` (denoising with its attention
mask), ``no_dn`` (plain DAB-Deformable-DETR) and ``no_dn_mask`` (denoising queries the matching queries can
see). Each epoch records COCO AP and IS, the matching instability (the fraction of GT of a fixed set of training
images whose matched query changed since the previous epoch). Writes models/experiments/dn_ablation.json and .png.

The runs go in parallel, one process and one thread each (``--threads``), or one after the other with
``--sequential``. Each run resumes from its checkpoint, so finished runs are not redone. The json holds, per arm,
the seed-mean curves (``AP``, ``IS``, ...) and each seed's (``AP_per_seed``, ...).
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


KEYS = ("AP", "AP50", "AP75", "IS", "loss")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def collect(logs: dict[int, dict[str, list[dict]]]) -> dict:
    """Per arm: epoch, each key's mean over seeds per epoch, and the per-seed curves (``<key>_per_seed``)."""
    runs = {}
    for name in RUNS:
        per_seed = [logs[seed][name] for seed in sorted(logs)]
        arm = {"epoch": [e["epoch"] for e in per_seed[0]]}
        for key in KEYS:
            curves = [[e.get(key) for e in log] for log in per_seed]
            arm[key] = [_mean(list(at_epoch)) for at_epoch in zip(*curves, strict=True)]
            arm[f"{key}_per_seed"] = curves
        runs[name] = arm
    return runs


def _reach(ap: list[float], target: float, epochs: list[int]) -> int | None:
    return next((e for e, a in zip(epochs, ap, strict=True) if a >= target), None)


def summarise(runs: dict, seeds: list[int]) -> dict:
    """The paper's three claims, read off the seed-mean curves (and each seed's)."""
    epochs = runs["dn"]["epoch"]
    per_seed_reach = [
        _reach(dn, no_dn[-1], epochs)
        for dn, no_dn in zip(runs["dn"]["AP_per_seed"], runs["no_dn"]["AP_per_seed"], strict=True)
    ]
    return {
        "seeds": seeds,
        "epochs": len(epochs),
        "final_AP": {name: arm["AP"][-1] for name, arm in runs.items()},
        "final_AP_per_seed": {name: [c[-1] for c in arm["AP_per_seed"]] for name, arm in runs.items()},
        "dn_epoch_reaching_no_dn_final_AP": _reach(runs["dn"]["AP"], runs["no_dn"]["AP"][-1], epochs),
        "dn_epoch_reaching_no_dn_final_AP_per_seed": per_seed_reach,
        "mean_IS": {name: _mean(arm["IS"][1:]) for name, arm in runs.items()},
    }


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ap, ax_is) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, run) in enumerate(result["runs"].items()):
        color = f"C{i}"
        ax_ap.plot(run["epoch"], run["AP"], marker="o", color=color, label=f"{name} (mean)")
        ax_is.plot(run["epoch"][1:], run["IS"][1:], marker="o", color=color, label=f"{name} (mean)")
        for ap, inst in zip(run["AP_per_seed"], run["IS_per_seed"], strict=True):
            ax_ap.plot(run["epoch"], ap, color=color, alpha=0.3, lw=0.8)
            ax_is.plot(run["epoch"][1:], inst[1:], color=color, alpha=0.3, lw=0.8)
    ax_ap.set(xlabel="epoch", ylabel="COCO AP (val)", title="AP (thin lines: single seeds)")
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
    p.add_argument("--out", default="runs/dn_ablation", help="directory of the runs (OUT/seed<S>/<arm>)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--epochs", type=int, default=SCHEDULE.epochs)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (init, noise, order)")
    args = p.parse_args(argv)
    out = Path(args.out)
    cfg = dataclasses.replace(SCHEDULE, epochs=args.epochs, threads=args.threads)
    # generate the dataset once, before the runs race for it
    from models.data import DigitsConfig, ensure_digits_dataset

    ensure_digits_dataset(cfg.data, cfg.num_train, cfg.num_val, cfg=DigitsConfig(cfg.image_size))
    start = time.time()
    procs = []
    for seed in args.seeds:
        for name, extra in RUNS.items():
            # --resume: a finished run is not redone, an interrupted one continues
            run = dataclasses.replace(cfg, seed=seed)
            cmd = [sys.executable, "-m", "models.train", *_flags(run), f"--out={out / f'seed{seed}' / name}"]
            cmd += [*extra, "--resume"]
            print(" ".join(cmd[1:]), flush=True)
            procs.append(subprocess.Popen(cmd))
            if args.sequential and procs[-1].wait():
                return 1
    if any(proc.wait() for proc in procs):
        return 1
    logs = {
        seed: {name: json.loads((out / f"seed{seed}" / name / "log.json").read_text()) for name in RUNS}
        for seed in args.seeds
    }
    result = {
        "config": cfg.to_dict() | {"seeds": args.seeds, "runs": {name: extra for name, extra in RUNS.items()}},
        "schedule": {"epochs": cfg.epochs, "train_images": cfg.num_train, "batch": cfg.batch_size, "seeds": len(logs)},
        "runs": collect(logs),
        "wall_s_this_invocation": round(time.time() - start),
    }
    result["summary"] = summarise(result["runs"], args.seeds)
    (HERE / "dn_ablation.json").write_text(json.dumps(result, indent=1))
    plot(result, HERE / "dn_ablation.png")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
