"""``python -m models.export``: the thin DN-DETR as ONNX with dynamic batch and image size, checked against
PyTorch in onnxruntime on images of the embedded dataset."""

import pytest

from models.config import parse
from models.data import DigitsConfig, ensure_digits_dataset
from models.train import train
from tests.test_models import TINY

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


def test_export_command_writes_a_model_onnxruntime_runs_like_pytorch(tmp_path, capsys):
    from models import export

    data = tmp_path / "digits"
    ensure_digits_dataset(data, num_train=4, num_val=3, cfg=DigitsConfig(image_size=64, max_digits=2, seed=2))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    out = tmp_path / "run"
    train(
        parse(
            [f"--data={data}", "--image-size=64", "--batch-size=2", f"--out={out}", "--no-progress", "--epochs=1"]
            + flags
        )
    )
    onnx_path = tmp_path / "model.onnx"
    assert export.main([str(out / "checkpoint.pth"), "--out", str(onnx_path), "--images", "3"]) == 0
    assert "max abs difference" in capsys.readouterr().out
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert len(shapes["images"]) == 4 and all(isinstance(d, str) for i, d in enumerate(shapes["images"]) if i != 1)
