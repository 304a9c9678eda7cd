from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskrcnn.data import CocoDataset, DatasetError, dsb_to_coco


def _sample(root: Path, sample_id: str, h: int, w: int, masks: list[np.ndarray] | None) -> None:
    (root / sample_id / "images").mkdir(parents=True)
    rgba = np.random.default_rng(0).integers(0, 256, size=(h, w, 4), dtype=np.uint8)  # DSB images are RGBA
    Image.fromarray(rgba, mode="RGBA").save(root / sample_id / "images" / f"{sample_id}.png")
    if masks is not None:
        (root / sample_id / "masks").mkdir()
        for k, m in enumerate(masks):
            Image.fromarray(m.astype(np.uint8) * 255).save(root / sample_id / "masks" / f"m{k}.png")


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def dsb_root(tmp_path: Path) -> Path:
    root = tmp_path / "stage1_train"
    masks = [_rect(10, 12, 1, 4, 2, 7), _rect(10, 12, 6, 10, 9, 12), np.zeros((10, 12), bool)]
    _sample(root, "aaa", 10, 12, masks)
    _sample(root, "bbb", 8, 6, None)  # no masks folder: an image without annotations
    return root


def test_dsb_conversion(dsb_root: Path, tmp_path: Path) -> None:
    coco = dsb_to_coco(dsb_root, tmp_path / "dsb.json")
    assert json.loads((tmp_path / "dsb.json").read_text()) == coco
    assert coco["categories"] == [{"id": 1, "name": "nucleus"}]
    assert coco["images"] == [
        {"id": 1, "file_name": "aaa/images/aaa.png", "width": 12, "height": 10},
        {"id": 2, "file_name": "bbb/images/bbb.png", "width": 6, "height": 8},
    ]
    anns = coco["annotations"]
    assert len(anns) == 2  # the empty mask file is skipped
    assert [a["area"] for a in anns] == [15, 12]  # 3 x 5 and 4 x 3 pixels
    assert [a["bbox"] for a in anns] == [[2, 1, 5, 3], [9, 6, 3, 4]]
    assert all(isinstance(a["segmentation"]["counts"], str) for a in anns)

    ds = CocoDataset(tmp_path / "dsb.json", dsb_root)
    _, t, _ = ds[0]
    np.testing.assert_array_equal(t.masks[0].numpy(), _rect(10, 12, 1, 4, 2, 7))
    np.testing.assert_array_equal(t.masks[1].numpy(), _rect(10, 12, 6, 10, 9, 12))
    assert t.boxes.tolist() == [[2, 1, 7, 4], [9, 6, 12, 10]]
    assert len(ds[1][1]) == 0


def test_dsb_errors(dsb_root: Path, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(dsb_root / "aaa" / "masks" / "small.png")
    with pytest.raises(DatasetError, match=r"small\.png: mask is 5x5, its image 12x10"):
        dsb_to_coco(dsb_root, tmp_path / "x.json")
    (dsb_root / "aaa" / "masks" / "small.png").unlink()
    (dsb_root / "ccc" / "masks").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"ccc: missing image ccc/images/ccc\.png"):
        dsb_to_coco(dsb_root, tmp_path / "x.json")
    with pytest.raises(DatasetError, match="not found"):
        dsb_to_coco(tmp_path / "nowhere", tmp_path / "x.json")
