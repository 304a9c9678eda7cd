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


def _one_sample(root: Path, h: int = 10, w: int = 12) -> Path:
    _sample(root, "aaa", h, w, [])
    return root / "aaa" / "masks"


def test_rgba_masks_use_their_colour_not_their_alpha(tmp_path: Path) -> None:
    """Was: an opaque alpha channel made every pixel an instance pixel."""
    masks = _one_sample(tmp_path / "dsb")
    rect = _rect(10, 12, 2, 5, 3, 9)  # 3 x 6 = 18 pixels
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[rect, :3] = 255
    rgba[..., 3] = 255  # opaque everywhere
    Image.fromarray(rgba, mode="RGBA").save(masks / "opaque.png")
    # White everywhere, the shape in the alpha channel: composited over black, only the shape shows.
    cut_out = np.full((10, 12, 4), 255, np.uint8)
    cut_out[..., 3] = _rect(10, 12, 6, 9, 0, 2).astype(np.uint8) * 255  # 3 x 2 = 6 pixels
    Image.fromarray(cut_out, mode="RGBA").save(masks / "z_alpha.png")
    coco = dsb_to_coco(tmp_path / "dsb", tmp_path / "dsb.json")
    assert [a["area"] for a in coco["annotations"]] == [18, 6]
    assert [a["bbox"] for a in coco["annotations"]] == [[3, 2, 6, 3], [0, 6, 2, 3]]


def test_tiff_palette_and_16_bit_masks_are_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Was: .tif/.tiff masks silently ignored."""
    masks = _one_sample(tmp_path / "dsb")
    Image.fromarray(_rect(10, 12, 0, 2, 0, 3).astype(np.uint8) * 255).save(masks / "a.tif")  # 6 px
    Image.fromarray(_rect(10, 12, 0, 4, 5, 6).astype(np.uint8)).save(masks / "b.tiff")  # 4 px, values 0/1
    wide = Image.fromarray(_rect(10, 12, 8, 10, 0, 5).astype(np.uint16) * 65535)  # 10 px, 16-bit
    wide.save(masks / "c.png")
    pal = Image.fromarray(_rect(10, 12, 5, 6, 5, 12).astype(np.uint8), mode="L").convert("P")  # 7 px
    pal.save(masks / "d.png")
    (masks / "README.txt").write_text("not a mask")
    with caplog.at_level("WARNING", logger="maskrcnn.data.dsb"):
        coco = dsb_to_coco(tmp_path / "dsb", tmp_path / "dsb.json")
    assert [a["area"] for a in coco["annotations"]] == [6, 4, 10, 7]
    assert "README.txt" in caplog.text


def test_lossy_masks_are_an_error(tmp_path: Path) -> None:
    masks = _one_sample(tmp_path / "dsb")
    Image.fromarray(_rect(10, 12, 0, 2, 0, 3).astype(np.uint8) * 255).save(masks / "a.jpg")
    with pytest.raises(DatasetError, match=r"a\.jpg: .*lossy"):
        dsb_to_coco(tmp_path / "dsb", tmp_path / "dsb.json")
