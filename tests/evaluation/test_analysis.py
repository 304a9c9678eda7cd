"""Precision / recall / F1, the confusion matrix and the worst images: a hand-computed case,
and ``maskrcnn evaluate`` whose matrix agrees with the files it wrote."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from maskrcnn.cli import main
from maskrcnn.evaluation.analysis import analyse, write_report

S = 40


def rle(y0: int, y1: int, x0: int, x1: int) -> dict:
    m = np.zeros((S, S), np.uint8)
    m[y0:y1, x0:x1] = 1
    r = mask_util.encode(np.asfortranarray(m))
    return {"size": [S, S], "counts": r["counts"].decode("ascii")}


def box(y0: int, y1: int, x0: int, x1: int) -> list[float]:
    return [x0, y0, x1 - x0, y1 - y0]


def gt_coco() -> COCO:
    anns = [  # image 1: a at rows/cols 0..9, b at 20..29; image 2: a at 5..14, a crowd region of b at 25..39
        (1, 1, (0, 10, 0, 10), 0),
        (2, 1, (20, 30, 20, 30), 0),
        (3, 2, (5, 15, 5, 15), 0),
        (4, 2, (25, 40, 25, 40), 1),
    ]
    cat = {1: 1, 2: 2, 3: 1, 4: 2}
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": S, "height": S} for i in (1, 2)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {
                "id": k,
                "image_id": img,
                "category_id": cat[k],
                "iscrowd": crowd,
                "segmentation": rle(*r),
                "bbox": box(*r),
                "area": float((r[1] - r[0]) * (r[3] - r[2])),
            }
            for k, img, r, crowd in anns
        ],
    }
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


DETS = [
    {
        "image_id": 1,
        "category_id": 1,
        "score": 0.9,
        "segmentation": rle(0, 10, 0, 10),
        "bbox": box(0, 10, 0, 10),
    },  # TP a
    {
        "image_id": 1,
        "category_id": 1,
        "score": 0.8,
        "segmentation": rle(20, 30, 20, 30),
        "bbox": box(20, 30, 20, 30),
    },  # a on b
    {
        "image_id": 1,
        "category_id": 2,
        "score": 0.7,
        "segmentation": rle(30, 40, 0, 10),
        "bbox": box(30, 40, 0, 10),
    },  # nothing
    {
        "image_id": 1,
        "category_id": 1,
        "score": 0.3,
        "segmentation": rle(0, 5, 30, 35),
        "bbox": box(0, 5, 30, 35),
    },  # below 0.5
    {
        "image_id": 2,
        "category_id": 1,
        "score": 0.6,
        "segmentation": rle(5, 15, 5, 14),
        "bbox": box(5, 15, 5, 14),
    },  # IoU 0.9
    {
        "image_id": 2,
        "category_id": 2,
        "score": 0.9,
        "segmentation": rle(26, 36, 26, 36),
        "bbox": box(26, 36, 26, 36),
    },  # crowd
]


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_hand_computed_counts_and_matrix(iou_type: str) -> None:
    a = analyse(gt_coco(), DETS, score_thresh=0.5, iou_thresh=0.5, iou_type=iou_type)
    assert a.class_names == ["a", "b"]
    assert a.tp.tolist() == [2, 0] and a.fp.tolist() == [1, 1] and a.fn.tolist() == [0, 1]
    np.testing.assert_allclose(a.precision, [2 / 3, 0.0])
    np.testing.assert_allclose(a.recall, [1.0, 0.0])
    np.testing.assert_allclose(a.f1, [0.8, 0.0])
    # rows ground truth a, b, background; columns prediction a, b, background
    assert a.confusion.tolist() == [[2, 0, 0], [1, 0, 0], [0, 1, 0]]
    assert a.per_image == {1: (1, 2), 2: (0, 0)} and a.worst(5) == [1]
    d = a.to_dict()
    assert d["per_class"]["b"] == {"tp": 0, "fp": 1, "fn": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert d["confusion_matrix"]["labels"] == ["a", "b", "background"]


def test_a_strict_iou_turns_the_near_miss_into_two_errors() -> None:
    a = analyse(gt_coco(), DETS, score_thresh=0.5, iou_thresh=0.95)  # the 0.9-IoU detection no longer matches
    assert a.tp.tolist() == [1, 0] and a.fp.tolist() == [2, 1] and a.fn.tolist() == [1, 1]
    assert a.per_image[2] == (1, 1)


def test_bad_thresholds_are_value_errors() -> None:
    with pytest.raises(ValueError, match="score_thresh must be in"):
        analyse(gt_coco(), DETS, score_thresh=1.5)


def test_report_pictures(tmp_path: Path) -> None:
    for i in (1, 2):
        Image.new("RGB", (S, S), "gray").save(tmp_path / f"{i}.png")
    a = analyse(gt_coco(), DETS)
    paths = write_report(tmp_path / "out", a, gt_coco(), DETS, tmp_path, worst=3)
    assert [p.relative_to(tmp_path / "out").as_posix() for p in paths] == [
        "analysis/confusion_matrix.png",
        "analysis/worst/01_1.png",
    ]
    with Image.open(paths[1]) as im:
        assert im.width > 2 * S  # two panels side by side
    (tmp_path / "out" / "analysis" / "confusion_matrix.png").write_bytes(b"mine")
    with pytest.raises(ValueError, match="confusion_matrix.png exists and is not an unchanged file") as refusal:
        write_report(tmp_path / "out", a, gt_coco(), DETS, tmp_path)
    # found by review: the refusal spoke of an "export" (the pre-annotations' wording)
    assert "earlier maskrcnn evaluate report" in str(refusal.value) and "export" not in str(refusal.value)


def test_evaluate_cli_matrix_agrees_with_its_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.helpers import tiny_eval_set

    split, weights = tiny_eval_set(tmp_path)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--weights",
                str(weights),
                "--data",
                str(split.ann_file),
                "--images",
                str(split.image_dir),
                "--out",
                str(out),
                "--quiet",
                "--report-score",
                "0.0",
            ]
        )
        == 0
    )
    assert "F1" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    gt = json.loads(split.ann_file.read_text())
    results = json.loads((out / "results.json").read_text())
    assert results, "the tiny model gave no detection: nothing is tested"
    matrix = np.array(metrics["analysis"]["confusion_matrix"]["matrix"])
    cats = sorted(c["id"] for c in gt["categories"])
    for k, c in enumerate(cats):  # each ground-truth instance in one cell of its row; each detection in one column
        assert matrix[k].sum() == sum(a["category_id"] == c and not a.get("iscrowd") for a in gt["annotations"])
        assert matrix[:, k].sum() == sum(e["category_id"] == c for e in results)
    assert (out / "analysis" / "confusion_matrix.png").is_file()


def test_evaluate_worst_0_draws_no_worst_images_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Found by review: ``--worst 0`` drew nothing but said it wrote analysis/worst/."""
    from tests.helpers import tiny_eval_set

    split, weights = tiny_eval_set(tmp_path)
    args = ["evaluate", "--weights", str(weights), "--data", str(split.ann_file), "--images", str(split.image_dir)]
    assert main([*args, "--out", str(tmp_path / "eval"), "--quiet", "--report-score", "0.0", "--worst", "0"]) == 0
    assert "analysis/confusion_matrix.png -> " in capsys.readouterr().out
    assert (tmp_path / "eval" / "analysis" / "confusion_matrix.png").is_file()
    assert not (tmp_path / "eval" / "analysis" / "worst").exists()


def test_pr_curves_hand_computed_and_agree_with_the_operating_point() -> None:
    from maskrcnn.evaluation.analysis import pr_curves

    curves = pr_curves(gt_coco(), DETS, num_thresholds=11)  # thresholds 0, 0.1, ..., 1
    a, b = curves["a"], curves["b"]
    # class a: 0.9 TP, 0.8 FP (on b), 0.6 TP, 0.3 FP; two instances of a
    assert a.tp.tolist() == [2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 0]
    assert a.fp.tolist() == [2, 2, 2, 2, 1, 1, 1, 1, 1, 0, 0]
    assert a.fn.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2]
    np.testing.assert_allclose(a.precision[[0, 5, 8, 10]], [0.5, 2 / 3, 0.5, 1.0])  # nothing at 1.0: precision 1
    # class b: the 0.7 detection is false, the 0.9 one is on a crowd region (ignored); one instance
    assert b.tp.tolist() == [0] * 11 and b.fp.tolist() == [1] * 8 + [0] * 3 and b.fn.tolist() == [1] * 11
    op = analyse(gt_coco(), DETS, score_thresh=0.5)
    assert [a.tp[5], b.tp[5]] == op.tp.tolist() and [a.fp[5], b.fp[5]] == op.fp.tolist()


def test_evaluate_refuses_a_report_score_outside_0_1_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert (
        main(
            [
                "evaluate",
                "--weights",
                str(tmp_path / "none.pth"),
                "--data",
                str(tmp_path / "none.json"),
                "--images",
                str(tmp_path),
                "--report-score",
                "1.5",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == "error: --report-score is a score in [0, 1], got 1.5"
