from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from maskrcnn.data import CocoDataset, DatasetError
from maskrcnn.data.transforms import RandomHorizontalFlip
from maskrcnn.structures import Targets

from .helpers import H10, H11, W10, W11, rle_block, write_images

Make = Callable[..., tuple[Path, Path]]


def test_categories_map_to_contiguous_labels(coco_dir: Make) -> None:
    ds = CocoDataset(*coco_dir())
    # Ids 3, 7, 42 (gaps, listed out of order) become labels 1, 2, 3 in increasing id order.
    assert ds.category_ids == [3, 7, 42]
    assert ds.label_to_category_id == {1: 3, 2: 7, 3: 42}
    assert ds.category_id_to_label == {3: 1, 7: 2, 42: 3}
    assert ds.class_names == ["cat", "dog", "zebra"]
    assert ds.num_classes == 3


def test_given_category_order(coco_dir: Make) -> None:
    ds = CocoDataset(*coco_dir(), category_ids=[42, 7, 3, 99])
    assert ds.label_to_category_id == {1: 42, 2: 7, 3: 3, 4: 99}
    assert ds.class_names == ["zebra", "dog", "cat", ""]
    _, t, _ = ds[0]
    assert t.labels.tolist() == [2, 3]  # dog, cat


def test_polygon_rle_and_crowd(coco_dir: Make) -> None:
    ds = CocoDataset(*coco_dir())
    assert len(ds) == 2
    image, t, info = ds[0]
    assert image.shape == (3, H10, W10) and image.dtype == torch.float32
    assert info == {"image_id": 10, "file_name": "a.png", "orig_size": (H10, W10)}
    # The crowd annotation (id 3) is not a training instance.
    assert len(t) == 2
    assert t.labels.tolist() == [2, 1]  # dog (7) polygon, cat (3) RLE
    assert t.boxes.dtype == torch.float32
    assert t.boxes.tolist() == [[2.0, 3.0, 6.0, 8.0], [12.0, 10.0, 15.0, 12.0]]
    assert t.masks.shape == (2, H10, W10) and t.masks.dtype == torch.uint8
    square = np.zeros((H10, W10), np.uint8)
    square[3:8, 2:6] = 1  # counted by hand: rows 3..7, columns 2..5
    np.testing.assert_array_equal(t.masks[0].numpy(), square)
    np.testing.assert_array_equal(t.masks[1].numpy(), rle_block())
    # The crowd annotation stays visible to evaluation.
    assert len(ds.coco.getAnnIds(imgIds=[10])) == 3


def test_compressed_rle(coco_dir: Make) -> None:
    mask = np.zeros((H10, W10), np.uint8)
    mask[0:4, 15:20] = 1
    rle = mask_util.encode(np.asfortranarray(mask))

    def edit(d: dict[str, Any]) -> None:
        d["annotations"][1]["segmentation"] = {"size": [H10, W10], "counts": rle["counts"].decode()}
        d["annotations"][1]["bbox"] = [15, 0, 5, 4]

    _, t, _ = CocoDataset(*coco_dir(edit))[0]
    np.testing.assert_array_equal(t.masks[1].numpy(), mask)
    assert t.boxes[1].tolist() == [15.0, 0.0, 20.0, 4.0]


def test_image_without_annotations_is_a_negative(coco_dir: Make) -> None:
    ds = CocoDataset(*coco_dir())
    image, t, info = ds[1]
    assert image.shape == (3, H11, W11)
    assert len(t) == 0 and t.boxes.shape == (0, 4) and t.labels.dtype == torch.int64
    assert t.masks.shape == (0, H11, W11)
    assert info["file_name"] == "sub/b.png"


def test_image_pixels_and_sizes(coco_dir: Make, tmp_path: Path) -> None:
    ann_file, image_dir = coco_dir()
    arrays = write_images(image_dir)
    ds = CocoDataset(ann_file, image_dir)
    image, _, _ = ds[0]
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255, arrays["a.png"], atol=1e-3)
    assert ds.image_sizes() == [(H10, W10), (H11, W11)]
    assert ds.image_ids == [10, 11]
    ds.validate()
    ds.validate(decode=False)


def test_transforms_are_applied(coco_dir: Make) -> None:
    ds = CocoDataset(*coco_dir(), transforms=RandomHorizontalFlip(p=1.0))
    _, t, _ = ds[0]
    assert t.boxes[0].tolist() == [W10 - 6.0, 3.0, W10 - 2.0, 8.0]


def test_degenerate_annotations_dropped_with_warning(coco_dir: Make, caplog: pytest.LogCaptureFixture) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["annotations"].append(
            {
                "id": 77,
                "image_id": 10,
                "category_id": 3,
                "segmentation": [[1, 1, 1.5, 1, 1.5, 5]],
                "bbox": [1, 1, 0.5, 4],
            }
        )
        d["annotations"].append({"id": 78, "image_id": 11, "category_id": 3, "segmentation": [], "bbox": [1, 1, 4, 4]})

    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.coco"):
        ds = CocoDataset(*coco_dir(edit))
    assert len(ds[0][1]) == 2 and len(ds[1][1]) == 0
    assert "dropped 2 degenerate" in caplog.text and "77" in caplog.text and "78" in caplog.text


def test_edge_tolerance(coco_dir: Make) -> None:
    # Vertices up to 1 px outside the image are accepted and the box is clipped to it.
    def edit(d: dict[str, Any]) -> None:
        d["annotations"][0]["segmentation"] = [[-0.5, 0, W10 + 1, 0, W10 + 1, 4, -0.5, 4]]
        d["annotations"][0]["bbox"] = [-0.5, 0, W10 + 1.5, 4]

    _, t, _ = CocoDataset(*coco_dir(edit))[0]
    assert t.boxes[0].tolist() == [0.0, 0.0, float(W10), 4.0]
    assert t.masks[0].sum() == W10 * 4


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Edit that sets d[k1][k2]... = value for path "k1.k2..." (integers index lists)."""

    def edit(d: dict[str, Any]) -> None:
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = d
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return edit


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = d
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return edit


MALFORMED = [
    ("missing top-level key", _delete("categories"), ["missing top-level key 'categories'"]),
    ("missing image key", _delete("images.1.height"), ["image id 11", "'height'"]),
    ("missing annotation key", _delete("annotations.0.bbox"), ["annotation id 1", "image id 10", "'bbox'"]),
    ("unknown image id", _set("annotations.1.image_id", 999), ["annotation id 2", "unknown image id 999"]),
    (
        "unknown category id",
        _set("annotations.1.category_id", 5),
        ["annotation id 2", "image id 10", "unknown category id 5"],
    ),
    (
        "odd polygon",
        _set("annotations.0.segmentation", [[1, 1, 5, 1, 5]]),
        ["annotation id 1", "image id 10", "odd number"],
    ),
    ("two-point polygon", _set("annotations.0.segmentation", [[1, 1, 5, 1]]), ["annotation id 1", "at least 3"]),
    (
        "polygon out of range",
        _set("annotations.0.segmentation", [[2, 3, 6, 3, 6, 18]]),
        ["annotation id 1", "image id 10", "outside the 20x16 image"],
    ),
    (
        "polygon not numbers",
        _set("annotations.0.segmentation", [[2, 3, "6", 3, 6, 8]]),
        ["annotation id 1", "finite numbers"],
    ),
    (
        "bbox out of range",
        _set("annotations.0.bbox", [15, 3, 8, 5]),
        ["annotation id 1", "image id 10", "bbox", "outside"],
    ),
    ("bbox wrong length", _set("annotations.0.bbox", [1, 2, 3]), ["annotation id 1", "4 finite numbers"]),
    ("RLE size mismatch", _set("annotations.1.segmentation.size", [16, 21]), ["annotation id 2", "RLE size"]),
    ("RLE counts sum", _set("annotations.1.segmentation.counts", [10, 5]), ["annotation id 2", "sum to 15"]),
    ("segmentation type", _set("annotations.1.segmentation", "abc"), ["annotation id 2", "'segmentation' must be"]),
    ("duplicate image id", _set("images.1.id", 10), ["image id 10", "twice"]),
    ("duplicate annotation id", _set("annotations.1.id", 1), ["annotation id 1", "twice"]),
    ("bad width", _set("images.0.width", 0), ["image id 10", "'width'"]),
]


@pytest.mark.parametrize("edit, fragments", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_annotations(coco_dir: Make, edit: Callable[[dict[str, Any]], None], fragments: list[str]) -> None:
    ann_file, image_dir = coco_dir(edit, name="broken.json")
    with pytest.raises(DatasetError) as e:
        CocoDataset(ann_file, image_dir)
    message = str(e.value)
    assert "broken.json" in message
    for fragment in fragments:
        assert fragment in message, message


def test_category_outside_given_list(coco_dir: Make) -> None:
    with pytest.raises(DatasetError, match=r"annotation id 2 .*category id 3 \(cat\) is not among"):
        CocoDataset(*coco_dir(), category_ids=[7, 42])


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DatasetError, match=r"bad\.json: invalid JSON at line 2, column 12"):
        CocoDataset(path, tmp_path)
    with pytest.raises(DatasetError, match="not found.*missing.json"):
        CocoDataset(tmp_path / "missing.json", tmp_path)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DatasetError, match="list.json: expected a JSON object"):
        CocoDataset(tmp_path / "list.json", tmp_path)


def test_missing_and_bad_image_files(coco_dir: Make) -> None:
    ann_file, image_dir = coco_dir()
    (image_dir / "sub" / "b.png").unlink()
    (image_dir / "a.png").write_bytes(b"garbage")
    ds = CocoDataset(ann_file, image_dir)  # files are read lazily
    with pytest.raises(DatasetError, match=r"cannot decode image .*a\.png"):
        ds[0]
    with pytest.raises(DatasetError, match=r"not found: .*sub/b\.png"):
        ds[1]
    with pytest.raises(DatasetError) as e:
        ds.validate()
    assert "2 of 2 images are bad" in str(e.value)
    assert "image id 10" in str(e.value) and "image id 11" in str(e.value) and "b.png" in str(e.value)


def test_image_size_mismatch(coco_dir: Make) -> None:
    ann_file, image_dir = coco_dir()
    data = json.loads(ann_file.read_text())
    data["images"][0]["width"], data["images"][0]["height"] = H10, W10  # swapped, as with EXIF rotation
    data["annotations"] = data["annotations"][:1]  # the polygon fits either way; the RLEs would not
    ann_file.write_text(json.dumps(data))
    ds = CocoDataset(ann_file, image_dir)
    with pytest.raises(
        DatasetError, match=r"a\.png is 20x16 .* says 16x20 for image id 10; height and width are swapped"
    ):
        ds[0]
    with pytest.raises(DatasetError, match="image id 10"):
        ds.validate(decode=False)


def test_bad_compressed_rle_named_at_load(coco_dir: Make) -> None:
    ds = CocoDataset(*coco_dir(_set("annotations.1.segmentation", {"size": [H10, W10], "counts": "\x01\x02"})))
    with pytest.raises(DatasetError, match="annotation id 2 .*segmentation"):
        ds[0]


def test_targets_index_and_repr(coco_dir: Make) -> None:
    ds = CocoDataset(*coco_dir())
    t = ds.get_targets(0)
    assert isinstance(t, Targets) and len(t[1]) == 1
    assert "2 images, 2 instances, 3 classes" in repr(ds)


# ---- file names confined to the image folder --------------------------------------------


@pytest.mark.parametrize("name", ["../secret/x.png", "sub/../../secret/x.png", "ABS"])
def test_file_names_cannot_leave_the_image_folder(coco_dir: Make, tmp_path: Path, name: str) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    write_images(secret)  # a readable image outside the folder: the dataset must not open it
    (secret / "x.png").write_bytes((secret / "a.png").read_bytes())
    file_name = str(secret / "x.png") if name == "ABS" else name
    ann_file, image_dir = coco_dir(lambda d: d["images"][0].update(file_name=file_name), name="escape.json")
    with pytest.raises(DatasetError) as e:
        CocoDataset(ann_file, image_dir)
    message = str(e.value)
    for fragment in ("escape.json", "image id 10", file_name, "outside the image folder", "allow_outside_root"):
        assert fragment in message, message
    # Explicitly allowed: the file outside is read (its pixels are a.png's).
    ds = CocoDataset(ann_file, image_dir, allow_outside_root=True)
    assert ds.image_path(0).resolve() == (secret / "x.png").resolve()
    assert ds[0][0].shape == (3, H10, W10)


def test_names_that_stay_inside_and_symlinks_inside_the_folder(coco_dir: Make, tmp_path: Path) -> None:
    # "sub/../a.png" never leaves the folder; a symlink the user put in the folder is followed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    arrays = write_images(elsewhere)

    def edit(d: dict[str, Any]) -> None:
        d["images"][0]["file_name"] = "sub/../a.png"
        d["images"][1]["file_name"] = "linked/sub/b.png"

    ann_file, image_dir = coco_dir(edit)
    (image_dir / "linked").symlink_to(elsewhere, target_is_directory=True)
    ds = CocoDataset(ann_file, image_dir)
    ds.validate()
    np.testing.assert_allclose(ds[1][0].permute(1, 2, 0).numpy() * 255, arrays["sub/b.png"], atol=1e-3)


# ---- empty datasets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda d: d.update(images=[], annotations=[]), "no images"),
        (lambda d: d.update(categories=[], annotations=[]), "no categories"),
        (lambda d: d.update(annotations=[]), "no instances"),
        (lambda d: d.update(annotations=[dict(d["annotations"][2])]), "no instances"),  # only a crowd region
    ],
    ids=["no images", "no categories", "no annotations", "crowd only"],
)
def test_empty_dataset_is_an_error(coco_dir: Make, edit: Callable[[dict[str, Any]], None], fragment: str) -> None:
    ann_file, image_dir = coco_dir(edit, name="empty.json")
    with pytest.raises(DatasetError, match=rf"empty\.json: {fragment}"):
        CocoDataset(ann_file, image_dir)


# ---- checking every image up front -------------------------------------------------------


def test_bad_images_lists_every_problem_and_first_limits_the_check(coco_dir: Make) -> None:
    ann_file, image_dir = coco_dir()
    (image_dir / "sub" / "b.png").unlink()
    ds = CocoDataset(ann_file, image_dir)
    assert ds.bad_images(first=1) == {}  # only image 10 (present) is checked
    ds.validate(decode=False, first=1)
    bad = ds.bad_images()
    assert list(bad) == [11] and "not found" in bad[11] and "b.png" in bad[11]
    with pytest.raises(DatasetError, match=r"1 of 2 images are bad"):
        ds.validate(decode=False)


def test_one_parser_for_training_and_evaluation(coco_dir: Make) -> None:
    """read_coco is what CocoDataset reads with: the records it returns are the dataset's."""
    from maskrcnn.data.coco import read_coco

    ann_file, _ = coco_dir()
    parsed = read_coco(ann_file)
    assert parsed.categories == {42: "zebra", 3: "cat", 7: "dog"}
    assert [(i, r.file_name, r.height, r.width) for i, r in parsed.images.items()] == [
        (10, "a.png", H10, W10),
        (11, "sub/b.png", H11, W11),
    ]
    assert [(a.ann_id, a.iscrowd, a.box) for a in parsed.annotations] == [
        (1, False, (2.0, 3.0, 6.0, 8.0)),
        (2, False, (12.0, 10.0, 15.0, 12.0)),
        (3, True, (0.0, 0.0, W10, H10)),
    ]
    coco = parsed.to_pycocotools()
    assert sorted(coco.getImgIds()) == [10, 11] and len(coco.getAnnIds()) == 3
