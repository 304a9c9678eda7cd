"""The correction loop: predictions exported for a tool (the ``predict --export`` writers, their
default simplification) and converted back by ``maskrcnn convert`` give the same instances: same
count, same labels, mask IoU >= 0.98 each, same file names. The predictions are kudzu's ground
truth, two instances joined into one mask of two parts (the case tools split)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from maskrcnn.cli import main
from maskrcnn.data.coco import segmentation_to_mask
from maskrcnn.data.formats import CvatWriter, LabelMeWriter, LabelStudioWriter, YoloWriter
from maskrcnn.inference.results import Result
from tests.helpers import KUDZU, need

NAMES = ["kudzu", "other"]  # labels 1, 2 (category ids 1, 2, YOLO classes 0, 1)
FILES = ["val_25.jpg", "val_26.jpg"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """Results for two kudzu photos in ``photos/a`` and ``photos/b``: every third instance
    labelled 'other', the first instance of each photo joined with one apart from it into one two-part mask."""
    coco = json.loads(need(KUDZU / "annotations" / "instances_val.json").read_text())
    root = tmp_path_factory.mktemp("rt") / "photos"
    results = {}
    for sub, im in zip("ab", (i for f in FILES for i in coco["images"] if i["file_name"] == f)):
        (root / sub).mkdir(parents=True)
        shutil.copy(KUDZU / "images" / im["file_name"], root / sub / im["file_name"])
        h, w = im["height"], im["width"]
        masks = [
            segmentation_to_mask(a["segmentation"], h, w).astype(bool)
            for a in coco["annotations"]
            if a["image_id"] == im["id"]
        ]
        j = next(k for k in range(1, len(masks)) if ndimage.label(masks[0] | masks[k])[1] == 2)  # apart
        masks = [masks[0] | masks[j], *(m for k, m in enumerate(masks[1:], 1) if k != j)]
        labels = [2 if k % 3 == 2 else 1 for k in range(len(masks))]
        boxes = [_box(m) for m in masks]
        results[f"{sub}/{im['file_name']}"] = Result(
            boxes,
            np.linspace(0.9, 0.5, len(masks)),
            labels,
            (h, w),
            masks=np.stack(masks),
            class_names=[NAMES[k - 1] for k in labels],
            path=str(root / sub / im["file_name"]),
        )
    return results


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def export(writer, results: dict[str, Result]) -> None:
    for image_id, result in enumerate(results.values(), 1):
        writer.add(image_id, Path(result.path).stem, Path(result.path), result)
    writer.close()


def assert_same(results: dict[str, Result], coco: dict, names: dict[str, str]) -> None:
    """``coco`` holds ``results``' instances; ``names`` maps its file names to ``results``' keys."""
    assert sorted(names[im["file_name"]] for im in coco["images"]) == sorted(results)
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    for im in coco["images"]:
        result = results[names[im["file_name"]]]
        have = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert len(have) == len(result), im["file_name"]
        for a, mask, name in zip(have, result.masks, result.class_names):
            assert cats[a["category_id"]] == name
            got = segmentation_to_mask(a["segmentation"], im["height"], im["width"]).astype(bool)
            assert (got & mask).sum() / (got | mask).sum() >= 0.98, (im["file_name"], a["id"])


def convert(*args: str) -> dict:
    out = args[args.index("--out") + 1]
    assert main(["convert", *args]) == 0
    return json.loads(Path(out).read_text())


def test_labelme(photos: dict[str, Result], tmp_path: Path) -> None:
    export(LabelMeWriter(tmp_path / "pred"), photos)
    root = Path(next(iter(photos.values())).path).parents[1]
    coco = convert(
        "labelme", str(tmp_path / "pred" / "labelme"), "--images", str(root), "--out", str(tmp_path / "t.json")
    )
    assert_same(photos, coco, {k: k for k in photos})


def test_cvat(photos: dict[str, Result], tmp_path: Path) -> None:
    """Found by review: the two-part mask came back as two instances."""
    export(CvatWriter(tmp_path / "pred"), photos)
    root = Path(next(iter(photos.values())).path).parents[1]
    xml = tmp_path / "pred" / "cvat" / "annotations.xml"
    coco = convert("cvat", str(xml), "--images", str(root), "--out", str(tmp_path / "t.json"))
    assert_same(photos, coco, {k: k for k in photos})  # names relative to the photos' common folder


def test_yolo(photos: dict[str, Result], tmp_path: Path) -> None:
    """Found by review: data.yaml had no split and the labels were not beside an images/ folder."""
    export(YoloWriter(tmp_path / "pred"), photos)
    ds = tmp_path / "pred" / "yolo"
    coco = convert("yolo", str(ds / "data.yaml"), "--split", "val", "--out", str(tmp_path / "t.json"))
    assert_same(photos, coco, {f"images/{Path(k).name}": k for k in photos})  # copies of the photos
    for k in photos:  # where Ultralytics looks: images/x.jpg -> labels/x.txt
        assert (ds / "labels" / Path(k).with_suffix(".txt").name).is_file()


def test_labelstudio(photos: dict[str, Result], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Found by review: the tasks' predictions were ignored (every image came back empty), and a
    two-part mask came back as two instances."""
    root = Path(next(iter(photos.values())).path).parents[1]
    export(LabelStudioWriter(tmp_path / "pred", document_root=root.parent), photos)
    tasks = str(tmp_path / "pred" / "labelstudio" / "tasks.json")
    # only predictions: not converted unless asked, and said so
    assert main(["convert", "labelstudio", tasks, "--images", str(root), "--out", str(tmp_path / "t0.json")]) == 2
    assert "only predictions" in capsys.readouterr().err
    # the document root or the photos' folder: the URL's path is found under either
    for images in (root.parent, root):
        out = str(tmp_path / f"t_{images.name}.json")
        coco = convert("labelstudio", tasks, "--images", str(images), "--predictions", "--out", out)
        prefix = "photos/" if images == root.parent else ""
        assert_same(photos, coco, {prefix + k: k for k in photos})
