"""Pre-annotation writers (``predict --export labelme|yolo|cvat|labelstudio``): the files, parsed
here as each tool documents them and filled with matplotlib, give the predicted masks back; a
file the user edited is never replaced. (``test_format_round_trips`` reads them back with our
readers.)"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.data.formats import (
    CvatWriter,
    LabelMeWriter,
    LabelStudioWriter,
    YoloWriter,
    cvat_to_coco,
    labelme_to_coco,
)
from maskrcnn.inference.results import Result

H, W = 48, 64


def fill(polys: list[list[float]]) -> np.ndarray:
    """The pixels whose centres lie inside any of the polygons (matplotlib's point-in-polygon)."""
    from matplotlib.path import Path as Polygon

    ys, xs = np.mgrid[0:H, 0:W]
    centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)  # (H*W, 2) x, y
    inside = [Polygon(np.reshape(p, (-1, 2))).contains_points(centres) for p in polys]
    return np.any(inside, axis=0).reshape(H, W)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture
def result(tmp_path: Path) -> Result:
    """Two detections: a 12 x 20 block (class 'leaf', category 1) and a two-part mask ('bug', 2)."""
    masks = np.zeros((2, H, W), dtype=bool)
    masks[0, 5:17, 10:30] = True
    masks[1, 30:40, 5:15] = True
    masks[1, 25:45, 40:60] = True
    image = tmp_path / "photos" / "p1.png"
    image.parent.mkdir()
    Image.new("RGB", (W, H)).save(image)
    return Result(
        boxes=[[10, 5, 30, 17], [5, 25, 60, 45]],
        scores=[0.9, 0.6],
        labels=[1, 2],
        image_size=(H, W),
        masks=masks,
        class_names=["leaf", "bug"],
        path=str(image),
    )


def test_labelme_file_gives_the_masks_back(result: Result, tmp_path: Path) -> None:
    writer = LabelMeWriter(tmp_path / "out", tolerance=0.5)
    writer.add(1, "p1", Path(result.path), result)
    writer.close()
    doc = json.loads((tmp_path / "out" / "labelme" / "p1.json").read_text())
    assert (tmp_path / "out" / "labelme" / doc["imagePath"]).resolve() == Path(result.path).resolve()
    assert (doc["imageHeight"], doc["imageWidth"], doc["imageData"]) == (H, W, None)
    leaf = [s for s in doc["shapes"] if s["label"] == "leaf"]
    bug = [s for s in doc["shapes"] if s["label"] == "bug"]
    assert len(leaf) == 1 and len(bug) == 2 and bug[0]["group_id"] == bug[1]["group_id"] is not None
    assert leaf[0]["description"] == "score 0.900" and leaf[0]["shape_type"] == "polygon"
    masks = result.masks
    for shapes, mask in ((leaf, masks[0]), (bug, masks[1])):
        assert iou(fill([[v for p in s["points"] for v in p] for s in shapes]), mask) >= 0.98
    # and our reader takes the file as a LabelMe file, the two parts as one instance
    coco = labelme_to_coco(tmp_path / "out" / "labelme", tmp_path / "back.json", image_dir=tmp_path)
    assert [len(a["segmentation"]) for a in coco["annotations"]] == [1, 2]


def test_yolo_labels_give_the_masks_back(result: Result, tmp_path: Path) -> None:
    writer = YoloWriter(tmp_path / "out", tolerance=0.5)
    writer.add(1, "p1", Path(result.path), result)
    writer.close()
    ds = tmp_path / "out" / "yolo"
    lines = (ds / "labels" / "p1.txt").read_text().splitlines()
    polys: dict[int, list[list[float]]] = {}
    for line in lines:
        cls, *xy = line.split()
        polys.setdefault(int(cls), []).append([float(v) * (W if i % 2 == 0 else H) for i, v in enumerate(xy)])
    assert sorted(polys) == [0, 1] and len(polys[1]) == 1  # category c -> class c - 1; one line per object
    masks = result.masks
    assert iou(fill(polys[0]), masks[0]) >= 0.98 and iou(fill(polys[1]), masks[1]) >= 0.98  # the two parts
    data = yaml.safe_load((ds / "data.yaml").read_text())
    assert data["names"] == {0: "leaf", 1: "bug"} and (data["train"], data["val"]) == ("images", "images")
    assert Path(data["path"]) == ds.resolve()  # Ultralytics takes a relative path from the current folder
    assert (ds / "images" / "p1.png").read_bytes() == Path(result.path).read_bytes()  # images/ beside labels/


def test_cvat_xml_gives_the_masks_back(result: Result, tmp_path: Path) -> None:
    writer = CvatWriter(tmp_path / "out", tolerance=0.5)
    writer.add(1, "p1", Path(result.path), result)
    writer.close()
    root = ET.parse(tmp_path / "out" / "cvat" / "annotations.xml").getroot()
    assert root.findtext("version") == "1.1"
    assert [n.text for n in root.iterfind("meta/task/labels/label/name")] == ["leaf", "bug"]
    (image,) = root.iterfind("image")
    assert (image.get("name"), image.get("width"), image.get("height")) == ("p1.png", str(W), str(H))
    polys: dict[str, list[list[float]]] = {}
    for p in image.iterfind("polygon"):
        polys.setdefault(p.get("label"), []).append(
            [float(v) for xy in p.get("points").split(";") for v in xy.split(",")]
        )
    masks = result.masks
    assert iou(fill(polys["leaf"]), masks[0]) >= 0.98 and iou(fill(polys["bug"]), masks[1]) >= 0.98
    groups = [p.get("group_id") for p in image.iterfind("polygon")]
    assert groups == [None, "1", "1"]  # the two parts of 'bug' are one CVAT group
    coco = cvat_to_coco(tmp_path / "out" / "cvat" / "annotations.xml", tmp_path / "photos", tmp_path / "back.json")
    assert [len(a["segmentation"]) for a in coco["annotations"]] == [1, 2]  # the group is one instance


def test_cvat_names_are_unique_relative_paths(result: Result, tmp_path: Path) -> None:
    """Found by review: two images of one base name in different folders had the same <image
    name>, so CVAT (and our reader) could not tell them apart."""
    photos = tmp_path / "photos"
    for sub in ("a", "b/c"):
        (photos / sub).mkdir(parents=True)
        Image.new("RGB", (W, H)).save(photos / sub / "x.png")
    writer = CvatWriter(tmp_path / "out")
    for k, sub in enumerate(("a", "b/c")):
        writer.add(k + 1, f"x_{k}", photos / sub / "x.png", result)
    writer.close()
    root = ET.parse(tmp_path / "out" / "cvat" / "annotations.xml").getroot()
    assert [im.get("name") for im in root.iterfind("image")] == ["a/x.png", "b/c/x.png"]
    coco = cvat_to_coco(tmp_path / "out" / "cvat" / "annotations.xml", photos, tmp_path / "back.json")
    assert [im["file_name"] for im in coco["images"]] == ["a/x.png", "b/c/x.png"]


def test_labelstudio_tasks_give_the_masks_back(result: Result, tmp_path: Path) -> None:
    from tests.data.test_formats import brush_rle  # Label Studio's brush code, written from its spec

    writer = LabelStudioWriter(tmp_path / "out", document_root=tmp_path, tolerance=0.5)
    writer.add(5, "p1", Path(result.path), result)
    writer.close()
    (task,) = json.loads((tmp_path / "out" / "labelstudio" / "tasks.json").read_text())
    assert task["data"]["image"] == "/data/local-files/?d=photos/p1.png"
    (prediction,) = task["predictions"]
    leaf, bug = prediction["result"]
    for r in (leaf, bug):
        assert (r["to_name"], r["original_width"], r["original_height"]) == ("image", W, H)
    # one part: a polygon; two parts: one brush region (a Label Studio polygon has one ring)
    assert (leaf["type"], leaf["from_name"], leaf["value"]["polygonlabels"]) == ("polygonlabels", "label", ["leaf"])
    assert (bug["type"], bug["from_name"], bug["value"]["brushlabels"]) == ("brushlabels", "brush", ["bug"])
    poly = [v * (W if i % 2 == 0 else H) / 100 for p in leaf["value"]["points"] for i, v in enumerate(p)]
    masks = result.masks
    assert iou(fill([poly]), masks[0]) >= 0.98
    assert bug["value"]["format"] == "rle" and bug["value"]["rle"] == brush_rle(masks[1])
    assert prediction["score"] == pytest.approx(0.75)


def test_predict_export_end_to_end_and_edited_files_are_kept(
    tiny_ckpt: Path,
    result: Result,
    tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture,
) -> None:
    photos, out = Path(result.path).parent, tmp_path / "pred"
    args = [
        "predict",
        str(photos),
        "--weights",
        str(tiny_ckpt),
        "--out",
        str(out),
        "--quiet",
        "--score-thresh",
        "0",
        "--export",
        "labelme",
        "--export",
        "yolo",
        "--export",
        "cvat",
        "--export",
        "labelstudio",
    ]
    assert main(args) == 0
    for f in (
        "labelme/p1.json",
        "yolo/labels/p1.txt",
        "yolo/images/p1.png",
        "yolo/data.yaml",
        "cvat/annotations.xml",
        "labelstudio/tasks.json",
    ):
        assert (out / f).is_file(), f
    edited = out / "labelme" / "p1.json"
    edited.write_text(edited.read_text().replace('"flags": {}', '"flags": {"checked": true}', 1))
    before = edited.read_text()
    assert main(args) == 2
    assert (
        "p1.json exists and is not an unchanged file of an earlier maskrcnn predict --export" in capsys.readouterr().err
    )
    assert edited.read_text() == before


def test_a_rerun_replaces_its_own_unchanged_files(result: Result, tmp_path: Path) -> None:
    for _ in range(2):
        writer = YoloWriter(tmp_path / "out")
        writer.check({"p1": Path(result.path)})
        writer.add(1, "p1", Path(result.path), result)
        writer.close()
    (tmp_path / "out" / "yolo" / "data.yaml").write_text("names: [mine]\n")
    with pytest.raises(ValueError, match="data.yaml exists and is not an unchanged file"):
        YoloWriter(tmp_path / "out").check({"p1": Path(result.path)})


def test_export_without_an_image_is_a_usage_error(tiny_ckpt, tmp_path, capsys):
    """Found by a breaker: --export on videos only wrote nothing and said nothing (exit 0)."""
    (tmp_path / "clip.mp4").write_bytes(b"refused before it is opened")
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "predict",
                "--weights",
                str(tiny_ckpt),
                str(tmp_path / "clip.mp4"),
                "--export",
                "labelme",
                "--out",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
    assert exit_.value.code == 2 and "--export apply to images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


CLASSES = ["leaf", "bug", "moth"]  # the model's classes by category id; only 'bug' (2) is detected


def export_all(result: Result, out: Path) -> None:
    for writer in (
        LabelMeWriter(out, classes=CLASSES),
        YoloWriter(out, classes=CLASSES),
        CvatWriter(out, classes=CLASSES),
        LabelStudioWriter(out, document_root=out.parent, classes=CLASSES),
    ):
        writer.add(1, "p1", Path(result.path), result)
        writer.close()


def test_exports_carry_every_class_and_come_back_with_the_model_ids(result: Result, tmp_path: Path) -> None:
    """Found by a tester: classes came back numbered by first appearance (the model's 2 became 1),
    data.yaml named only the classes detected ({} with no detection, which convert refused)."""
    out, photos = tmp_path / "pred", Path(result.path).parent
    export_all(result[1:], out)  # 'bug' only
    assert yaml.safe_load((out / "yolo" / "data.yaml").read_text())["names"] == dict(enumerate(CLASSES))
    root = ET.parse(out / "cvat" / "annotations.xml").getroot()
    assert [n.text for n in root.iterfind("meta/task/labels/label/name")] == CLASSES
    for tool in ("labelme", "labelstudio"):
        assert (out / tool / "classes.txt").read_text().splitlines() == CLASSES
    back = {
        "labelme": ["labelme", str(out / "labelme"), "--images", str(tmp_path), "--classes", str(out / "labelme" / "classes.txt")],
        "cvat": ["cvat", str(out / "cvat" / "annotations.xml"), "--images", str(photos)],
        "yolo": ["yolo", str(out / "yolo" / "data.yaml")],
        "labelstudio": ["labelstudio", str(out / "labelstudio" / "tasks.json"), "--images", str(tmp_path),
                        "--predictions", "--classes", str(out / "labelstudio" / "classes.txt")],
    }  # fmt: skip
    for tool, args in back.items():
        assert main(["convert", *args, "--out", str(tmp_path / f"{tool}.json")]) == 0
        coco = json.loads((tmp_path / f"{tool}.json").read_text())
        assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "leaf"), (2, "bug"), (3, "moth")], tool
        assert [a["category_id"] for a in coco["annotations"]] == [2], tool


def test_an_export_without_detections_names_every_class(result: Result, tmp_path: Path) -> None:
    export_all(result[:0], tmp_path / "pred")
    assert yaml.safe_load((tmp_path / "pred" / "yolo" / "data.yaml").read_text())["names"] == dict(enumerate(CLASSES))
    out = tmp_path / "t.json"
    assert main(["convert", "yolo", str(tmp_path / "pred" / "yolo" / "data.yaml"), "--out", str(out)]) == 0
    assert [c["name"] for c in json.loads(out.read_text())["categories"]] == CLASSES


def test_convert_classes_spec_names_labels_outside_it(result: Result, tmp_path: Path, capsys) -> None:
    export_all(result, tmp_path / "pred")  # leaf and bug
    labels = tmp_path / "labels.txt"
    labels.write_text("__ignore__\n_background_\nbug\n\nmoth\n")  # LabelMe's own --labels file
    for spec in ("bug,moth", str(labels)):
        out = tmp_path / f"t{len(spec)}.json"
        args = ["convert", "labelme", str(tmp_path / "pred" / "labelme"), "--images", str(tmp_path)]
        assert main([*args, "--classes", spec, "--out", str(out)]) == 0
        coco = json.loads(out.read_text())
        assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "bug"), (2, "moth")]
        assert [a["category_id"] for a in coco["annotations"]] == [1]
        skipped = f"{tmp_path / 'pred' / 'labelme' / 'p1.json'} shape 0: label 'leaf' is not in --classes"
        assert coco["info"]["not_converted"] == [skipped]  # and not the export's manifest: found by a tester
    assert main([*args, "--classes", "bug,bug", "--out", str(tmp_path / "x.json")]) == 2
    assert "names bug more than once" in capsys.readouterr().err


def test_a_rerun_on_fewer_images_removes_the_earlier_files_unless_edited(
    result: Result, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a tester: predicting A/*.png, then A/one.png into the same --out left the first
    run's files of the other images, so converting the folder back mixed the two runs."""
    out, path = tmp_path / "out", Path(result.path)

    def run(names: list[str]) -> None:
        for writer in (LabelMeWriter(out), YoloWriter(out)):
            writer.check({n: path for n in names})
            for k, name in enumerate(names):
                writer.add(k + 1, name, path, result)
            writer.close()

    run(["p1", "p2", "p3"])
    stale = [out / "labelme" / "p2.json", out / "yolo" / "labels" / "p2.txt", out / "yolo" / "images" / "p2.png"]
    assert all(p.is_file() for p in stale)
    edited = out / "labelme" / "p3.json"
    edited.write_text(edited.read_text().replace('"flags": {}', '"flags": {"checked": true}', 1))
    with caplog.at_level(logging.WARNING):
        run(["p1"])
    assert not any(p.exists() for p in stale)  # unchanged since the first run: removed
    assert not (out / "yolo" / "labels" / "p3.txt").exists()
    assert edited.is_file() and "checked" in edited.read_text()  # edited: kept, and named
    assert "kept 1 file(s) of an earlier maskrcnn predict --export" in caplog.text and "p3.json" in caplog.text
    assert sorted(p.name for p in (out / "labelme").glob("p*.json")) == ["p1.json", "p3.json"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(["p1"])  # said again on every rerun while it is there
    assert "p3.json" in caplog.text and edited.is_file()


def test_cvat_export_keeps_predicts_image_ids(result: Result, tmp_path: Path) -> None:
    """Found by a tester: predict's image id 1 came back as 0 through CVAT."""
    writer = CvatWriter(tmp_path / "out")
    writer.add(7, "p1", Path(result.path), result)
    writer.close()
    xml = tmp_path / "out" / "cvat" / "annotations.xml"
    assert [im.get("id") for im in ET.parse(xml).getroot().iterfind("image")] == ["7"]
    coco = cvat_to_coco(xml, tmp_path / "photos", tmp_path / "back.json")
    assert [im["id"] for im in coco["images"]] == [7] and {a["image_id"] for a in coco["annotations"]} == {7}
