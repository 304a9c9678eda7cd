"""The command line as a user runs it: predict on files/folders/globs, bad images, evaluate."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.checkpoint import save_checkpoint
from maskrcnn.cli import main
from maskrcnn.config import ModelConfig, apply_overrides
from maskrcnn.data.synthetic import generate_shapes
from maskrcnn.model.build import build_model

from .conftest import KUDZU, need
from .test_api import TINY, tiny_model


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, tiny_model())
    return path


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), "L").save(d / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(d / "sub" / "a.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


def test_predict_writes_overlays_and_results_and_survives_a_bad_image(tiny_ckpt, images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["predict", "--weights", str(tiny_ckpt), str(images), str(images / "sub" / "*.png"), "--out", str(out), "--quiet", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 1  # one unreadable image: reported, the others still processed
    assert "broken.png" in captured.err or "broken.png" in captured.out
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "a_2.png", "b.png"]
    entries = json.loads((out / "predictions.json").read_text())
    index = json.loads((out / "images.json").read_text())
    assert len(index) == 3 and {e["image_id"] for e in entries} <= {im["id"] for im in index}
    for e in entries[:20]:
        assert len(e["bbox"]) == 4 and 0 <= e["score"] <= 1
        h, w = mask_util.decode(e["segmentation"]).shape
        im = next(i for i in index if i["id"] == e["image_id"])
        assert (h, w) == (im["height"], im["width"])


def test_predict_with_no_images_fails_clearly(tiny_ckpt, tmp_path, capsys):
    assert main(["predict", "--weights", str(tiny_ckpt), str(tmp_path / "nothing*.png"), "--out", str(tmp_path)]) == 2
    assert "no images found" in capsys.readouterr().err


def test_missing_weights_give_an_error_not_a_traceback(tmp_path, images, capsys):
    assert main(["predict", "--weights", str(tmp_path / "none.pth"), str(images / "a.png"), "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "maskrcnn", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("predict", "evaluate", "train", "demo", "download"):
        assert cmd in out.stdout


def test_predict_with_the_torchvision_checkpoint_on_kudzu_photos(tv_checkpoint, tmp_path):
    """The README's example: torchvision-format R50-FPN weights on real photos."""
    images = need(KUDZU / "images")
    out = tmp_path / "kudzu"
    code = main(["predict", "--weights", str(tv_checkpoint), str(images / "val_27.jpg"), str(images / "val_29.jpg"), "--out", str(out), "--quiet", "--coco", str(KUDZU / "annotations" / "instances_val.json")])
    assert code == 0
    assert (out / "val_27.png").stat().st_size > 0 and (out / "val_29.png").stat().st_size > 0
    entries = json.loads((out / "predictions.json").read_text())
    gt = json.loads((KUDZU / "annotations" / "instances_val.json").read_text())
    ids = {im["id"] for im in gt["images"] if im["file_name"].endswith(("val_27.jpg", "val_29.jpg"))}
    assert entries and {e["image_id"] for e in entries} == ids
    assert {e["category_id"] for e in entries} <= set(range(1, 91))


def test_evaluate_matches_pycocotools_on_the_written_results(tmp_path, capsys):
    """`maskrcnn evaluate` on a generated dataset: its numbers are COCOeval's on results.json."""
    split = generate_shapes(tmp_path / "shapes", num_train=1, num_val=3, image_size=(64, 96), seed=3)["val"]
    ids = [c["id"] for c in json.loads(split.ann_file.read_text())["categories"]]
    torch.manual_seed(0)
    cfg = apply_overrides(ModelConfig(), TINY + [f"category_ids={ids}"])
    save_checkpoint(tmp_path / "m.pth", build_model(cfg))
    out = tmp_path / "eval"
    code = main(["evaluate", "--weights", str(tmp_path / "m.pth"), "--data", str(split.ann_file), "--images", str(split.image_dir), "--out", str(out), "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    gt = COCO(str(split.ann_file))
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(str(out / "results.json"))
        for iou_type in ("bbox", "segm"):
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
            assert metrics[iou_type]["AP"] == pytest.approx(ev.stats[0], abs=1e-12)
            assert metrics[iou_type]["AP50"] == pytest.approx(ev.stats[1], abs=1e-12)
    assert "AP" in capsys.readouterr().out


def test_convert_via_reproduces_the_shipped_kudzu_annotations(tmp_path):
    via = need(KUDZU / "via" / "val" / "via_region_data.json")
    out = tmp_path / "val.json"
    assert main(["convert", "via", str(via), "--images", str(KUDZU / "images"), "--prefix", "val_", "--category", "kudzu", "--out", str(out)]) == 0
    ours, shipped = json.loads(out.read_text()), json.loads((KUDZU / "annotations" / "instances_val.json").read_text())
    assert len(ours["images"]) == len(shipped["images"]) and len(ours["annotations"]) == len(shipped["annotations"])
    assert sorted(a["area"] for a in ours["annotations"]) == pytest.approx(sorted(a["area"] for a in shipped["annotations"]))
