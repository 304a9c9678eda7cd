"""predict --labels on nucleus-like 12-bit images: the label image and the measurements are
checked against the masks of predictions.json (decoded by pycocotools) and the raw pixels."""

from __future__ import annotations

import csv
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("skimage")
from skimage.measure import perimeter  # noqa: E402

from maskrcnn.applications import labels as labels_module  # noqa: E402
from maskrcnn.applications.labels import COLUMNS, label_dtype, label_image  # noqa: E402
from maskrcnn.cli import main  # noqa: E402
from maskrcnn.inference.results import Result  # noqa: E402
from maskrcnn.structures import Detections, ModelOutput  # noqa: E402
from maskrcnn.weights.checkpoint import save_checkpoint  # noqa: E402

from ..helpers import tiny_model  # noqa: E402

M = 28  # the stand-in's mask resolution over each box
# Nuclei: (cx, cy, semi-axis x, semi-axis y, 12-bit brightness, label, score). The first two overlap.
NUCLEI = [
    (50, 40, 22, 15, 3000, 1, 0.95),
    (75, 50, 14, 14, 1800, 2, 0.80),
    (140, 60, 18, 25, 2500, 1, 0.70),
    (40, 120, 12, 9, 1200, 1, 0.60),
    (150, 130, 25, 12, 3500, 2, 0.55),
]
H, W = 160, 200


def nucleus_image(seed: int = 0) -> np.ndarray:
    """(H, W) uint16 with 12-bit values: a dark noisy background and bright elliptical nuclei."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, (H, W))
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    for cx, cy, ax, ay, level, _, _ in NUCLEI:
        inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
        image[inside] = rng.normal(level, 50, inside.sum())
    return image.clip(0, 4095).astype(np.uint16)


def nucleus_forward():
    """A stand-in for ``MaskRCNN.forward``: the ``NUCLEI`` as detections (elliptical masks over
    their boxes), best score first, whatever the pixels; records the images it is given."""
    seen = []

    def forward(images, targets=None, propose=None, score_thresh=None):
        seen.extend(im.clone() for im in images)
        boxes = torch.tensor(
            [[cx - ax, cy - ay, cx + ax, cy + ay] for cx, cy, ax, ay, *_ in NUCLEI], dtype=torch.float32
        )
        g = (torch.arange(M) + 0.5) / M * 2 - 1  # cell centres in [-1, 1]
        ellipse = ((g[None, :] ** 2 + g[:, None] ** 2) <= 1).float()  # (M, M)
        det = Detections(
            boxes=boxes,
            scores=torch.tensor([n[6] for n in NUCLEI]),
            labels=torch.tensor([n[5] for n in NUCLEI]),
            masks=ellipse.expand(len(NUCLEI), M, M).clone(),
        )
        return ModelOutput(losses={}, detections=[det for _ in images])

    forward.seen = seen
    return forward


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, tiny_model())
    return path


def test_overlaps_go_to_the_higher_score_whatever_the_order():
    a = np.zeros((6, 8), bool)
    a[1:4, 1:5] = True
    b = np.zeros((6, 8), bool)
    b[2:5, 3:7] = True
    # b is listed first but scores lower: the shared pixels are a's (label 2).
    result = Result(
        np.array([[3, 2, 7, 5], [1, 1, 5, 4]]), np.array([0.3, 0.9]), np.array([1, 1]), (6, 8), masks=np.stack([b, a])
    )
    labels = label_image(result)
    expected = np.zeros((6, 8), np.uint16)
    expected[b] = 1
    expected[a] = 2
    assert labels.dtype == np.uint16 and (labels == expected).all()
    tie = Result(result.boxes, np.array([0.5, 0.5]), result.labels, (6, 8), masks=np.stack([b, a]))
    expected[b] = 1  # equal scores: the earlier object keeps the pixel
    assert (label_image(tie) == expected).all()


def test_more_than_65535_objects_give_a_uint32_label_image(monkeypatch):
    assert label_dtype(0) is np.uint16 and label_dtype(65_535) is np.uint16 and label_dtype(65_536) is np.uint32
    # The image follows the count (a stand-in rule switching at 2 keeps the test fast).
    monkeypatch.setattr(labels_module, "label_dtype", lambda n: np.uint32 if n > 2 else np.uint16)
    masks = np.zeros((3, 4, 4), bool)
    masks[0, 0, 0] = masks[1, 1, 1] = masks[2, 3, 3] = True
    labels = label_image(Result(np.zeros((3, 4)), np.array([0.9, 0.8, 0.7]), np.ones(3), (4, 4), masks=masks))
    assert labels.dtype == np.uint32 and labels[3, 3] == 3 and labels.sum() == 6


def test_predict_labels_writes_a_label_image_and_measurements_that_match_the_predicted_masks(
    tiny_ckpt, tmp_path, monkeypatch, capsys
):
    from maskrcnn.model.mask_rcnn import MaskRCNN

    raw = nucleus_image()
    tifffile.imwrite(tmp_path / "cells.tif", raw)
    forward = nucleus_forward()
    monkeypatch.setattr(
        MaskRCNN, "forward", lambda self, images, targets=None, propose=None, score_thresh=None: forward(images)
    )
    out = tmp_path / "out"
    code = main(
        ["predict", "--weights", str(tiny_ckpt), str(tmp_path / "cells.tif"), "--labels", "--out", str(out), "--quiet"]
    )
    assert code == 0, capsys.readouterr().err

    entries = json.loads((out / "predictions.json").read_text())
    masks = [
        mask_util.decode({"size": e["segmentation"]["size"], "counts": e["segmentation"]["counts"].encode()}).astype(
            bool
        )
        for e in entries
    ]
    assert len(masks) == len(NUCLEI) and (masks[0] & masks[1]).any(), "the first two nuclei overlap"

    # The label image, read back by tifffile: each pixel is 1 + the best-scored mask covering it.
    labels = tifffile.imread(out / "labels" / "cells.tif")
    assert labels.dtype == np.uint16 and labels.shape == (H, W)
    expected = np.zeros((H, W), np.uint16)
    for k in reversed(range(len(masks))):  # predictions.json is best first: paint worst first
        expected[masks[k]] = k + 1
    assert (labels == expected).all()
    with tifffile.TiffFile(out / "labels" / "cells.tif") as tif:
        assert tif.pages[0].compression == 8  # deflate: ImageJ's "ZIP", read by Fiji and CellProfiler

    with open(out / "measurements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS and len(rows) == len(NUCLEI)
    for k, (row, mask, entry) in enumerate(zip(rows, masks, entries)):
        ys, xs = np.nonzero(mask)
        assert int(row["object_id"]) == k + 1 and row["image"] == "cells" and int(row["image_id"]) == entry["image_id"]
        assert row["class"] == ("circle", "square")[NUCLEI[k][5] - 1] and float(row["score"]) == pytest.approx(
            NUCLEI[k][6]
        )
        assert int(row["area"]) == int(
            mask_util.area({"size": [H, W], "counts": entry["segmentation"]["counts"].encode()})
        )
        assert int(row["area_in_labels"]) == int((expected == k + 1).sum())
        assert float(row["centroid_x"]) == pytest.approx(xs.mean(), abs=1e-3)
        assert float(row["centroid_y"]) == pytest.approx(ys.mean(), abs=1e-3)
        assert [float(row[c]) for c in ("box_x1", "box_y1", "box_x2", "box_y2")] == pytest.approx(
            entry["bbox"][:2] + [entry["bbox"][0] + entry["bbox"][2], entry["bbox"][1] + entry["bbox"][3]], abs=1e-3
        )
        # Intensities of the raw 12-bit pixels, not of the 8-bit picture the model saw.
        assert float(row["mean_intensity"]) == pytest.approx(raw[mask].astype(np.float64).mean(), rel=1e-9)
        assert float(row["max_intensity"]) == raw[mask].max()
        # Shape: an ellipse's eccentricity sqrt(1 - b^2 / a^2), to the pixel grid's accuracy;
        # a convex mask's solidity near 1; the perimeter scikit-image gives for the full-frame
        # mask (measured here on a crop), near Ramanujan's for the ellipse (skimage's estimate
        # of a pixelated outline runs up to ~10% long).
        _, _, ax, ay, *_ = NUCLEI[k]
        a, b = max(ax, ay), min(ax, ay)
        assert float(row["eccentricity"]) == pytest.approx(np.sqrt(1 - (b / a) ** 2), abs=0.05)
        assert 0.95 < float(row["solidity"]) <= 1.0
        assert float(row["perimeter"]) == pytest.approx(perimeter(mask), abs=1e-3)
        ramanujan = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
        assert float(row["perimeter"]) == pytest.approx(ramanujan, rel=0.12)

    (record,) = json.loads((out / "images.json").read_text())
    assert record["counts"] == {"circle": 3, "square": 2}

    # A rerun replaces its own files; a user's own measurements.csv is never replaced.
    assert (
        main(
            [
                "predict",
                "--weights",
                str(tiny_ckpt),
                str(tmp_path / "cells.tif"),
                "--labels",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    (out / "measurements.csv").write_text("my,own,table\n")
    capsys.readouterr()
    code = main(
        ["predict", "--weights", str(tiny_ckpt), str(tmp_path / "cells.tif"), "--labels", "--out", str(out), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "measurements.csv exists and was not written by maskrcnn predict" in err
    assert (out / "measurements.csv").read_text() == "my,own,table\n"


def test_labels_without_tifffile_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile now raises ImportError
    code = main(
        [
            "predict",
            "--weights",
            str(tmp_path / "never-loaded.pth"),
            str(tmp_path),
            "--labels",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert (
        code == 2
        and capsys.readouterr().err.strip() == "error: --labels needs tifffile: pip install 'maskrcnn[microscopy]'"
    )
