"""Annotation-tool readers: the kudzu COCO annotations written to each tool's format by writers
here (from each tool's documented format, not the package's writers), converted back, give the
same instances (mask IoU >= 0.98, same image, same category). Plus hand-computed shapes, the
shapes that cannot be converted, and one-line errors."""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util

from maskrcnn.cli import main
from maskrcnn.data.coco import segmentation_to_mask
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.formats import (
    cvat_to_coco,
    labelme_to_coco,
    labelstudio_to_coco,
    yolo_to_coco,
)
from tests.helpers import KUDZU, need

IMAGES = KUDZU / "images"
NUM_IMAGES = 5  # of the validation split: ~110 instances, a few seconds per format


@pytest.fixture(scope="module")
def kudzu() -> dict:
    """The first images of kudzu's validation split; every third instance relabelled 'other' so
    that categories are exercised."""
    coco = json.loads(need(KUDZU / "annotations" / "instances_val.json").read_text())
    images = coco["images"][:NUM_IMAGES]
    ids = {im["id"] for im in images}
    anns = [a for a in coco["annotations"] if a["image_id"] in ids]
    for k, a in enumerate(anns):
        a["category"] = "other" if k % 3 == 2 else "kudzu"
    return {"images": images, "annotations": anns}


def mask_of(seg, h: int, w: int) -> np.ndarray:
    return segmentation_to_mask(seg, h, w).astype(bool)


def assert_same_instances(kudzu: dict, converted: dict, same_ids: bool) -> None:
    """Every instance of ``kudzu`` is in ``converted`` (same image by file name, same order)."""
    by_name = {im["file_name"]: im for im in converted["images"]}
    assert sorted(by_name) == sorted(im["file_name"] for im in kudzu["images"])
    cats = {c["id"]: c["name"] for c in converted["categories"]}
    for im in kudzu["images"]:
        got = by_name[im["file_name"]]
        assert (got["width"], got["height"]) == (im["width"], im["height"])
        if same_ids:
            assert got["id"] == im["id"]
        want = [a for a in kudzu["annotations"] if a["image_id"] == im["id"]]
        have = [a for a in converted["annotations"] if a["image_id"] == got["id"]]
        assert len(have) == len(want)
        for a, b in zip(want, have):
            assert cats[b["category_id"]] == a["category"]
            m1, m2 = (mask_of(x["segmentation"], im["height"], im["width"]) for x in (a, b))
            iou = (m1 & m2).sum() / (m1 | m2).sum()
            assert iou >= 0.98, (im["file_name"], a["id"], iou)


def points(poly: list[float]) -> list[list[float]]:
    return [[poly[i], poly[i + 1]] for i in range(0, len(poly), 2)]


# ---- LabelMe ------------------------------------------------------------------------------------


def test_labelme_round_trip(kudzu: dict, tmp_path: Path) -> None:
    for im in kudzu["images"]:
        shapes = [
            {"label": a["category"], "points": points(p), "group_id": None, "shape_type": "polygon", "flags": {}}
            for a in kudzu["annotations"]
            if a["image_id"] == im["id"]
            for p in a["segmentation"]
        ]
        doc = {
            "version": "5.4.1",
            "flags": {},
            "shapes": shapes,
            "imagePath": os.path.relpath(IMAGES / im["file_name"], tmp_path / "lm"),
            "imageData": None,
            "imageHeight": im["height"],
            "imageWidth": im["width"],
        }
        (tmp_path / "lm").mkdir(exist_ok=True)
        (tmp_path / "lm" / (Path(im["file_name"]).stem + ".json")).write_text(json.dumps(doc))
    coco = labelme_to_coco(tmp_path / "lm", tmp_path / "out.json", image_dir=IMAGES)
    assert_same_instances(kudzu, coco, same_ids=False)
    assert [im["id"] for im in coco["images"]] == list(range(1, NUM_IMAGES + 1))  # sorted by JSON name, 1..N


def test_labelme_shapes_hand_computed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import base64
    import io

    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    patch = np.zeros((4, 6), np.uint8)
    patch[1:3, 2:5] = 255  # 2 x 3 pixels
    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, format="PNG")
    shapes = [
        {"label": "box", "points": [[30, 20], [10, 5]], "shape_type": "rectangle"},  # corners in any order
        {"label": "disc", "points": [[20, 15], [25, 15]], "shape_type": "circle"},
        {
            "label": "blob",
            "points": [[3, 7], [8, 10]],
            "shape_type": "mask",
            "mask": base64.b64encode(buf.getvalue()).decode(),
        },
        {"label": "two", "points": [[0, 0], [4, 0], [4, 4]], "shape_type": "polygon", "group_id": 1},
        {"label": "two", "points": [[10, 0], [14, 0], [14, 4]], "shape_type": "polygon", "group_id": 1},
        {"label": "tip", "points": [[1, 1]], "shape_type": "point"},
    ]
    (tmp_path / "a.json").write_text(
        json.dumps({"shapes": shapes, "imagePath": "a.png", "imageHeight": 30, "imageWidth": 40})
    )
    with caplog.at_level(logging.WARNING):
        coco = labelme_to_coco(tmp_path / "a.json", tmp_path / "out.json")
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    by = {cats[a["category_id"]]: a for a in coco["annotations"]}
    assert list(by) == ["box", "disc", "blob", "two"]
    assert list(cats.values()) == ["box", "disc", "blob", "two"]  # not 'tip', a point: found by a tester
    assert by["box"]["bbox"] == [10, 5, 20, 15] and by["box"]["area"] == 300
    assert abs(by["disc"]["area"] - np.pi * 25) < 6  # a 32-gon of radius 5
    assert by["blob"]["bbox"] == [5, 8, 3, 2] and by["blob"]["area"] == 6  # the PNG placed at (3, 7)
    assert len(by["two"]["segmentation"]) == 2  # one instance in two parts
    assert "shape 5: a point has no area" in caplog.text

    # a PNG of another size than its points' box: LabelMe itself cannot paste it (was accepted)
    shapes[2]["points"] = [[3, 7], [9, 10]]
    (tmp_path / "a.json").write_text(
        json.dumps({"shapes": shapes, "imagePath": "a.png", "imageHeight": 30, "imageWidth": 40})
    )
    with pytest.raises(DatasetError, match=r"shape 2: the mask PNG is 6x4 but its points span 7x4 pixels"):
        labelme_to_coco(tmp_path / "a.json", tmp_path / "out2.json")


def test_polygons_outside_the_image_are_cut_at_its_edges(tmp_path: Path) -> None:
    """Found by a tester: vertices outside were pushed to the edge, which changes the shape (this
    triangle kept 1142 px). Cut by y = 0 and x = 128 it is (112.5, 0), (128, 24.8), (128, 60),
    (90, 60), (97.5, 0): the trapezoid of sides 15 and 60, height 60 (2250 px) less the right
    triangle of legs 22 and 35.2 (387.2 px) = 1862.8 px."""
    from PIL import Image

    from maskrcnn.data.formats.common import clip_polygon

    clipped = clip_polygon(np.array([[100.0, -20], [150, 60], [90, 60]]), 128.0, 128.0)
    x, y = clipped[:, 0], clipped[:, 1]
    assert 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) == pytest.approx(1862.8)
    assert len(clip_polygon(np.array([[200.0, 0], [300, 0], [250, 50]]), 128.0, 128.0)) < 3  # wholly outside
    Image.new("RGB", (128, 128)).save(tmp_path / "a.png")
    shapes = [
        {"label": "t", "points": [[100, -20], [150, 60], [90, 60]], "shape_type": "polygon"},
        {"label": "t", "points": [[200, 0], [300, 0], [250, 50]], "shape_type": "polygon"},
    ]
    (tmp_path / "a.json").write_text(json.dumps({"shapes": shapes, "imagePath": "a.png"}))
    coco = labelme_to_coco(tmp_path / "a.json", tmp_path / "out.json")
    (a,) = coco["annotations"]
    assert abs(a["area"] - 1862.8) < 20  # rasterised: pixels whose centres lie inside, give or take the edges
    assert a["bbox"] == [90, 0, 38, 60]
    assert coco["info"]["not_converted"] == [f"{tmp_path / 'a.json'} shape 1: no pixel inside the image"]


# ---- CVAT ---------------------------------------------------------------------------------------


def cvat_rle(mask: np.ndarray) -> tuple[str, int, int, int, int]:
    """CVAT 1.1 mask attributes from a full-image mask: runs over the tight box, zeros first."""
    rows, cols = np.nonzero(mask)
    top, left, bottom, right = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
    flat = mask[top:bottom, left:right].ravel()
    runs, current, n = [], False, 0
    for v in flat:
        if v == current:
            n += 1
        else:
            runs.append(n)
            current, n = v, 1
    runs.append(n)
    return ", ".join(map(str, runs)), left, top, right - left, bottom - top


def test_cvat_round_trip_polygons_and_masks(kudzu: dict, tmp_path: Path) -> None:
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    labels = ET.SubElement(ET.SubElement(ET.SubElement(root, "meta"), "task"), "labels")
    for name in ("kudzu", "other"):
        ET.SubElement(ET.SubElement(labels, "label"), "name").text = name
    for im in kudzu["images"]:
        el = ET.SubElement(
            root, "image", id=str(im["id"]), name=im["file_name"], width=str(im["width"]), height=str(im["height"])
        )
        for k, a in enumerate(a for a in kudzu["annotations"] if a["image_id"] == im["id"]):
            if k % 2:  # every other instance as a CVAT mask
                rle, left, top, w, h = cvat_rle(mask_of(a["segmentation"], im["height"], im["width"]))
                ET.SubElement(
                    el, "mask", label=a["category"], rle=rle, left=str(left), top=str(top), width=str(w), height=str(h)
                )
            else:
                pts = ";".join(f"{x},{y}" for x, y in points(a["segmentation"][0]))
                ET.SubElement(el, "polygon", label=a["category"], points=pts, occluded="0")
        ET.SubElement(el, "polyline", label="kudzu", points="1,1;5,5")
    ET.ElementTree(root).write(tmp_path / "annotations.xml")
    coco = cvat_to_coco(tmp_path / "annotations.xml", IMAGES, tmp_path / "out.json")
    assert_same_instances(kudzu, coco, same_ids=True)
    assert [c["name"] for c in coco["categories"]] == ["kudzu", "other"]  # the task's label order


def test_cvat_box_rotation_and_bad_rle(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    xml = (
        '<annotations><image id="0" name="a.png" width="40" height="30">'
        '<box label="b" xtl="10" ytl="10" xbr="20" ybr="14" rotation="90"/></image></annotations>'
    )
    (tmp_path / "a.xml").write_text(xml)
    coco = cvat_to_coco(tmp_path / "a.xml", tmp_path, tmp_path / "out.json")
    assert coco["annotations"][0]["bbox"] == [13, 7, 4, 10]  # 10 x 4 turned about its centre (15, 12)
    (tmp_path / "b.xml").write_text(
        xml.replace(
            '<box label="b" xtl="10" ytl="10" xbr="20" ybr="14" rotation="90"/>',
            '<mask label="b" rle="3, 4" left="0" top="0" width="3" height="3"/>',
        )
    )
    with pytest.raises(DatasetError, match=r"image id 0 \(a.png\) shape 0 <mask>: mask rle counts sum to 7, not"):
        cvat_to_coco(tmp_path / "b.xml", tmp_path, tmp_path / "out2.json")


# ---- Label Studio -------------------------------------------------------------------------------


def brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE (thi.ng rle-pack) of a mask as RGBA bytes (255 where drawn): only
    repeated-value blocks, with run-length fields of 3, 4, 8 and 16 bits."""
    values = np.repeat(mask.ravel().astype(np.uint8) * 255, 4)
    bits = [f"{len(values):032b}", f"{8 - 1:05b}", "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))]
    change = np.flatnonzero(np.diff(values)) + 1
    for start, end in zip(np.r_[0, change], np.r_[change, len(values)]):
        n = int(end - start)
        while n:
            chunk = min(n, 2**16)
            bits.append("1" + "11" + f"{chunk - 1:016b}" + f"{int(values[start]):08b}")
            n -= chunk
    s = "".join(bits)
    s += "0" * (-len(s) % 8)
    return [int(s[i : i + 8], 2) for i in range(0, len(s), 8)]


def test_labelstudio_round_trip_polygons_and_brush(kudzu: dict, tmp_path: Path) -> None:
    tasks = []
    for im in kudzu["images"]:
        w, h = im["width"], im["height"]
        results = []
        for k, a in enumerate(a for a in kudzu["annotations"] if a["image_id"] == im["id"]):
            common = {
                "original_width": w,
                "original_height": h,
                "image_rotation": 0,
                "from_name": "label",
                "to_name": "image",
            }
            if k % 2:
                rle = brush_rle(mask_of(a["segmentation"], h, w))
                results.append(
                    {
                        **common,
                        "type": "brushlabels",
                        "value": {"format": "rle", "rle": rle, "brushlabels": [a["category"]]},
                    }
                )
            else:
                pts = [[x / w * 100, y / h * 100] for x, y in points(a["segmentation"][0])]
                results.append(
                    {**common, "type": "polygonlabels", "value": {"points": pts, "polygonlabels": [a["category"]]}}
                )
        results.append({"type": "choices", "value": {"choices": ["ok"]}})
        tasks.append(
            {
                "id": im["id"],
                "data": {"image": f"/data/upload/1/0a1b2c3d-{im['file_name']}"},
                "annotations": [{"id": 1, "result": results, "was_cancelled": False}],
            }
        )
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    coco = labelstudio_to_coco(tmp_path / "export.json", IMAGES, tmp_path / "out.json")
    assert_same_instances(kudzu, coco, same_ids=True)


def test_labelstudio_rectangle_rotates_about_its_corner(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    r = {
        "type": "rectanglelabels",
        "original_width": 200,
        "original_height": 100,
        "value": {"x": 50, "y": 50, "width": 10, "height": 20, "rotation": 90, "rectanglelabels": ["r"]},
    }
    (tmp_path / "e.json").write_text(
        json.dumps([{"id": 7, "data": {"image": "a.png"}, "annotations": [{"result": [r]}]}])
    )
    coco = labelstudio_to_coco(tmp_path / "e.json", tmp_path, tmp_path / "out.json")
    # x, y = 100, 50 px; 20 x 20 px turned 90 degrees clockwise about (100, 50): x 80..100, y 50..70
    assert coco["images"][0]["id"] == 7 and coco["annotations"][0]["bbox"] == [80, 50, 20, 20]


# ---- YOLO ---------------------------------------------------------------------------------------


def test_yolo_round_trip(kudzu: dict, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    names = ["kudzu", "other"]
    for im in kudzu["images"]:
        (root / "images" / "val" / im["file_name"]).symlink_to(IMAGES / im["file_name"])
        lines = []
        for a in (a for a in kudzu["annotations"] if a["image_id"] == im["id"]):
            xy = [v / (im["width"] if i % 2 == 0 else im["height"]) for i, v in enumerate(a["segmentation"][0])]
            lines.append(" ".join([str(names.index(a["category"]))] + [f"{v:.6f}" for v in xy]))
        lines.append("0 0.5 0.5 0.1 0.1")  # a detection box: named, not converted
        (root / "labels" / "val" / (Path(im["file_name"]).stem + ".txt")).write_text("\n".join(lines) + "\n")
    (tmp_path / "data.yaml").write_text(
        "path: ds\ntrain: images/train\nval: images/val\nnames:\n  0: kudzu\n  1: other\n"
    )
    coco, images = yolo_to_coco(tmp_path / "data.yaml", tmp_path / "out.json", split="val")
    assert images == tmp_path / "ds"
    coco["images"] = [{**im, "file_name": Path(im["file_name"]).name} for im in coco["images"]]
    assert_same_instances(kudzu, coco, same_ids=False)
    assert [c["id"] for c in coco["categories"]] == [1, 2]  # class c -> category c + 1


def test_yolo_errors_name_file_and_line(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n3 0.1 0.1 0.5 0.1 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text("train: images\nnames: [a, b]\n")
    with pytest.raises(DatasetError, match=r"a.txt line 2: class 3 is not one of the 2 in"):
        yolo_to_coco(tmp_path / "data.yaml", tmp_path / "out.json")
    with pytest.raises(DatasetError, match="no 'val' split"):
        yolo_to_coco(tmp_path / "data.yaml", tmp_path / "out.json", split="val")
    (tmp_path / "data.yaml").write_text("train: images\nnames: [a, b]\n")
    (tmp_path / "labels" / "a.txt").write_text(
        "0 0.1 0.1 0.5 0.1 0.5 0.5\n1 1 1 5 1 5 6\n"
    )  # pixels: found by a tester
    with pytest.raises(DatasetError, match=r"a.txt line 2: coordinate 6 is above 1: YOLO coordinates are fractions"):
        yolo_to_coco(tmp_path / "data.yaml", tmp_path / "out.json")
    (tmp_path / "labels" / "a.txt").write_text(
        "0 0.1 0.1 1.004 0.1 1.004 0.5\n"
    )  # rounding above 1: taken, cut at the edge
    assert len(yolo_to_coco(tmp_path / "data.yaml", tmp_path / "out.json")[0]["annotations"]) == 1
    (tmp_path / "data.yaml").write_text("train: images\nnc: 5\nnames: [a]\n")  # found by a tester: accepted
    with pytest.raises(DatasetError, match=r"data.yaml: nc is 5 but names has 1 class\(es\)$"):
        yolo_to_coco(tmp_path / "data.yaml", tmp_path / "out.json")


# ---- what cannot be converted is named, counted, and the conversion goes on ---------------------
# Found by review: an unknown shape type stopped the conversion, and a YOLO label file without
# an image was passed over in silence.


def not_converted(source: Path, out: Path, capsys: pytest.CaptureFixture, caplog, *extra: str) -> list[str]:
    """Run ``maskrcnn convert`` (exit 0); the output's count of things not converted must be the
    length of the file's full list, which is returned."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["convert", *extra, "--out", str(out)]) == 0
    listed = json.loads(out.read_text())["info"]["not_converted"]
    assert f"; {len(listed)} not converted" in capsys.readouterr().out
    assert f"{len(listed)} not converted (" in caplog.text  # the warning: a count per reason
    return listed


def test_labelme_names_shapes_it_cannot_convert(tmp_path: Path, capsys, caplog) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    tri = [[1, 1], [9, 1], [9, 9]]
    shapes = [
        {"label": "x", "points": tri, "shape_type": "polygon"},
        {"label": "x", "points": tri, "shape_type": "linestrip"},
        {"label": "x", "points": [[1, 1]], "shape_type": "point"},
        {"label": "x", "points": tri, "shape_type": "cuboid"},  # no such LabelMe shape
        {"label": "x", "points": tri, "shape_type": "circle"},  # a circle takes 2 points
        {"label": "x", "points": tri, "shape_type": "polygon"},
    ]
    (tmp_path / "a.json").write_text(
        json.dumps({"shapes": shapes, "imagePath": "a.png", "imageHeight": 30, "imageWidth": 40})
    )
    (tmp_path / "config.json").write_text("{}")  # another JSON in the folder
    listed = not_converted(tmp_path, tmp_path / "out" / "t.json", capsys, caplog, "labelme", str(tmp_path))
    assert len(json.loads((tmp_path / "out" / "t.json").read_text())["annotations"]) == 2
    assert [x.rsplit(": ", 1)[1] for x in listed] == [
        "a linestrip has no area",
        "a point has no area",
        "shape_type 'cuboid' is not one of polygon, rectangle, circle, mask, point, line, linestrip, points",
        "a circle with a wrong number of points",
        "not a LabelMe file (no 'shapes' and 'imagePath')",
    ]
    assert "a.json shape 3: shape_type 'cuboid'" in caplog.text and "config.json: not a LabelMe file" in caplog.text


def test_cvat_names_shapes_it_cannot_convert(tmp_path: Path, capsys, caplog) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    (tmp_path / "a.xml").write_text(
        '<annotations><image id="3" name="a.png" width="40" height="30">'
        '<polygon label="x" points="1,1;9,1;9,9"/><points label="x" points="1,1"/>'
        '<polyline label="x" points="1,1;5,5"/><polyline label="x" points="2,2;5,5"/>'
        '<cuboid label="x" xtl1="1" ytl1="1"/><polygon3d label="x" points="1,1;9,1;9,9"/>'
        '<box label="x" xtl="1" ytl="1" xbr="5" ybr="5"/></image></annotations>'
    )
    args = ("cvat", str(tmp_path / "a.xml"), "--images", str(tmp_path))
    listed = not_converted(tmp_path, tmp_path / "t.json", capsys, caplog, *args)
    assert len(json.loads((tmp_path / "t.json").read_text())["annotations"]) == 2
    assert [x.split("<", 1)[1] for x in listed] == [
        "points>: a points has no area",
        "polyline>: a polyline has no area",
        "polyline>: a polyline has no area",
        "cuboid>: a cuboid has no area",
        "polygon3d>: <polygon3d> is not one of polygon, box, ellipse, mask, polyline, points, cuboid, skeleton, tag",
    ]
    assert "a polyline has no area: 2" in caplog.text  # counted per reason


def test_labelstudio_names_results_and_tasks_it_cannot_convert(tmp_path: Path, capsys, caplog) -> None:
    from PIL import Image

    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (40, 30)).save(tmp_path / f"{name}.png")
    size = {"original_width": 40, "original_height": 30}
    poly = {**size, "type": "polygonlabels", "value": {"points": [[5, 5], [50, 5], [50, 50]], "polygonlabels": ["x"]}}
    keypoint = {**size, "type": "keypointlabels", "value": {"x": 5, "y": 5, "keypointlabels": ["x"]}}
    both = {**poly, "value": {**poly["value"], "polygonlabels": ["x", "big y"]}}  # found by a tester: stopped all
    tasks = [
        {"id": 1, "data": {"image": "a.png"}, "annotations": [{"result": [poly, keypoint, both]}]},
        {"id": 2, "data": {"image": "b.png"}, "predictions": [{"result": [poly]}]},  # nobody accepted it
        {"id": 3, "data": {"image": "c.png"}, "annotations": [{"result": [poly], "was_cancelled": True}]},
        {"id": 4, "data": {"image": "d.png"}, "annotations": [], "predictions": []},
    ]
    (tmp_path / "e.json").write_text(json.dumps(tasks))
    args = ("labelstudio", str(tmp_path / "e.json"), "--images", str(tmp_path))
    listed = not_converted(tmp_path, tmp_path / "t.json", capsys, caplog, *args)
    assert [im["id"] for im in json.loads((tmp_path / "t.json").read_text())["images"]] == [1]
    assert [x.split(": task ", 1)[1] for x in listed] == [
        "1 result 1: a keypointlabels result is not an area",
        "1 result 2: 2 labels on one region (ambiguous)",
        "2: only predictions, no annotation (--predictions converts them)",
        "3: every annotation was cancelled (skipped in Label Studio)",
        "4: no annotation",
    ]
    listed = not_converted(tmp_path, tmp_path / "t2.json", capsys, caplog, *args, "--predictions")
    assert [im["id"] for im in json.loads((tmp_path / "t2.json").read_text())["images"]] == [1, 2]
    assert len(listed) == 4


def test_yolo_names_label_files_without_an_image(tmp_path: Path, capsys, caplog) -> None:
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "train" / "a.png")
    line = "0 0.1 0.1 0.5 0.1 0.5 0.5\n"
    for name in ("train/a.txt", "train/b.txt", "train/sub/c.txt", "val/d.txt"):  # b, c: no image
        (tmp_path / "labels" / name).write_text(line)
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [a]\n")
    listed = not_converted(tmp_path, tmp_path / "t.json", capsys, caplog, "yolo", str(tmp_path / "data.yaml"))
    assert listed == [
        f"{tmp_path / 'labels/train/b.txt'}: a label file that no train image has",
        f"{tmp_path / 'labels/train/sub/c.txt'}: a label file that no train image has",
    ]  # val's labels are not train's business


# ---- checks shared by all readers, and the command line -----------------------------------------


def test_size_mismatch_and_missing_image_are_one_line_errors(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    doc = {"shapes": [], "imagePath": "a.png", "imageHeight": 40, "imageWidth": 30}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"the tool says 30x40 \(WxH\) but .*a.png is 40x30"):
        labelme_to_coco(tmp_path / "a.json", tmp_path / "out.json")
    (tmp_path / "a.json").write_text(json.dumps({**doc, "imagePath": "../a.png"}))
    with pytest.raises(DatasetError, match="points outside the image folder"):
        labelme_to_coco(tmp_path / "a.json", tmp_path / "out.json")


def test_cli_convert_and_refusing_a_user_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    shape = {"label": "x", "points": [[1, 1], [9, 1], [9, 9]], "shape_type": "polygon"}
    (tmp_path / "a.json").write_text(
        json.dumps({"shapes": [shape], "imagePath": "a.png", "imageHeight": 30, "imageWidth": 40})
    )
    assert main(["convert", "labelme", str(tmp_path / "a.json"), "--out", str(tmp_path / "train.json")]) == 0
    assert "1 images, 1 instances, 1 categories" in capsys.readouterr().out
    assert (
        main(["convert", "labelme", str(tmp_path / "a.json"), "--out", str(tmp_path / "train.json")]) == 0
    )  # ours: replaced
    (tmp_path / "mine.json").write_text("{}")
    assert main(["convert", "labelme", str(tmp_path / "a.json"), "--out", str(tmp_path / "mine.json")]) == 2
    assert "mine.json exists and was not written by maskrcnn convert" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == "{}"
    assert main(["convert", "cvat", str(tmp_path / "a.json"), "--out", str(tmp_path / "t2.json")]) == 2  # no --images
    assert (
        main(
            ["convert", "cvat", str(tmp_path / "a.json"), "--images", str(tmp_path), "--out", str(tmp_path / "t2.json")]
        )
        == 2
    )
    assert "invalid XML" in capsys.readouterr().err


def test_an_edited_converted_file_is_never_replaced_and_empty_shapes_are_named(tmp_path: Path, capsys, caplog) -> None:
    """Found by a breaker: convert replaced a train.json the user had edited since (it only looked
    for convert's description), and kept degenerate shapes as instances with bbox [0, 0, 0, 0]."""
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    shapes = [
        {"label": "x", "points": [[1, 1], [9, 1], [9, 9]], "shape_type": "polygon"},
        {"label": "x", "points": [[10, 10], [10, 10], [10, 10]], "shape_type": "polygon"},  # no area
        {"label": "x", "points": [[50, 40], [60, 40], [60, 45]], "shape_type": "polygon"},
    ]  # wholly outside
    (tmp_path / "a.json").write_text(
        json.dumps({"shapes": shapes, "imagePath": "a.png", "imageHeight": 30, "imageWidth": 40})
    )
    out = tmp_path / "train.json"
    with caplog.at_level(logging.WARNING):
        assert main(["convert", "labelme", str(tmp_path / "a.json"), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    triangle = mask_util.frPyObjects([[1, 1, 9, 1, 9, 9]], 30, 40)  # pycocotools' own fill of the one real shape
    assert [a["bbox"] for a in written["annotations"]] == [
        [float(v) for v in mask_util.toBbox(mask_util.merge(triangle))]
    ]
    # counted by reason, and each named by file and shape (a degenerate shape was once "not inside the image")
    assert (
        "no area (no pixel centre inside the shape): 1" in caplog.text and "no pixel inside the image: 1" in caplog.text
    )
    assert "a.json shape 1: no area" in caplog.text and "a.json shape 2: no pixel inside" in caplog.text
    assert main(["convert", "labelme", str(tmp_path / "a.json"), "--out", str(out)]) == 0  # unchanged: replaced
    edited = json.loads(out.read_text())
    edited["categories"][0]["name"] = "renamed by hand"
    out.write_text(json.dumps(edited))
    capsys.readouterr()
    assert main(["convert", "labelme", str(tmp_path / "a.json"), "--out", str(out)]) == 2
    assert "or was changed since" in capsys.readouterr().err
    assert json.loads(out.read_text())["categories"][0]["name"] == "renamed by hand"
