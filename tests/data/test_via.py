from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from maskrcnn.data import CocoDataset, DatasetError, via_to_coco

# ../shared beside the repo root, or where MASKRCNN_SHARED points (as tests/helpers.py reads it).
SHARED = Path(os.environ.get("MASKRCNN_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
KUDZU = SHARED / "data" / "kudzu_bug"


def _region(shape: dict[str, Any], **attrs: Any) -> dict[str, Any]:
    return {"shape_attributes": shape, "region_attributes": attrs}


def _write_images(image_dir: Path, names: dict[str, tuple[int, int]]) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in names.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(image_dir / name)


@pytest.fixture
def via_file(tmp_path: Path) -> Path:
    _write_images(tmp_path / "img", {"p_one.png": (16, 20), "p_two.png": (30, 10)})
    via = {
        "one.png123": {
            "filename": "one.png",
            "size": 123,
            "file_attributes": {},
            "regions": [
                _region({"name": "rect", "x": 2, "y": 3, "width": 4, "height": 5}, kind="bug"),
                _region({"name": "polygon", "all_points_x": [10, 14, 14], "all_points_y": [2, 2, 6]}, kind="leaf"),
                _region({"name": "point", "cx": 3, "cy": 3}, kind="bug"),
                _region({"name": "circle", "cx": 10, "cy": 10, "r": 4}, kind={"bug": True, "leaf": False}),
            ],
        },
        "two.png9": {
            "filename": "two.png",
            "size": 9,
            "file_attributes": {},
            # VIA 1.x style: regions keyed by index; vertices slightly outside get clipped.
            "regions": {
                "0": _region({"name": "polygon", "all_points_x": [-1, 5, 5], "all_points_y": [0, 0, 31]}, kind="bug")
            },
        },
    }
    path = tmp_path / "via.json"
    path.write_text(json.dumps(via))
    return path


def test_conversion_by_hand(via_file: Path, tmp_path: Path) -> None:
    coco = via_to_coco(via_file, tmp_path / "img", tmp_path / "out" / "coco.json", filename_map="p_")
    assert json.loads((tmp_path / "out" / "coco.json").read_text()) == coco
    assert coco["images"] == [
        {"id": 1, "file_name": "p_one.png", "width": 20, "height": 16},
        {"id": 2, "file_name": "p_two.png", "width": 10, "height": 30},
    ]
    assert coco["categories"] == [{"id": 1, "name": "object"}]
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3, 4] and [a["image_id"] for a in anns] == [1, 1, 1, 2]
    rect, tri, circle, clipped = anns
    assert rect["segmentation"] == [[2, 3, 6, 3, 6, 8, 2, 8]]
    assert rect["area"] == 20 and rect["bbox"] == [2, 3, 4, 5]
    assert tri["area"] == 8 and tri["bbox"] == [10, 2, 4, 4]
    assert circle["area"] == pytest.approx(np.pi * 16, rel=0.02)  # 32-gon inscribed in r = 4
    assert circle["bbox"] == pytest.approx([6, 6, 8, 8], abs=0.1)
    # cut at x = 0 (where the edge to (-1, 0) crosses it, y = 31 / 6) and at y = 30, not pushed to the edges
    assert clipped["segmentation"] == [pytest.approx([5 - 6 / 31, 30, 0, 31 / 6, 0, 0, 5, 0, 5, 30])]
    # It loads back; the rectangle's mask has the 20 pixels counted by hand.
    ds = CocoDataset(tmp_path / "out" / "coco.json", tmp_path / "img")
    _, t, _ = ds[0]
    assert t.masks[0].sum() == 20 and t.boxes[0].tolist() == [2, 3, 6, 8]


def test_category_attribute_and_callable_map(via_file: Path, tmp_path: Path) -> None:
    coco = via_to_coco(
        via_file,
        tmp_path / "img",
        tmp_path / "c.json",
        category_attribute="kind",
        filename_map=lambda name: "p_" + name,
    )
    assert coco["categories"] == [{"id": 1, "name": "bug"}, {"id": 2, "name": "leaf"}]
    assert [a["category_id"] for a in coco["annotations"]] == [1, 2, 1, 1]


def test_project_file_format(via_file: Path, tmp_path: Path) -> None:
    project = {"_via_settings": {}, "_via_img_metadata": json.loads(via_file.read_text()), "_via_attributes": {}}
    (tmp_path / "project.json").write_text(json.dumps(project))
    coco = via_to_coco(tmp_path / "project.json", tmp_path / "img", tmp_path / "c.json", filename_map="p_")
    assert len(coco["annotations"]) == 4


def _broken(via_file: Path, edit: Any) -> Path:
    via = json.loads(via_file.read_text())
    edit(via)
    via_file.write_text(json.dumps(via))
    return via_file


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (
            lambda v: v["one.png123"]["regions"][1]["shape_attributes"].pop("all_points_y"),
            ["entry 'one.png123' region 1", "'all_points_y'"],
        ),
        (
            lambda v: v["one.png123"]["regions"][0]["shape_attributes"].update(name="blob"),
            ["entry 'one.png123' region 0", "unsupported region shape 'blob'"],
        ),
        (lambda v: v["two.png9"].pop("regions"), ["entry 'two.png9'", "'regions'"]),
        (lambda v: v["two.png9"].update(filename="three.png"), ["entry 'two.png9'", "not found", "p_three.png"]),
        (
            lambda v: v["one.png123"]["regions"][1]["shape_attributes"].update(all_points_y=[1, 2]),
            ["region 1", "3 x but 2 y"],
        ),
    ],
)
def test_malformed_via(via_file: Path, tmp_path: Path, edit: Any, fragments: list[str]) -> None:
    with pytest.raises(DatasetError) as e:
        via_to_coco(_broken(via_file, edit), tmp_path / "img", tmp_path / "c.json", filename_map="p_")
    message = str(e.value)
    assert "via.json" in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_category_attribute(via_file: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="region 0 .*lack the category attribute 'species'"):
        via_to_coco(via_file, tmp_path / "img", tmp_path / "c.json", category_attribute="species", filename_map="p_")


def test_invalid_via_json(tmp_path: Path) -> None:
    (tmp_path / "v.json").write_text('{"a": \n\n [1, 2')
    with pytest.raises(DatasetError, match=r"v\.json: invalid JSON at line 3"):
        via_to_coco(tmp_path / "v.json", tmp_path, tmp_path / "c.json")


@pytest.mark.skipif(not KUDZU.is_dir(), reason=f"shared kudzu data not present at {KUDZU}")
@pytest.mark.parametrize("split", ["train", "val"])
def test_kudzu_matches_shipped_coco(tmp_path: Path, split: str) -> None:
    coco = via_to_coco(
        KUDZU / "via" / split / "via_region_data.json",
        KUDZU / "images",
        tmp_path / "c.json",
        category_name="kudzu",
        filename_map=f"{split}_",
    )
    shipped = json.loads((KUDZU / "annotations" / f"instances_{split}.json").read_text())
    assert [c["name"] for c in coco["categories"]] == [c["name"] for c in shipped["categories"]] == ["kudzu"]

    def by_file(d: dict[str, Any]) -> dict[str, tuple[tuple[int, int], list[Any]]]:
        files = {im["id"]: im for im in d["images"]}
        out = {im["file_name"]: ((im["width"], im["height"]), []) for im in d["images"]}
        for a in sorted(d["annotations"], key=lambda a: a["id"]):
            out[files[a["image_id"]]["file_name"]][1].append((a["segmentation"], a["area"], a["bbox"], a["iscrowd"]))
        return out

    ours, theirs = by_file(coco), by_file(shipped)
    assert sorted(ours) == sorted(theirs)
    assert sum(len(v[1]) for v in ours.values()) == len(shipped["annotations"])
    for name in theirs:
        assert ours[name] == theirs[name], name


@pytest.mark.skipif(not KUDZU.is_dir(), reason=f"shared kudzu data not present at {KUDZU}")
def test_kudzu_loads(tmp_path: Path) -> None:
    via_to_coco(
        KUDZU / "via" / "val" / "via_region_data.json", KUDZU / "images", tmp_path / "c.json", filename_map="val_"
    )
    ds = CocoDataset(tmp_path / "c.json", KUDZU / "images")
    image, t, info = ds[0]
    assert info["file_name"].startswith("val_") and image.shape[1:] == info["orig_size"]
    assert len(t) > 0 and bool((t.masks.flatten(1).sum(1) > 0).all())
    for box, mask in zip(t.boxes, t.masks):  # the polygon's extent is the mask's box within 1 px
        ys, xs = np.nonzero(mask.numpy())
        assert np.allclose(box.numpy(), [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1)


# ---- values that are not coordinates ---------------------------------------------------------


@pytest.mark.parametrize(
    "shape, fragment",
    [
        ({"name": "polygon", "all_points_x": [10, "nan", 14], "all_points_y": [2, 2, 6]}, "not finite"),
        ({"name": "polygon", "all_points_x": [10, float("nan"), 14], "all_points_y": [2, 2, 6]}, "not finite"),
        ({"name": "polygon", "all_points_x": [10, 12, 14], "all_points_y": [2, float("inf"), 6]}, "not finite"),
        ({"name": "rect", "x": "nan", "y": 3, "width": 4, "height": 5}, "not finite"),
        ({"name": "circle", "cx": 10, "cy": 10, "r": float("inf")}, "not finite"),
        # a string where the list of points belongs was read character by character: x = 1, 0, 1, 2, 1, 4
        (
            {"name": "polygon", "all_points_x": "101214", "all_points_y": [2, 2, 6, 6, 2, 2]},
            "'all_points_x' must be a list",
        ),
        ({"name": "polygon", "all_points_x": [10, 12, 14], "all_points_y": [2, True, 6]}, "not a number"),
    ],
)
def test_coordinates_must_be_finite_numbers(
    via_file: Path, tmp_path: Path, shape: dict[str, Any], fragment: str
) -> None:
    def edit(v: dict[str, Any]) -> None:
        v["one.png123"]["regions"][1]["shape_attributes"] = shape

    with pytest.raises(DatasetError) as e:
        via_to_coco(_broken(via_file, edit), tmp_path / "img", tmp_path / "c.json", filename_map="p_")
    message = str(e.value)
    assert "entry 'one.png123' region 1" in message and fragment in message, message
    assert not (tmp_path / "c.json").exists()


# ---- file names confined to the image folder ---------------------------------------------


@pytest.mark.parametrize("filename", ["../secret/p_one.png", "ABS"])
def test_file_names_cannot_leave_the_image_folder(via_file: Path, tmp_path: Path, filename: str) -> None:
    _write_images(tmp_path / "secret", {"p_one.png": (16, 20)})
    name = str(tmp_path / "secret" / "p_one.png") if filename == "ABS" else filename

    def edit(v: dict[str, Any]) -> None:
        v["one.png123"]["filename"] = name

    via = _broken(via_file, edit)
    with pytest.raises(DatasetError) as e:
        via_to_coco(via, tmp_path / "img", tmp_path / "c.json")
    message = str(e.value)
    assert "entry 'one.png123'" in message and "outside the image folder" in message and name in message
    assert not (tmp_path / "c.json").exists()
    # Allowed explicitly: the name is written through as given, and the dataset opens it when allowed too.
    (tmp_path / "img" / "two.png").write_bytes((tmp_path / "img" / "p_two.png").read_bytes())
    coco = via_to_coco(via, tmp_path / "img", tmp_path / "c.json", allow_outside_root=True)
    assert coco["images"][0]["file_name"] == name
    with pytest.raises(DatasetError, match="outside the image folder"):
        CocoDataset(tmp_path / "c.json", tmp_path / "img")
    assert CocoDataset(tmp_path / "c.json", tmp_path / "img", allow_outside_root=True)[0][0].shape == (3, 16, 20)


def test_convert_via_command_line_refuses_names_outside_the_folder(via_file: Path, tmp_path: Path, capsys) -> None:
    from maskrcnn.cli import main

    _write_images(tmp_path / "secret", {"one.png": (16, 20), "two.png": (30, 10)})
    args = [
        "convert",
        "via",
        str(via_file),
        "--images",
        str(tmp_path / "img"),
        "--prefix",
        "../secret/",
        "--out",
        str(tmp_path / "c.json"),
    ]
    assert main(args) == 2
    assert "outside the image folder" in capsys.readouterr().err
    assert main([*args, "--allow-outside-root"]) == 0
    assert [im["file_name"] for im in json.loads((tmp_path / "c.json").read_text())["images"]] == [
        "../secret/one.png",
        "../secret/two.png",
    ]
