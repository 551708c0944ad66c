"""The configuration of a run: one dataclass, turned into command-line flags field by field.

A bool field that defaults to True becomes ``--no-<name>`` (the paper's ablations: ``--no-dn``,
``--no-dn-mask``), one that defaults to False becomes ``--<name>``; every other field ``--<name> VALUE``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Config:
    # data: the embedded digits dataset under `data` (generated on first use), or any COCO json + image folder
    data: str = "data/digits"
    train_json: str = field(default="", metadata={"help": "COCO json of the training split (overrides --data)"})
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    num_train: int | None = field(
        default=None,
        metadata={"help": "images of the generated train split (2000 for a new dataset; a different size regenerates)"},
    )
    num_val: int | None = field(default=None, metadata={"help": "likewise for the val split (400 for a new dataset)"})
    image_size: int = 128
    # model
    d_model: int = 128
    n_heads: int = 8
    enc_layers: int = 3
    dec_layers: int = 3
    ffn_dim: int = 512
    num_queries: int = 100
    n_levels: int = 4
    n_points: int = 4
    backbone_width: int = 32
    dropout: float = 0.0
    # denoising (DN-DETR's ablations)
    dn: bool = field(default=True, metadata={"help": "denoising queries (--no-dn: plain DAB-Deformable-DETR)"})
    dn_mask: bool = field(default=True, metadata={"help": "the DN attention mask (--no-dn-mask: queries see all)"})
    dn_mode: str = field(
        default="dn",
        metadata={"choices": ("dn", "cdn"), "help": "cdn: DINO's contrastive queries (its noise: 0.5 / 1.0)"},
    )
    dn_groups: int = 5
    dn_number: int = 100
    label_noise: float = 0.2
    box_noise: float = 0.4
    # implementation of the three ops for the whole model
    ops: str = field(default="dnops", metadata={"choices": ("dnops", "reference")})
    # losses (Deformable-DETR's weights)
    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    # training
    epochs: int = 12
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps in all (0: no cap)"})
    batch_size: int = 8
    lr: float = 2e-4
    lr_drop: int = field(default=0, metadata={"help": "epoch from which the learning rate is divided by 10"})
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    seed: int = 0
    workers: int = 0
    threads: int = field(default=0, metadata={"help": "torch threads per process (0: torch's default)"})
    track_is: int = field(default=0, metadata={"help": "training images on which matching instability is tracked"})
    eval_images: int = field(default=0, metadata={"help": "evaluate on the first N val images (0: all)"})
    out: str = "runs/dn"
    resume: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parser(defaults: Config | None = None) -> argparse.ArgumentParser:
    defaults = defaults or Config()
    p = argparse.ArgumentParser(description="Train DN-Deformable-DAB-DETR-lite on dnops kernels.")
    for f in dataclasses.fields(Config):
        flag = f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f.metadata.get("help")
        if f.type == "bool" or isinstance(default, bool):
            if default:
                p.add_argument(f"--no-{flag}", dest=f.name, action="store_false", help=help_text)
            else:
                p.add_argument(f"--{flag}", dest=f.name, action="store_true", help=help_text)
            continue
        # an optional field (default None) takes the type its annotation names, e.g. "int | None"
        kind = type(default) if default is not None else {"int | None": int, "float | None": float}[f.type]
        p.add_argument(
            f"--{flag}",
            dest=f.name,
            type=kind,
            default=default,
            choices=f.metadata.get("choices"),
            help=help_text,
        )
    return p


def parse(argv: list[str] | None = None) -> Config:
    return Config(**vars(parser().parse_args(argv)))
