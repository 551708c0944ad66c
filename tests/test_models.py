"""The thin DN-DETR: ops switch, DN mask semantics, loss normalisation across ranks, training / eval / resume
smoke, torchrun, plot and predict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dnops.nn import MSDeformAttn
from models.config import Config, parse
from models.criterion import Criterion
from models.data import DigitsConfig, collate, ensure_digits_dataset
from models.evaluate import main as evaluate_main
from models.model import DNDETR
from models.train import CocoDetection, load, train
from tests.conftest import requires_cpp

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(d_model=32, n_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64, num_queries=12, backbone_width=8)


def tiny_cfg(**kw) -> Config:
    return Config(**(TINY | {"image_size": 64} | kw))


def batch(n: int = 2, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for i in range(n):
        k = 2 + i
        centre = torch.rand(k, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(k, 2, generator=g) * 0.2 + 0.1
        targets.append({"labels": torch.randint(0, 10, (k,), generator=g), "boxes": torch.cat([centre, wh], 1)})
    return torch.rand(n, 3, size, size, generator=g), targets


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    ensure_digits_dataset(root, num_train=16, num_val=6, cfg=DigitsConfig(image_size=64, max_digits=3, seed=1))
    return root


def test_flags_map_to_the_config():
    cfg = parse(["--no-dn", "--no-dn-mask", "--dn-groups", "3", "--label-noise", "0.5", "--ops", "reference"])
    assert (cfg.dn, cfg.dn_mask, cfg.dn_groups, cfg.label_noise, cfg.ops) == (False, False, 3, 0.5, "reference")
    assert parse([]).dn and parse(["--resume"]).resume
    with pytest.raises(SystemExit):
        parse(["--ops", "fast"])


def _loss_and_grads(cfg: Config, state=None):
    torch.manual_seed(0)
    model = DNDETR(cfg, 10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MSDeformAttn):
                # off the pixel grid: at the initial whole-pixel offsets bilinear sampling has a kink, where
                # the gradient of a location is one-sided and grid_sample and the kernel may pick either side
                m.sampling_offsets.bias.add_(torch.randn_like(m.sampling_offsets.bias) * 0.1)
    if state is not None:
        model.load_state_dict(state)
    images, targets = batch()
    torch.manual_seed(7)  # the DN noise seed is drawn from torch's generator
    out = model(images, targets)
    loss, _ = Criterion(cfg, 10)(out, targets)
    loss.backward()
    return model, out, loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@requires_cpp("ms_deform_attn")
@pytest.mark.parametrize("mode", ["dn", "cdn"])
def test_ops_switch_gives_the_same_model(mode):
    """--ops reference and --ops dnops: same parameters (state_dict keys), same outputs, losses and gradients."""
    ours, out_a, loss_a, grads_a = _loss_and_grads(tiny_cfg(ops="dnops", dn_mode=mode))
    _, out_b, loss_b, grads_b = _loss_and_grads(tiny_cfg(ops="reference", dn_mode=mode), ours.state_dict())
    assert out_a["dn"].pad_size > 0
    torch.testing.assert_close(out_a["dn_boxes"], out_b["dn_boxes"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_a["logits"], out_b["logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-4, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and "label_enc.weight" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("ops", ["dnops", "reference"])
def test_dn_mask_keeps_the_matching_queries_blind(ops):
    """With the mask, the matching part equals a run without DN queries; --no-dn-mask lets the GT leak in."""
    images, targets = batch()
    torch.manual_seed(0)
    model = DNDETR(tiny_cfg(ops=ops), 10).train()
    plain = model.cfg
    masked = model(images, targets)["logits"]
    model.cfg = tiny_cfg(ops=ops, dn=False)
    no_dn = model(images, targets)["logits"]
    model.cfg = tiny_cfg(ops=ops, dn_mask=False)
    leaked = model(images, targets)["logits"]
    model.cfg = plain
    torch.testing.assert_close(masked, no_dn, atol=1e-5, rtol=1e-5)
    assert (leaked - no_dn).abs().max() > 1e-3


def _rank_grads(rank: int, world: int, port: int, images, targets, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = tiny_cfg(dn=False)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(DNDETR(cfg, 10), find_unused_parameters=True)
        shard = slice(rank, rank + 1)
        loss, _ = Criterion(cfg, 10)(model(images[shard], targets[shard]), targets[shard])
        loss.backward()
        if rank == 0:
            out.update({n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None})
    finally:
        torch.distributed.destroy_process_group()


def test_loss_normalisation_across_ranks():
    """Two processes with one image each give the gradients of one process with both images, although the
    images hold different numbers of GT (2 and 3): the losses are normalised by the global GT count."""
    images, targets = batch()
    cfg = tiny_cfg(dn=False)
    torch.manual_seed(0)
    model = DNDETR(cfg, 10)
    Criterion(cfg, 10)(model(images, targets), targets)[0].backward()
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_rank_grads, args=(2, 29517, images, targets, shared), nprocs=2)
        grads = dict(shared)
    assert grads
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def _args(digits: Path, out: Path, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    return [
        f"--data={digits}",
        "--image-size=64",
        "--batch-size=4",
        f"--out={out}",
        "--no-progress",
        "--lr=1e-3",
        *flags,
        *extra,
    ]


def test_training_smoke_eval_and_resume(digits, tmp_path):
    """A few epochs on a tiny split: the loss decreases, every epoch logs a COCO AP dict, and an interrupted run
    resumed from its checkpoint ends bit for bit where the uninterrupted one does."""
    full = tmp_path / "full"
    train(parse(_args(digits, full, "--epochs=3", "--track-is=4")))
    log = json.loads((full / "log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2, 3] and log[-1]["steps"] == 12
    assert log[-1]["loss"] < log[0]["loss"]
    for entry in log:
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= entry.keys()
        assert 0.0 <= entry["AP"] <= 1.0 and 0.0 <= entry["AP50"] <= 1.0
    assert log[0]["IS"] is None and 0.0 <= log[1]["IS"] <= 1.0
    assert not list(full.glob(".*tmp*"))  # the atomic writes leave no temporary files

    cut = tmp_path / "cut"
    train(parse(_args(digits, cut, "--epochs=3", "--track-is=4", "--max-steps=4")))
    assert len(json.loads((cut / "log.json").read_text())) == 1
    train(parse(_args(digits, cut, "--epochs=3", "--track-is=4", "--resume")))
    resumed = json.loads((cut / "log.json").read_text())
    untimed = [[{k: v for k, v in e.items() if k != "train_s"} for e in run] for run in (log, resumed)]
    assert untimed[0] == untimed[1]
    a = torch.load(full / "checkpoint.pth", weights_only=False)
    b = torch.load(cut / "checkpoint.pth", weights_only=False)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_evaluate_command_gives_the_logged_ap(digits, tmp_path, capsys):
    run = tmp_path / "run"
    log = train(parse(_args(digits, run, "--epochs=1", "--max-steps=2")))
    assert evaluate_main([str(run / "checkpoint.pth")]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got == {k: log[-1][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    checkpoint, ann = str(run / "checkpoint.pth"), str(digits / "annotations" / "val.json")
    assert evaluate_main([checkpoint, "--val-json", ann, "--val-images", str(digits / "val")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == got
    assert evaluate_main([checkpoint, "--val-json", ann]) == 2


def test_torchrun_two_processes(digits, tmp_path):
    """torchrun --nproc_per_node=2 on CPU (gloo): the DistributedSampler halves the steps per epoch."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"]
    cmd += ["-m", "models.train", *_args(digits, out, "--epochs=1", "--threads=1")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((out / "log.json").read_text())
    assert len(log) == 1 and log[0]["steps"] == 2  # 16 images / 2 ranks / batch 4
    assert 0.0 <= log[0]["AP"] <= 1.0


def test_plot_and_predict(digits, tmp_path):
    run = tmp_path / "run"
    train(parse(_args(digits, run, "--epochs=1", "--max-steps=1")))
    subprocess.run(
        [sys.executable, "-m", "models.plot", str(run), "--out", str(tmp_path / "ap.png")], cwd=ROOT, check=True
    )
    assert (tmp_path / "ap.png").read_bytes()[:4] == b"\x89PNG"
    model, names = load(run / "checkpoint.pth")
    assert names == [str(d) for d in range(10)] and not model.training
    image = digits / "val" / "000001.png"
    proc = subprocess.run(
        [sys.executable, "-m", "models.predict", str(image), "--checkpoint", str(run / "checkpoint.pth"),
         "--out", str(tmp_path / "pred.png"), "--threshold", "0"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "wrote" in proc.stdout and len(proc.stdout.splitlines()) > 1  # threshold 0: every top-k box drawn
    assert (tmp_path / "pred.png").read_bytes()[:4] == b"\x89PNG"


def test_any_coco_json_is_resized_to_the_model_size(digits):
    data = CocoDetection(digits / "train", digits / "annotations" / "train.json", size=48)
    images, targets = collate([data[0], data[1]])
    assert images.shape == (2, 3, 48, 48) and targets[0]["orig_size"] == (64, 64)


def test_thin_dn_detr_training_step_under_autocast():
    from models.config import Config
    from models.criterion import Criterion
    from models.model import DNDETR

    cfg = Config(d_model=32, n_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64, num_queries=20, image_size=64)
    cfg.backbone_width, cfg.dn_groups = 8, 3
    torch.manual_seed(0)
    model = DNDETR(cfg, 10).train()
    criterion = Criterion(cfg, 10)
    images = torch.rand(2, 3, 64, 64)
    targets = [{"labels": torch.randint(0, 10, (c,)), "boxes": torch.rand(c, 4) * 0.4 + 0.3} for c in (3, 5)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = criterion(model(images, targets), targets)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
