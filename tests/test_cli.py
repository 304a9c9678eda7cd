"""The command line as a user runs it: predict on files/folders/globs, bad images, evaluate."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.cli import main
from maskrcnn.config import ModelConfig, apply_overrides
from maskrcnn.data.synthetic import generate_shapes
from maskrcnn.model.build import build_model
from maskrcnn.weights.checkpoint import save_checkpoint

from .helpers import KUDZU, TINY, need, tiny_eval_set


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
    code = main(
        [
            "predict",
            "--weights",
            str(tiny_ckpt),
            str(images),
            str(images / "sub" / "*.png"),
            "--out",
            str(out),
            "--quiet",
            "--batch-size",
            "2",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # one unreadable image: reported, the others still processed
    assert "broken.png" in captured.err or "broken.png" in captured.out
    assert sorted(p.name for p in (out / "overlays").glob("*.png")) == ["a.png", "a_2.png", "b.png"]
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
    assert "no images or videos found" in capsys.readouterr().err


def test_missing_weights_give_an_error_not_a_traceback(tmp_path, images, capsys):
    assert (
        main(["predict", "--weights", str(tmp_path / "none.pth"), str(images / "a.png"), "--out", str(tmp_path)]) == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "maskrcnn", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("predict", "evaluate", "train", "demo", "download"):
        assert cmd in out.stdout


def test_predict_with_the_torchvision_checkpoint_on_kudzu_photos(tv_checkpoint, tmp_path):
    """The README's example: torchvision-format R50-FPN weights on real photos."""
    images = need(KUDZU / "images")
    out = tmp_path / "kudzu"
    code = main(
        [
            "predict",
            "--weights",
            str(tv_checkpoint),
            str(images / "val_27.jpg"),
            str(images / "val_29.jpg"),
            "--out",
            str(out),
            "--quiet",
            "--coco",
            str(KUDZU / "annotations" / "instances_val.json"),
        ]
    )
    assert code == 0
    assert (out / "overlays" / "val_27.png").stat().st_size > 0 and (out / "overlays" / "val_29.png").stat().st_size > 0
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
    code = main(
        [
            "evaluate",
            "--weights",
            str(tmp_path / "m.pth"),
            "--data",
            str(split.ann_file),
            "--images",
            str(split.image_dir),
            "--out",
            str(out),
            "--quiet",
        ]
    )
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
    assert (
        main(
            [
                "convert",
                "via",
                str(via),
                "--images",
                str(KUDZU / "images"),
                "--prefix",
                "val_",
                "--category",
                "kudzu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ours, shipped = json.loads(out.read_text()), json.loads((KUDZU / "annotations" / "instances_val.json").read_text())
    assert len(ours["images"]) == len(shipped["images"]) and len(ours["annotations"]) == len(shipped["annotations"])
    assert sorted(a["area"] for a in ours["annotations"]) == pytest.approx(
        sorted(a["area"] for a in shipped["annotations"])
    )


# ---- bad input: nothing of the user's lost, no wrong number reported as success ---------------


def _predict(ckpt, *args) -> int:
    return main(["predict", "--weights", str(ckpt), "--quiet", *map(str, args)])


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_predicting_into_the_input_folder_leaves_the_inputs_alone(tiny_ckpt, tmp_path):
    """--out = the input folder replaced a 16-bit microscopy PNG by its RGB overlay, exit 0."""
    folder = tmp_path / "scans"
    folder.mkdir()
    frame = (np.arange(48 * 64) * 20).reshape(48, 64).astype(np.uint16)
    Image.fromarray(frame).save(folder / "cell.png")
    before = (folder / "cell.png").read_bytes()
    assert _predict(tiny_ckpt, folder, "--out", folder) == 0
    assert (folder / "cell.png").read_bytes() == before
    with Image.open(folder / "overlays" / "cell.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size == (64, 48)


def test_a_write_that_would_hit_an_input_is_refused_before_any_work(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "overlays").mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "overlays" / "a.png")
    before = (tmp_path / "overlays" / "a.png").read_bytes()
    assert _predict(tiny_ckpt, tmp_path / "overlays", "--out", tmp_path) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "would overwrite the input" in line and "a.png" in line
    assert (tmp_path / "overlays" / "a.png").read_bytes() == before
    assert not (tmp_path / "predictions.jsonl").exists()


def test_results_are_written_as_they_come_and_kept_on_ctrl_c(tiny_ckpt, images, tmp_path, monkeypatch, capsys):
    import maskrcnn.inference.predictor as predictor

    calls = []
    as_rgb = predictor.as_rgb

    def interrupted_on_the_third(item, *args):
        calls.append(item)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return as_rgb(item, *args)

    monkeypatch.setattr(predictor, "as_rgb", interrupted_on_the_third)
    out = tmp_path / "out"
    args = ("--out", out, "--labels", "--export", "cvat", "--export", "yolo")
    assert _predict(tiny_ckpt, images / "a.png", images / "b.jpg", images / "sub" / "a.png", *args) == 130
    assert "interrupted" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["file_name"]).name for r in records] == ["a.png", "b.jpg"]
    # the files written once at the end are written for the images done (measurements.csv was lost)
    table = (out / "measurements.csv").read_text().splitlines()
    assert len(table) == 1 + sum(r["detections"] for r in records) and table[0].startswith("image_id,")
    assert (out / "cvat" / "annotations.xml").read_text().count("<image ") == 2
    assert (out / "yolo" / "data.yaml").exists()
    entries = json.loads((out / "predictions.json").read_text())
    assert (
        entries == [e for r in records for e in r["results"]]
        and len(entries) == sum(r["detections"] for r in records) > 0
    )
    index = json.loads((out / "images.json").read_text())
    assert [im["id"] for im in index] == [r["id"] for r in records] and "results" not in index[0]


def test_an_image_the_model_fails_on_is_named_and_skipped(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from maskrcnn.model.transform import Preprocessor

    forward = Preprocessor.forward

    def fragile(self, images, targets=None):
        if any(im.shape[-1] == 13 for im in images):
            raise RuntimeError("Input and output sizes should be greater than 0")
        return forward(self, images, targets)

    monkeypatch.setattr(Preprocessor, "forward", fragile)
    rng = np.random.default_rng(5)
    for name, width in (("a.png", 50), ("narrow.png", 13), ("c.png", 60)):
        Image.fromarray(rng.integers(0, 255, (40, width, 3), dtype=np.uint8)).save(tmp_path / name)
    out = tmp_path / "out"
    assert (
        _predict(
            tiny_ckpt,
            tmp_path / "a.png",
            tmp_path / "narrow.png",
            tmp_path / "c.png",
            "--out",
            out,
            "--batch-size",
            "2",
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "narrow.png" in err and "RuntimeError: Input and output sizes" in err
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png", "c.png"]
    assert len(json.loads((out / "images.json").read_text())) == 2


def test_a_missing_input_next_to_a_good_one_exits_1(tiny_ckpt, images, tmp_path, capsys):
    assert _predict(tiny_ckpt, images / "a.png", tmp_path / "typo.png", "--out", tmp_path / "out") == 1
    assert "typo.png" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "out" / "images.json").read_text())) == 1


def test_a_fifo_in_the_input_folder_is_reported_not_read(tiny_ckpt, images, tmp_path, capsys):
    import os
    import signal

    os.mkfifo(images / "pipe.png")

    class Hung(BaseException):  # not an OSError: no handler of the code under test may swallow it
        pass

    def hung(*_):
        raise Hung("predict blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        assert _predict(tiny_ckpt, images, "--out", tmp_path / "out") == 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "pipe.png" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "out" / "images.json").read_text())) == 2  # a.png, b.jpg


@pytest.mark.parametrize("value", ["2", "nan", "-0.5"])
def test_a_score_threshold_outside_0_1_is_a_one_line_error(tiny_ckpt, images, tmp_path, capsys, value):
    assert _predict(tiny_ckpt, images / "a.png", "--out", tmp_path / "out", "--score-thresh", value) == 2
    assert "score threshold must be a number in [0, 1]" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_images_over_max_pixels_are_named_and_skipped(tiny_ckpt, images, tmp_path, capsys):
    # a.png is 80x60 = 4800 pixels, b.jpg 70x50 = 3500
    assert (
        _predict(tiny_ckpt, images / "a.png", images / "b.jpg", "--out", tmp_path / "out", "--max-pixels", "4000") == 1
    )
    assert "a.png is 80x60 = 4,800 pixels, more than the limit of 4,000" in capsys.readouterr().err
    assert [Path(im["file_name"]).name for im in json.loads((tmp_path / "out" / "images.json").read_text())] == [
        "b.jpg"
    ]


def test_a_device_this_machine_lacks_is_a_one_line_error(tiny_ckpt, images, tmp_path, capsys):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert _predict(tiny_ckpt, images / "a.png", "--out", tmp_path / "out", "--device", device) == 2
    assert f"device {device} asked for" in _one_line_error(capsys.readouterr().err)


def test_download_without_a_network_is_a_one_line_error(tmp_path, capsys):
    # .invalid never resolves (RFC 2606): the same failure as a machine with no network
    assert main(["download", "http://weights.invalid/w-0123abcd.pth", "--dir", str(tmp_path), "--quiet"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "could not download http://weights.invalid/w-0123abcd.pth" in line
    assert list(tmp_path.iterdir()) == []


def test_coco_ids_follow_the_folders_not_just_the_base_name(tiny_ckpt, tmp_path, capsys):
    """Two GT images named x.png in different folders got the same id (mapped by base name)."""
    root = tmp_path / "images"
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
        Image.fromarray(np.full((30, 40, 3), 90 if sub == "a" else 160, np.uint8)).save(root / sub / "x.png")
    gt = {
        "images": [
            {"id": 7, "file_name": "a/x.png", "height": 30, "width": 40},
            {"id": 9, "file_name": "b/x.png", "height": 30, "width": 40},
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"
    assert (
        _predict(tiny_ckpt, root / "b" / "x.png", root / "a" / "x.png", "--out", out, "--coco", tmp_path / "gt.json")
        == 0
    )
    ids = {Path(im["file_name"]).parent.name: im["id"] for im in json.loads((out / "images.json").read_text())}
    assert ids == {"a": 7, "b": 9}
    # A copy in a folder the GT file does not name matches both by base name: refused.
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "x.png").write_bytes((root / "a" / "x.png").read_bytes())
    assert _predict(tiny_ckpt, tmp_path / "copy" / "x.png", "--out", out, "--coco", tmp_path / "gt.json") == 2
    assert "matches 2 images" in _one_line_error(capsys.readouterr().err)


def test_predict_precision_option(tiny_ckpt, images, tmp_path, capsys):
    assert _predict(tiny_ckpt, images / "a.png", "--out", tmp_path / "bf16", "--precision", "bf16") == 0
    assert json.loads((tmp_path / "bf16" / "images.json").read_text())[0]["file_name"].endswith("a.png")
    capsys.readouterr()
    assert _predict(tiny_ckpt, images / "a.png", "--out", tmp_path / "fp16", "--precision", "fp16") == 2
    assert "fp16 needs a CUDA device" in _one_line_error(capsys.readouterr().err)


def test_predict_never_replaces_a_users_results_file_but_replaces_its_own(tiny_ckpt, images, capsys):
    """``--out`` may be the input folder, which may hold the user's own ``predictions.json``."""
    (images / "predictions.json").write_text('{"mine": true}')
    assert main(["predict", "--weights", str(tiny_ckpt), str(images / "a.png"), "--out", str(images), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "predictions.json exists and was not written by maskrcnn predict" in err
    assert (images / "predictions.json").read_text() == '{"mine": true}' and not (images / "overlays").exists()
    (images / "predictions.json").unlink()
    for _ in range(2):  # a rerun replaces what the first run wrote
        assert (
            main(["predict", "--weights", str(tiny_ckpt), str(images / "a.png"), "--out", str(images), "--quiet"]) == 0
        )
    assert len(json.loads((images / "images.json").read_text())) == 1


def test_evaluate_never_replaces_its_ground_truth_or_a_users_file(tmp_path, capsys):
    """Round 2 of issue 17: ``evaluate --out`` replaced the user's own ``results.json`` and
    ``metrics.json``, and even its ``--data`` file when that was named ``metrics.json``, exit 0."""
    split, ckpt = tiny_eval_set(tmp_path)
    gt = tmp_path / "out" / "metrics.json"
    gt.parent.mkdir()
    gt.write_bytes(split.ann_file.read_bytes())
    args = ["evaluate", "--weights", str(ckpt), "--images", str(split.image_dir), "--quiet"]
    assert main([*args, "--data", str(gt), "--out", str(gt.parent)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert gt.read_bytes() == split.ann_file.read_bytes()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"my": "notes"}')
    assert main([*args, "--data", str(split.ann_file), "--out", str(mine)]) == 2
    assert "results.json exists and was not written by maskrcnn evaluate" in capsys.readouterr().err
    assert (mine / "results.json").read_text() == '{"my": "notes"}' and not (mine / "metrics.json").exists()
    (mine / "results.json").unlink()
    for _ in range(2):  # a rerun replaces what the first one wrote
        assert main([*args, "--data", str(split.ann_file), "--out", str(mine)]) == 0
    assert json.loads((mine / "metrics.json").read_text())["bbox"]


def test_evaluate_refuses_an_unwritable_out_before_evaluating(tmp_path, capsys, monkeypatch):
    """An ``--out`` that cannot be written failed only after the whole evaluation."""
    import maskrcnn.weights.checkpoint

    split, ckpt = tiny_eval_set(tmp_path)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(maskrcnn.weights.checkpoint, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(
        [
            "evaluate",
            "--weights",
            str(ckpt),
            "--images",
            str(split.image_dir),
            "--quiet",
            "--data",
            str(split.ann_file),
            "--out",
            str(tmp_path / "afile" / "sub"),
        ]
    )
    assert code == 2 and "error:" in capsys.readouterr().err
