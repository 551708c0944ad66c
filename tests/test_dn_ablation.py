"""The ablation's measurements (models/experiments): the attention and duplicate probes on a tiny checkpoint, and
the claims' verdicts and their rendering on synthetic curves."""

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import report
from models.config import parse
from models.data import DigitsConfig, ensure_digits_dataset
from models.experiments import dn_ablation, dn_probes
from models.model import DNDETR
from models.train import train
from tests.test_models import TINY, tiny_cfg


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ablation")
    ensure_digits_dataset(root / "digits", num_train=8, num_val=4, cfg=DigitsConfig(image_size=64, max_digits=3))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    common = [f"--data={root / 'digits'}", "--image-size=64", "--batch-size=4", "--epochs=1", "--no-progress", *flags]
    runs = {"no_dn_mask": ["--no-dn-mask"], "dn": []}
    for name, extra in runs.items():
        train(parse([*common, f"--out={root / name}", *extra]))
    return {name: root / name / "checkpoint.pth" for name in runs}


def test_attention_probe_equals_torch_attention_weights():
    torch.manual_seed(0)
    mha = DNDETR(tiny_cfg(), 10).decoder[0].self_attn
    x = torch.randn(2, 9, TINY["d_model"])
    _, want = mha(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(dn_probes._attention(mha, x, x), want)


def test_attention_on_dn_of_a_model_trained_without_the_mask(checkpoints):
    got = dn_probes.attention_on_dn(checkpoints["no_dn_mask"], images=4)
    assert len(got["per_layer"]) == TINY["dec_layers"]
    assert all(0.0 < m < 1.0 for m in got["per_layer"]) and 0.0 < got["uniform"] < 1.0
    with pytest.raises(ValueError, match="trained with the DN mask"):
        dn_probes.attention_on_dn(checkpoints["dn"])


def test_duplicates_counts_same_class_overlaps_above_the_thresholds(checkpoints):
    target = {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}
    det = {
        "scores": torch.tensor([0.9, 0.8, 0.2, 0.9, 0.9]),
        "labels": torch.tensor([1, 1, 1, 3, 2]),
        # GT 0: two hits, a third below the score threshold, one of another class; GT 1: one hit
        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.31, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2],
                               [0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]]),
    }  # fmt: skip
    assert dn_probes.hits_per_gt(target, det, score=0.3, iou=0.7).tolist() == [2, 1]
    assert dn_probes.hits_per_gt(target, det, score=0.3, iou=0.99).tolist() == [1, 1]
    got = dn_probes.duplicates(checkpoints["dn"])
    assert 0.0 <= got["share"] <= 1.0 and got["gt"] > 0 and (got["score"], got["iou"]) == (0.3, 0.7)


def _arm(ap: list[float], inst: float) -> dict:
    epochs = list(range(1, len(ap) + 1))
    curves = [[a + d for a in ap] for d in (-0.01, 0.0, 0.01)]
    return {"epoch": epochs, "AP": ap, "AP_per_seed": curves, "IS": [None] + [inst] * (len(ap) - 1),
            "IS_per_seed": [[None] + [inst] * (len(ap) - 1)] * 3}  # fmt: skip


def test_claims_verdicts_and_their_rendering(tmp_path):
    no_dn = [0.1 * math.log(e + 1) for e in range(1, 13)]
    no_dn[-3:] = [no_dn[-4] + 0.001] * 3  # converged
    runs = {
        "dn": _arm([min(a + 0.08, 0.9) for a in no_dn], 0.2),  # reaches no DN's final AP early
        "no_dn": _arm(no_dn, 0.3),
        "no_dn_mask": _arm([a - 0.05 for a in no_dn], 0.25),
        "cdn": _arm([a + 0.09 for a in no_dn], 0.2),
    }
    probes = {
        "attention_on_dn": [{"per_layer": [0.5, 0.4], "uniform": 0.2}] * 3,
        "duplicates": {name: [{"share": s, "gt": 100, "score": 0.3, "iou": 0.7}] * 3
                       for name, s in {"dn": 0.04, "no_dn": 0.05, "no_dn_mask": 0.05, "cdn": 0.02}.items()},
    }  # fmt: skip
    summary = dn_ablation.summarise(runs, probes, [0, 1, 2])
    claims = summary["claims"]
    assert summary["no_dn_converged"]
    assert claims["a_convergence"]["dn"]["reproduced"] and claims["a_convergence"]["dn"]["per_seed"][1] <= 6
    assert claims["b_matching_stability"]["reproduced"] and claims["c_mask"]["reproduced"]
    assert claims["d_cdn"]["AP_reproduced"] and claims["d_cdn"]["duplicates_reproduced"]
    path = tmp_path / "ablation.json"
    config = dn_ablation.SCHEDULE.to_dict()
    path.write_text(json.dumps({"config": config, "runs": runs, "summary": summary}))
    text = report.ablation_claims(path)
    assert text.count("reproduced") == 5 and "not reproduced" not in text and "50% / 40%" in text
    # the other way: no DN better than DN everywhere
    runs["dn"], runs["no_dn"] = runs["no_dn"], runs["dn"]
    flipped = dn_ablation.summarise(runs, probes, [0, 1, 2])["claims"]
    assert not flipped["a_convergence"]["dn"]["reproduced"] and not flipped["b_matching_stability"]["reproduced"]
    table = report.ablation_table(path)
    assert table.count("\n") == 7  # the schedule, a blank line, header, rule and four arms
    assert f"{config['image_size']}-pixel images" in table and f"from epoch {config['lr_drop'] + 1}" in table
