"""coco_evaluate against pycocotools run by hand on a tiny ground truth."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.engine.evaluate import STAT_NAMES, coco_evaluate, flatten_metrics, format_metrics
from maskrcnn.results import Result, write_coco_results

# pycocotools.mask.decode trips numpy 2's __array__(copy=) deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZES = {1: (100, 120), 2: (80, 100)}  # image id -> (h, w)


def _rle(h: int, w: int, y1: int, y2: int, x1: int, x2: int) -> dict:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y1:y2, x1:x2] = 1
    m[y1:y1 + 3, x1:x1 + 3] = 0  # not a plain box, so segm and bbox IoU differ
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _gt_dict() -> dict:
    anns = [
        # image 1: a cat polygon (medium) and a dog RLE (large); image 2: a dog (medium) and a small cat
        (1, 1, [[10, 10, 50, 10, 50, 60, 30, 70, 10, 60]]),
        (1, 2, _rle(100, 120, 2, 98, 10, 115)),
        (2, 2, [[5, 5, 60, 5, 60, 70, 5, 70]]),
        (2, 1, [[70, 10, 90, 10, 90, 30, 70, 30]]),
    ]
    annotations = []
    for n, (image_id, cat, seg) in enumerate(anns, 1):
        h, w = SIZES[image_id]
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        annotations.append({
            "id": n, "image_id": image_id, "category_id": cat, "segmentation": seg, "iscrowd": 0,
            "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
        })
    return {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i, (h, w) in SIZES.items()],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}],
        "annotations": annotations,
    }


@pytest.fixture()
def gt_path(tmp_path) -> Path:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_gt_dict()))
    return path


def _load(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _detections(coco: COCO, jitter: float = 0.0, drop_category: int | None = None) -> list[dict]:
    """Ground truth turned into detections through Result.to_coco, plus one false positive."""
    rng = np.random.default_rng(0)
    entries = []
    for image_id, (h, w) in SIZES.items():
        anns = [a for a in coco.imgToAnns[image_id] if a["category_id"] != drop_category]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes += jitter * rng.standard_normal(boxes.shape).astype(np.float32)
        masks = np.stack([coco.annToMask(a).astype(bool) for a in anns]) if anns else np.zeros((0, h, w), bool)
        if jitter:
            masks = np.roll(masks, int(jitter), axis=2)
        result = Result(
            boxes=boxes,
            scores=np.linspace(0.9, 0.6, len(anns)),
            labels=np.array([a["category_id"] for a in anns]),
            image_size=(h, w),
            masks=masks,
        )
        entries += result.to_coco(image_id)
    if jitter:  # a confident false positive
        fp = np.zeros((1, 80, 100), bool)
        fp[0, 40:60, 70:90] = True
        entries += Result(np.array([[70, 40, 90, 60]]), np.array([0.95]), np.array([2]), (80, 100), fp).to_coco(2)
    return entries


def _reference(gt_path: Path, entries: list[dict], iou_type: str) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _load(gt_path)
        coco_dt = coco_gt.loadRes(copy.deepcopy(entries))
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_perfect_detections_give_ap_one(gt_path) -> None:
    metrics = coco_evaluate(gt_path, _detections(_load(gt_path)))
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
        assert m["per_class"]["cat"] == pytest.approx(1.0) and m["per_class"]["dog"] == pytest.approx(1.0)
        assert math.isnan(m["per_class"]["bird"])  # no ground truth
    assert "IoU metric: bbox" in metrics["summary"] and "IoU metric: segm" in metrics["summary"]
    assert "Average Precision" in metrics["summary"] and "Loading" not in metrics["summary"]


@pytest.mark.parametrize("drop_category", [None, 2])
def test_identical_to_pycocotools(gt_path, drop_category, capsys) -> None:
    entries = _detections(_load(gt_path), jitter=3.0, drop_category=drop_category)
    original = copy.deepcopy(entries)
    metrics = coco_evaluate(_load(gt_path), entries)
    assert entries == original  # the caller's entries are not annotated in place
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed
    for iou_type in ("bbox", "segm"):
        ref = _reference(gt_path, entries, iou_type)
        assert [metrics[iou_type][name] for name in STAT_NAMES] == [float(v) for v in ref.stats]
        precision = ref.eval["precision"]
        for k, cat_id in enumerate(ref.params.catIds):
            p = precision[:, :, k, 0, 2]
            name = {1: "cat", 2: "dog", 3: "bird"}[cat_id]
            got = metrics[iou_type]["per_class"][name]
            if (p > -1).any():
                assert got == float(np.mean(p[p > -1]))
            else:
                assert math.isnan(got)
        assert 0.0 < metrics[iou_type]["AP"] < 1.0
    if drop_category == 2:  # every dog missed
        assert metrics["bbox"]["per_class"]["dog"] == 0.0 and metrics["segm"]["per_class"]["dog"] == 0.0
        assert metrics["bbox"]["per_class"]["cat"] > 0.0


def test_empty_results_give_zero(gt_path, tmp_path) -> None:
    for results in ([], write_coco_results([], tmp_path / "empty.json")):
        metrics = coco_evaluate(gt_path, results)
        for iou_type in ("bbox", "segm"):
            m = metrics[iou_type]
            assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AR100"] == 0.0
            assert m["per_class"]["cat"] == 0.0 and m["per_class"]["dog"] == 0.0
            assert math.isnan(m["per_class"]["bird"])


def test_results_file_and_image_subset(gt_path, tmp_path) -> None:
    entries = _detections(_load(gt_path))
    path = write_coco_results([e for e in entries if e["image_id"] == 1], tmp_path / "dets.json")
    metrics = coco_evaluate(str(gt_path), path, iou_types="segm", image_ids=[1])
    assert list(metrics) == ["segm", "summary"]
    assert metrics["segm"]["AP"] == pytest.approx(1.0)


def test_errors(gt_path) -> None:
    entries = _detections(_load(gt_path))
    with pytest.raises(ValueError, match="image ids"):
        coco_evaluate(gt_path, [dict(entries[0], image_id=99)])
    with pytest.raises(ValueError, match="segmentation"):
        coco_evaluate(gt_path, [{k: v for k, v in e.items() if k != "segmentation"} for e in entries])
    with pytest.raises(ValueError, match="iou type"):
        coco_evaluate(gt_path, entries, iou_types=("keypoints",))
    box_only = [{k: v for k, v in e.items() if k != "segmentation"} for e in entries]
    assert coco_evaluate(gt_path, box_only, iou_types=("bbox",))["bbox"]["AP"] == pytest.approx(1.0)


def test_format_and_flatten(gt_path) -> None:
    metrics = coco_evaluate(gt_path, _detections(_load(gt_path), drop_category=2))
    table = format_metrics(metrics, per_class=True)
    assert table.splitlines()[0].split() == list(STAT_NAMES)
    assert "bbox" in table and "segm" in table and "dog" in table
    flat = flatten_metrics(metrics)
    assert flat["bbox_AP"] == metrics["bbox"]["AP"] and flat["segm_ARl"] == metrics["segm"]["ARl"]
    assert not any("per_class" in k or "summary" in k for k in flat)
