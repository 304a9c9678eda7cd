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

from maskrcnn.evaluation.coco import STAT_NAMES, coco_evaluate, flatten_metrics, format_metrics
from maskrcnn.inference.results import Result, write_coco_results

# pycocotools.mask.decode trips numpy 2's __array__(copy=) deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZES = {1: (100, 120), 2: (80, 100)}  # image id -> (h, w)


def _rle(h: int, w: int, y1: int, y2: int, x1: int, x2: int) -> dict:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y1:y2, x1:x2] = 1
    m[y1 : y1 + 3, x1 : x1 + 3] = 0  # not a plain box, so segm and bbox IoU differ
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
        annotations.append(
            {
                "id": n,
                "image_id": image_id,
                "category_id": cat,
                "segmentation": seg,
                "iscrowd": 0,
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
            }
        )
    return {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i, (h, w) in SIZES.items()],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}],
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
        assert m["per_class"]["circle"] == pytest.approx(1.0) and m["per_class"]["square"] == pytest.approx(1.0)
        assert math.isnan(m["per_class"]["triangle"])  # no ground truth
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
            name = {1: "circle", 2: "square", 3: "triangle"}[cat_id]
            got = metrics[iou_type]["per_class"][name]
            if (p > -1).any():
                assert got == float(np.mean(p[p > -1]))
            else:
                assert math.isnan(got)
        assert 0.0 < metrics[iou_type]["AP"] < 1.0
    if drop_category == 2:  # every dog missed
        assert metrics["bbox"]["per_class"]["square"] == 0.0 and metrics["segm"]["per_class"]["square"] == 0.0
        assert metrics["bbox"]["per_class"]["circle"] > 0.0


def test_empty_results_give_zero(gt_path, tmp_path) -> None:
    for results in ([], write_coco_results([], tmp_path / "empty.json")):
        metrics = coco_evaluate(gt_path, results)
        for iou_type in ("bbox", "segm"):
            m = metrics[iou_type]
            assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AR100"] == 0.0
            assert m["per_class"]["circle"] == 0.0 and m["per_class"]["square"] == 0.0
            assert math.isnan(m["per_class"]["triangle"])


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
    assert "bbox" in table and "segm" in table and "square" in table
    flat = flatten_metrics(metrics)
    assert flat["bbox_AP"] == metrics["bbox"]["AP"] and flat["segm_ARl"] == metrics["segm"]["ARl"]
    assert not any("per_class" in k or "summary" in k for k in flat)


# ---- the ground truth goes through the training parser ---------------------------------


def _edit_gt(tmp_path: Path, edit) -> Path:
    data = _gt_dict()
    edit(data)
    path = tmp_path / "broken_gt.json"
    path.write_text(json.dumps(data))
    return path


BAD_GT = [
    # (what, edit, fragments of the one-line error): each gave a traceback or passed silently
    ("missing key", lambda d: d["annotations"][0].pop("category_id"), ["annotation id 1", "'category_id'"]),
    (
        "2-point polygon",
        lambda d: d["annotations"][2].update(segmentation=[[5, 5, 60, 5]]),
        ["annotation id 3", "at least 3"],
    ),
    (
        "unknown category",
        lambda d: d["annotations"][1].update(category_id=9),
        ["annotation id 2", "unknown category id 9"],
    ),
    ("unknown image", lambda d: d["annotations"][3].update(image_id=7), ["annotation id 4", "unknown image id 7"]),
    (
        "RLE size",
        lambda d: d["annotations"][1]["segmentation"].update(size=[100, 121]),
        ["annotation id 2", "RLE size"],
    ),
    ("duplicate annotation id", lambda d: d["annotations"][3].update(id=1), ["annotation id 1", "twice"]),
    ("duplicate image id", lambda d: d["images"][1].update(id=1), ["image id 1", "twice"]),
]


@pytest.mark.parametrize("edit, fragments", [b[1:] for b in BAD_GT], ids=[b[0] for b in BAD_GT])
def test_bad_ground_truth_is_a_named_error(tmp_path, edit, fragments) -> None:
    from maskrcnn.data import DatasetError

    entries = _detections(_load_gt_dict())
    with pytest.raises(DatasetError) as e:
        coco_evaluate(_edit_gt(tmp_path, edit), entries)
    message = str(e.value)
    assert "broken_gt.json" in message
    for fragment in fragments:
        assert fragment in message, message


def _load_gt_dict() -> COCO:
    coco = COCO()
    coco.dataset = _gt_dict()
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ---- maskrcnn evaluate: images missing, unreadable, of the wrong size, outside the folder --


@pytest.fixture()
def eval_set(tmp_path) -> tuple[Path, Path]:
    """(gt.json, image folder) with both images written at the sizes the JSON says."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for image_id, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{image_id}.png")
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(_gt_dict()))
    return gt, images


@pytest.fixture()
def perfect_model(monkeypatch):
    """Replace the inference loop by a perfect model: the ground truth as detections, for every
    requested image whose file it can read (as the real loop does). Records the ids asked for."""
    calls: list[list[int]] = []

    def fake(model, coco, image_dir, options=None, image_ids=None, **kwargs):
        ids = sorted(coco.getImgIds()) if image_ids is None else list(image_ids)
        calls.append(ids)
        readable = [i for i in ids if (Path(image_dir) / coco.imgs[i]["file_name"]).is_file()]
        return [e for e in _detections(coco) if e["image_id"] in readable]

    monkeypatch.setattr("maskrcnn.commands.evaluate.coco_results", fake)
    return calls


def _evaluate(weights: Path, gt: Path, images: Path, out: Path, *extra: str) -> int:
    from maskrcnn.cli import main

    return main(
        [
            "evaluate",
            "--weights",
            str(weights),
            "--data",
            str(gt),
            "--images",
            str(images),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def test_perfect_detections_score_one_from_the_command_line(tiny_ckpt, eval_set, perfect_model, tmp_path) -> None:
    assert _evaluate(tiny_ckpt, *eval_set, tmp_path / "out") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)


def test_a_missing_image_is_an_error_before_inference(tiny_ckpt, eval_set, perfect_model, tmp_path, capsys) -> None:
    gt, images = eval_set
    (images / "2.png").unlink()
    assert _evaluate(tiny_ckpt, gt, images, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "1 of 2 images are bad" in err and "2.png" in err and "not found" in err and "--skip-bad-images" in err
    assert perfect_model == []  # no inference ran
    assert not (tmp_path / "out").exists()


def test_skip_bad_images_leaves_them_out_of_both_sides(tiny_ckpt, eval_set, perfect_model, tmp_path, capsys) -> None:
    """Was: 'skipping' logged, the image's ground truth still counted, AP 0.5-ish, exit 0."""
    gt, images = eval_set
    (images / "2.png").unlink()
    assert _evaluate(tiny_ckpt, gt, images, tmp_path / "out", "--skip-bad-images") == 1
    assert perfect_model == [[1]]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["excluded_images"] == ["2.png"]
    assert "1 of 2 images left out" in capsys.readouterr().err


def test_a_wrong_images_folder_is_an_error(tiny_ckpt, eval_set, perfect_model, tmp_path, capsys) -> None:
    gt, _ = eval_set
    (tmp_path / "elsewhere").mkdir()
    for extra in ([], ["--skip-bad-images"]):
        assert _evaluate(tiny_ckpt, gt, tmp_path / "elsewhere", tmp_path / "out", *extra) == 2
        err = capsys.readouterr().err
        assert "2 of 2 images are bad" in err and "right folder" in err
    assert perfect_model == []


def test_an_image_of_another_size_than_the_json_says_is_an_error(
    tiny_ckpt, eval_set, perfect_model, tmp_path, capsys
) -> None:
    """Was: scored against masks rasterised at the JSON's size (AP 0.66 for perfect detections), exit 0."""
    from PIL import Image

    gt, images = eval_set
    Image.fromarray(np.zeros((80, 130, 3), np.uint8)).save(images / "2.png")  # the JSON says 100 x 80
    assert _evaluate(tiny_ckpt, gt, images, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "2.png is 130x80 (WxH)" in err and "says 100x80 for image id 2" in err
    assert perfect_model == []
    assert _evaluate(tiny_ckpt, gt, images, tmp_path / "out", "--skip-bad-images") == 1
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["bbox"]["AP"] == pytest.approx(1.0)


def test_an_undecodable_image_stops_the_real_loop_or_is_left_out(tiny_ckpt, eval_set, tmp_path, capsys) -> None:
    """A truncated PNG passes the header check; the inference loop itself must not drop it quietly."""
    gt, images = eval_set
    data = (images / "2.png").read_bytes()
    (images / "2.png").write_bytes(data[: len(data) // 2])
    assert _evaluate(tiny_ckpt, gt, images, tmp_path / "out") == 2
    assert "2.png" in capsys.readouterr().err
    assert _evaluate(tiny_ckpt, gt, images, tmp_path / "out", "--skip-bad-images") == 1
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["excluded_images"] == ["2.png"]
    assert {e["image_id"] for e in json.loads((tmp_path / "out" / "results.json").read_text())} <= {1}


def test_bad_ground_truth_from_the_command_line(tiny_ckpt, eval_set, tmp_path, capsys) -> None:
    gt, images = eval_set
    broken = _edit_gt(tmp_path, lambda d: d["annotations"][2].update(segmentation=[[5, 5, 60, 5]]))
    assert _evaluate(tiny_ckpt, broken, images, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "broken_gt.json: annotation id 3" in err and "\n" not in err


def test_file_names_outside_the_image_folder(tiny_ckpt, eval_set, perfect_model, tmp_path, capsys) -> None:
    gt, images = eval_set
    data = json.loads(gt.read_text())
    data["images"][0]["file_name"] = "../images/1.png"  # leaves the folder (and comes back)
    gt.write_text(json.dumps(data))
    assert _evaluate(tiny_ckpt, gt, images, tmp_path / "out") == 2
    assert "points outside the image folder" in capsys.readouterr().err
    assert perfect_model == []
    assert _evaluate(tiny_ckpt, gt, images, tmp_path / "out", "--allow-outside-root") == 0


def test_a_model_that_predicts_none_of_the_categories_is_an_error(
    tiny_ckpt, eval_set, perfect_model, tmp_path, capsys
) -> None:
    """The tiny model predicts ids 1..3; a ground truth using ids 7 and 8 could only score AP 0."""
    gt, images = eval_set
    data = json.loads(gt.read_text())
    data["categories"] = [{"id": 7, "name": "circle"}, {"id": 8, "name": "square"}]
    for a in data["annotations"]:
        a["category_id"] += 6
    gt.write_text(json.dumps(data))
    assert _evaluate(tiny_ckpt, gt, images, tmp_path / "out") == 2
    assert "none of its category ids [7, 8] is one the model predicts [1, 2, 3]" in capsys.readouterr().err


# ---- degenerate ground truth: dropped from evaluation as it is from training ------------


def test_a_dropped_degenerate_box_is_not_scored_as_ground_truth(tmp_path, caplog) -> None:
    """A zero-width box is warned about and dropped: perfect detections of the rest score 1.0,
    through both readers of a ground-truth file (``coco_evaluate(path)``, ``CocoDataset.coco``)."""
    from maskrcnn.data.coco import CocoDataset

    data = _gt_dict()
    perfect = _detections(_load_gt_dict())  # the four real instances, found exactly
    data["annotations"].append(
        {
            "id": 99,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 0,
            "area": 0.0,
            "bbox": [30.0, 20.0, 0.0, 15.0],
            "segmentation": [[30, 20, 30, 35, 30, 27]],
        }
    )
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(data))
    for source in (gt, CocoDataset(gt, tmp_path).coco):
        metrics = coco_evaluate(source, perfect)
        for iou_type in ("bbox", "segm"):
            assert metrics[iou_type]["AP"] == pytest.approx(1.0), (source, iou_type)
            assert metrics[iou_type]["per_class"]["circle"] == pytest.approx(1.0)
    assert "dropped 1 degenerate annotation" in caplog.text


def test_categories_named_otherwise_than_the_model_are_an_error(tiny_ckpt, eval_set, perfect_model, tmp_path, capsys):
    """COCO AP pairs classes by id: a file whose id 2 is "triangle" for a model whose 2 is "square"
    (a round trip through a tool that numbers classes by first appearance) scored each class on
    another's objects, reported as a plain bad AP. Names are compared without case."""
    gt, images = eval_set
    data = json.loads(gt.read_text())
    data["categories"] = [{"id": 1, "name": "Circle"}, {"id": 2, "name": "triangle"}, {"id": 3, "name": "square"}]
    gt.write_text(json.dumps(data))
    assert _evaluate(tiny_ckpt, gt, images, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "category 2 is 'triangle' there but 'square' to the model (and 1 more)" in err, err
    assert "--classes circle,square,triangle" in err and len(err.strip().splitlines()) == 1
    assert not perfect_model  # refused before any inference
    assert _evaluate(tiny_ckpt, gt, images, tmp_path / "out", "--ignore-class-names") == 0
