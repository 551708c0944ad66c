"""The training command refuses, before training, a dataset it cannot train on, and names what is wrong where."""

import json
import math
from pathlib import Path

import pytest

from models.config import parse
from models.data import CocoDetection, DataError, DigitsConfig, ensure_digits_dataset
from models.train import main, train
from tests.test_models import TINY

CFG = DigitsConfig(image_size=64, max_digits=2, seed=3)


def _tiny(data: Path, out: Path, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    return [f"--data={data}", "--image-size=64", "--batch-size=2", f"--out={out}", "--no-progress", *flags, *extra]


def test_generated_dataset_follows_the_sizes_asked_for(tmp_path):
    paths = ensure_digits_dataset(tmp_path, num_train=3, num_val=2, cfg=CFG)
    assert len(json.loads(paths["train"].read_text())["images"]) == 3
    ensure_digits_dataset(tmp_path)  # no sizes given: whatever is there
    assert len(json.loads(paths["train"].read_text())["images"]) == 3
    paths = ensure_digits_dataset(tmp_path, num_train=5, cfg=CFG)
    coco = json.loads(paths["train"].read_text())
    assert len(coco["images"]) == 5 and len(list((tmp_path / "train").glob("*.png"))) == 5
    paths = ensure_digits_dataset(tmp_path, num_train=2, cfg=CFG)
    assert len(list((tmp_path / "train").glob("*.png"))) == 2  # a smaller generation leaves no stale images
    assert len(json.loads(paths["val"].read_text())["images"]) == 2  # a size not given: what was there


def test_training_with_num_train_on_an_existing_dataset_regenerates(tmp_path):
    ensure_digits_dataset(tmp_path / "d", num_train=2, num_val=2, cfg=CFG)
    train(parse(_tiny(tmp_path / "d", tmp_path / "o", "--epochs=1", "--num-train=4", "--num-val=2")))
    log = json.loads((tmp_path / "o" / "log.json").read_text())
    assert log[0]["steps"] == 2  # 4 images, batch 2


def test_empty_training_set_is_refused(tmp_path):
    ensure_digits_dataset(tmp_path / "d", num_train=0, num_val=2, cfg=CFG)
    with pytest.raises(DataError, match="has no images"):
        train(parse(_tiny(tmp_path / "d", tmp_path / "o", "--epochs=1")))
    assert main(_tiny(tmp_path / "d", tmp_path / "o", "--epochs=1")) == 2


def _coco(tmp_path: Path, edit) -> Path:
    paths = ensure_digits_dataset(tmp_path / "d", num_train=2, num_val=1, cfg=CFG)
    coco = json.loads(paths["train"].read_text())
    edit(coco)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    return bad


def _bbox(value):
    def edit(coco):
        coco["annotations"][0]["bbox"] = value

    return edit


MALFORMED = [
    (lambda c: c.pop("categories"), "needs a 'categories' list"),
    (lambda c: c.update(categories=[]), "'categories' is empty"),
    (lambda c: c["annotations"][0].update(category_id=99), "category_id 99 is not in 'categories'"),
    (lambda c: c["annotations"][0].update(image_id=12345), "image_id 12345 is not in 'images'"),
    (_bbox([1, 2, 3]), "bbox must be 4 finite numbers"),
    (_bbox([1, 2, math.nan, 4]), "bbox must be 4 finite numbers"),
    (_bbox([1, 2, "3", 4]), "bbox must be 4 finite numbers"),
    (lambda c: c["images"][0].pop("file_name"), "'file_name'"),
]


@pytest.mark.parametrize("edit,match", MALFORMED)
def test_malformed_coco_names_the_file_and_the_entry(tmp_path, edit, match):
    bad = _coco(tmp_path, edit)
    with pytest.raises(DataError, match=match) as info:
        CocoDetection(tmp_path / "d" / "train", bad)
    assert str(bad) in str(info.value)
    paths = ensure_digits_dataset(tmp_path / "d")
    args = [f"--train-json={bad}", f"--train-images={tmp_path / 'd' / 'train'}", f"--val-json={paths['val']}"]
    args.append(f"--val-images={tmp_path / 'd' / 'val'}")
    with pytest.raises(DataError, match=match):
        train(parse(_tiny(tmp_path / "d", tmp_path / "o", "--epochs=1", *args)))
    assert not (tmp_path / "o" / "checkpoint.pth").exists()


def test_unreadable_json_is_named(tmp_path):
    with pytest.raises(DataError, match="cannot read it"):
        CocoDetection(tmp_path, tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        CocoDetection(tmp_path, tmp_path / "x.json")


def test_train_json_without_val_json_names_the_missing_flags(tmp_path):
    paths = ensure_digits_dataset(tmp_path / "d", num_train=2, num_val=1, cfg=CFG)
    with pytest.raises(DataError, match="--val-json, --val-images missing"):
        train(parse(_tiny(tmp_path / "d", tmp_path / "o", f"--train-json={paths['train']}", "--train-images=x")))


def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path):
    ensure_digits_dataset(tmp_path / "d", num_train=2, num_val=1, cfg=CFG)
    out = tmp_path / "o"
    out.mkdir()
    (out / ".checkpoint.pth.tmp4242").write_bytes(b"half a checkpoint")
    (out / ".log.json.tmp4242").write_text("[")
    train(parse(_tiny(tmp_path / "d", out, "--epochs=1")))
    assert not list(out.glob(".*.tmp*")) and (out / "checkpoint.pth").exists()


def test_digits_scale_with_the_canvas(tmp_path):
    assert DigitsConfig.for_image(128) == DigitsConfig()
    small = DigitsConfig.for_image(64)
    assert (small.image_size, small.min_scale, small.max_scale) == (64, 7, 24)
    paths = ensure_digits_dataset(tmp_path / "d", num_train=6, num_val=1, cfg=small)
    boxes = [a["bbox"] for a in json.loads(paths["train"].read_text())["annotations"]]
    assert boxes and all(max(w, h) <= small.max_scale and x + w <= 64 and y + h <= 64 for x, y, w, h in boxes)
