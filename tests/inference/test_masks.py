"""Masks as RLE: encoding a crop in its frame, against pycocotools' encoding of the full frame."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest

from maskrcnn.inference.masks import crop_to_rle, decode, decode_one, encode

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _frame(crop: np.ndarray, y0: int, x0: int, size: tuple[int, int]) -> np.ndarray:
    full = np.zeros(size, np.uint8)
    full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return full


def test_crop_rle_equals_pycocotools_on_the_full_frame() -> None:
    """Random crops of random density anywhere in small frames, edges and corners included (a
    run down the last row continues at the top of the next column in COCO's column order)."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        size = tuple(int(v) for v in rng.integers(1, 10, 2))
        h, w = int(rng.integers(0, size[0] + 1)), int(rng.integers(0, size[1] + 1))
        y0, x0 = int(rng.integers(0, size[0] - h + 1)), int(rng.integers(0, size[1] - w + 1))
        crop = rng.random((h, w)) < rng.random()
        full = _frame(crop, y0, x0, size)
        ours = crop_to_rle(crop, y0, x0, size)
        theirs = mask_util.encode(np.asfortranarray(full))
        assert ours["counts"] == theirs["counts"] and list(ours["size"]) == list(theirs["size"]), (size, y0, x0, crop)


def test_hand_computed_runs() -> None:
    # 3x4 frame, ones at (row 2, col 0) and (rows 0-1, col 1): column order 0,0,1 | 1,1,0 | 0.. ->
    # runs 2 zeros, 3 ones (the wrap from column 0 into column 1), 7 zeros.
    crop = np.array([[False, True], [False, True], [True, False]])
    rle = crop_to_rle(crop, 0, 0, (3, 4))
    assert rle["counts"] == mask_util.frPyObjects({"size": [3, 4], "counts": [2, 3, 7]}, 3, 4)["counts"]
    assert (
        crop_to_rle(np.zeros((0, 0), bool), 0, 0, (3, 4))["counts"]
        == mask_util.encode(np.zeros((3, 4), np.uint8, order="F"))["counts"]
    )
    with pytest.raises(ValueError, match="not inside"):
        crop_to_rle(np.ones((2, 2), bool), 2, 0, (3, 4))


def test_decode_and_decode_one_round_trip() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((3, 7, 9)) > 0.7
    masks[2] = False
    rles = encode(masks)
    np.testing.assert_array_equal(decode(rles, (7, 9)), masks)
    y0, x0, crop = decode_one(rles[0])
    ys, xs = np.nonzero(masks[0])
    assert (y0, x0, crop.shape) == (ys.min(), xs.min(), (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
    np.testing.assert_array_equal(crop, masks[0, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]])
    assert decode_one(rles[2])[2].shape == (0, 0)


def test_decode_one_reads_only_the_box_and_matches_pycocotools():
    # Random masks, some touching the top and bottom rows, where a run of ones continues from
    # one column into the next; the reference is pycocotools' full-frame decode.
    rng = np.random.default_rng(5)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(1, 30, size=2))
        full = np.zeros((h, w), dtype=np.uint8)
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
        full[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < (1.0 if trial % 4 == 0 else 0.6)
        rle = mask_util.encode(np.asfortranarray(full))
        top, left, crop = decode_one(rle)
        bx, by, bw, bh = (int(v) for v in mask_util.toBbox(rle))
        assert (top, left, crop.shape) == ((by, bx, (bh, bw)) if full.any() else (0, 0, (0, 0)))
        rebuilt = np.zeros((h, w), dtype=bool)
        rebuilt[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
        np.testing.assert_array_equal(rebuilt, mask_util.decode(rle).astype(bool))


def test_decode_one_of_a_small_object_in_a_huge_frame_costs_the_box():
    rle = crop_to_rle(np.ones((3, 4), dtype=bool), 15000, 19000, (20000, 20000))
    top, left, crop = decode_one(rle)  # a full frame would be 400 MB
    assert (top, left) == (15000, 19000) and crop.shape == (3, 4) and crop.all()
