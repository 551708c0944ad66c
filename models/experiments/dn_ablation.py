"""``python -m models.experiments.dn_ablation``: DN-DETR's ablation at small scale, on the embedded digits data.

Four arms on one schedule, each trained with every seed of ``--seeds``: ``dn`` (denoising with its attention mask),
``no_dn`` (plain DAB-Deformable-DETR), ``no_dn_mask`` (denoising queries the matching queries can see) and ``cdn``
(DINO's contrastive denoising). Each epoch records COCO AP and IS, the matching instability (the fraction of GT of a
fixed set of training images whose matched query changed since the previous epoch). Writes
models/experiments/dn_ablation.json and .png.

The runs go in parallel, one thread each (``--threads``), at most ``--jobs`` processes at a time (one per core:
more than the cores cost each run a quarter more CPU time in cache misses and switches). They advance in stages of
``--stage`` epochs, every run reaching a stage's epoch before any goes on, so an interrupted experiment has every
arm at the same epoch. Each run resumes from its checkpoint (bit for bit), so finished epochs are not redone. The
json holds, per arm, the seed-mean curves (``AP``, ``IS``, ...) and each seed's (``AP_per_seed``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from models.config import Config

HERE = Path(__file__).resolve().parent
# cdn: DINO's contrastive denoising with DINO's noise scales (label 0.5, box 1.0) and its dn_number of 100
RUNS = {
    "dn": [],
    "no_dn": ["--no-dn"],
    "no_dn_mask": ["--no-dn-mask"],
    "cdn": ["--dn-mode=cdn", "--label-noise=0.5", "--box-noise=1.0"],
}
# A model and canvas smaller than models.config's defaults (width 64, 96-pixel images with the digits scaled to
# them: a step costs about half) so that twelve runs of a schedule long enough for no DN to converge fit in about
# two hours of two cores. The learning rate drops at ~2/3 of the schedule, as in Deformable-DETR.
SCHEDULE = Config(
    data="data/digits-96-1000",
    num_train=1000,
    num_val=200,
    image_size=96,
    d_model=64,
    ffn_dim=256,
    epochs=20,
    lr_drop=13,
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


def _spread(values: list[float]) -> list[float]:
    return [min(values), max(values)]


def probe(out: Path, seeds: list[int]) -> dict:
    """The checkpoint measurements (models/experiments/dn_probes.py) of every seed's final epoch: the attention
    mass on the DN queries of the no-mask arm, and the duplicate share of every arm."""
    from models.experiments.dn_probes import attention_on_dn, duplicates

    return {
        "attention_on_dn": [attention_on_dn(out / f"seed{s}" / "no_dn_mask" / "checkpoint.pth") for s in seeds],
        "duplicates": {name: [duplicates(out / f"seed{s}" / name / "checkpoint.pth") for s in seeds] for name in RUNS},
    }


def summarise(runs: dict, probes: dict, seeds: list[int]) -> dict:
    """The papers' claims, measured on the curves (seed mean, and each seed) and the probes, each with its verdict
    at this scale by the rule stated in its ``rule``."""
    epochs = runs["dn"]["epoch"]
    final = {name: arm["AP"][-1] for name, arm in runs.items()}
    final_per_seed = {name: [c[-1] for c in arm["AP_per_seed"]] for name, arm in runs.items()}
    no_dn_gain = runs["no_dn"]["AP"][-1] - runs["no_dn"]["AP"][-4] if len(epochs) >= 4 else None
    convergence = {}
    for name in ("dn", "cdn"):
        gaps = [[a - b for a, b in zip(x, y, strict=True)] for x, y in zip(
            runs[name]["AP_per_seed"], runs["no_dn"]["AP_per_seed"], strict=True)]  # fmt: skip
        reach = _reach(runs[name]["AP"], final["no_dn"], epochs)
        convergence[name] = {
            "epoch_reaching_no_dn_final_AP": reach,
            "per_seed": [
                _reach(c, t[-1], epochs)
                for c, t in zip(runs[name]["AP_per_seed"], runs["no_dn"]["AP_per_seed"], strict=True)
            ],  # fmt: skip
            "AP_gap_per_epoch": [_mean(list(g)) for g in zip(*gaps, strict=True)],
            "AP_gap_per_epoch_spread": [_spread(list(g)) for g in zip(*gaps, strict=True)],
            "reproduced": reach is not None and reach <= len(epochs) / 2,
        }
    mean_is = {name: _mean(arm["IS"][1:]) for name, arm in runs.items()}
    is_per_seed = {name: [_mean(c[1:]) for c in arm["IS_per_seed"]] for name, arm in runs.items()}
    attention = probes["attention_on_dn"]
    layers = len(attention[0]["per_layer"])
    duplicate_share = {name: _mean([d["share"] for d in ds]) for name, ds in probes["duplicates"].items()}
    mask_drop = [a - b for a, b in zip(final_per_seed["dn"], final_per_seed["no_dn_mask"], strict=True)]
    return {
        "seeds": seeds,
        "epochs": len(epochs),
        "final_AP": final,
        "final_AP_per_seed": final_per_seed,
        "no_dn_AP_gain_last_three_epochs": no_dn_gain,
        "no_dn_converged": no_dn_gain is not None and no_dn_gain < 0.005,
        "mean_IS": mean_is,
        "claims": {
            "a_convergence": convergence
            | {"rule": "the DN arm's seed-mean AP reaches no DN's final AP within half the schedule"},
            "b_matching_stability": {
                "mean_IS": mean_is,
                "mean_IS_per_seed": is_per_seed,
                "reproduced": all(d < n for d, n in zip(is_per_seed["dn"], is_per_seed["no_dn"], strict=True)),
                "rule": "DN's mean IS (epochs 2 on) below no DN's for every seed",
            },
            "c_mask": {
                "AP_drop_per_seed": mask_drop,
                "AP_drop": _mean(mask_drop),
                "below_no_dn": final["no_dn_mask"] < final["no_dn"],
                "attention_on_dn_per_layer": [_mean([a["per_layer"][i] for a in attention]) for i in range(layers)],
                "attention_on_dn_uniform": _mean([a["uniform"] for a in attention]),
                "reproduced": all(d > 0 for d in mask_drop),
                "rule": "without the mask (no DN queries at inference) final AP below DN's for every seed",
            },
            "d_cdn": {
                "AP_gain": final["cdn"] - final["dn"],
                "AP_gain_per_seed": [a - b for a, b in zip(final_per_seed["cdn"], final_per_seed["dn"], strict=True)],
                "duplicate_share": duplicate_share,
                "duplicates_score_threshold": probes["duplicates"]["dn"][0]["score"],
                "duplicates_iou_threshold": probes["duplicates"]["dn"][0]["iou"],
                "AP_reproduced": final["cdn"] >= final["dn"],
                "duplicates_reproduced": duplicate_share["cdn"] < duplicate_share["dn"],
                "rule": "CDN's seed-mean final AP at least DN's; its duplicate share below DN's",
            },
        },
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


def _run_pool(cmds: list[list[str]], jobs: int) -> bool:
    """Runs the commands, at most ``jobs`` at a time; False as soon as one fails."""
    pending, running = list(cmds), []
    while pending or running:
        while pending and len(running) < jobs:
            print(" ".join(pending[0][1:]), flush=True)
            running.append(subprocess.Popen(pending.pop(0)))
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode:
                for other in running:
                    other.kill()
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/dn_ablation", help="directory of the runs (OUT/seed<S>/<arm>)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time (default: one per core)")
    p.add_argument("--stage", type=int, default=4, help="epochs every run advances before the next stage")
    p.add_argument("--epochs", type=int, default=SCHEDULE.epochs)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (init, noise, order)")
    args = p.parse_args(argv)
    out = Path(args.out)
    cfg = dataclasses.replace(SCHEDULE, epochs=args.epochs, threads=args.threads)
    # generate the dataset once, before the runs race for it
    from models.data import DigitsConfig, ensure_digits_dataset

    ensure_digits_dataset(cfg.data, cfg.num_train, cfg.num_val, cfg=DigitsConfig.for_image(cfg.image_size))
    start = time.time()
    for until in [*range(args.stage, cfg.epochs, args.stage), cfg.epochs]:
        cmds = []
        for seed in args.seeds:
            for name, extra in RUNS.items():
                # --resume: finished epochs are not redone; the learning rate depends on lr_drop, not on epochs
                run = dataclasses.replace(cfg, seed=seed, epochs=until)
                cmd = [sys.executable, "-m", "models.train", *_flags(run), f"--out={out / f'seed{seed}' / name}"]
                cmds.append([*cmd, *extra, "--resume"])
        if not _run_pool(cmds, args.jobs):
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
        # every run's training epochs' wall time (evaluation excluded), summed over runs and invocations
        "train_s_sum": round(sum(e["train_s"] for arms in logs.values() for log in arms.values() for e in log)),
    }
    result["probes"] = probe(out, args.seeds)
    result["summary"] = summarise(result["runs"], result["probes"], args.seeds)
    (HERE / "dn_ablation.json").write_text(json.dumps(result, indent=1))
    plot(result, HERE / "dn_ablation.png")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
