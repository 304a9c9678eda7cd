"""Tiny hand-made COCO datasets whose masks can be counted by hand: the sizes, masks and
annotations that the ``coco_dir`` fixture (conftest.py) writes, for the tests to check against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Image 10 is 20 wide, 16 high; image 11 (no annotations) is 12 wide, 14 high (portrait).
W10, H10 = 20, 16
W11, H11 = 12, 14

# The polygon square covers pixel columns 2..5 and rows 3..7: 4 x 5 = 20 pixels.
SQUARE = [2.0, 3.0, 6.0, 3.0, 6.0, 8.0, 2.0, 8.0]


def rle_counts_by_hand(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE of a (H, W) 0/1 mask: run lengths in column-major order, zeros first."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return [int(c) for c in counts]


def rle_block() -> np.ndarray:
    """(H10, W10) mask of rows 10..11, columns 12..14: 6 pixels."""
    m = np.zeros((H10, W10), dtype=np.uint8)
    m[10:12, 12:15] = 1
    return m


def base_coco() -> dict[str, Any]:
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": W10, "height": H10},
            {"id": 11, "file_name": "sub/b.png", "width": W11, "height": H11},
        ],
        "categories": [
            {"id": 42, "name": "zebra"},
            {"id": 3, "name": "cat"},
            {"id": 7, "name": "dog"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 10,
                "category_id": 7,
                "iscrowd": 0,
                "segmentation": [list(SQUARE)],
                "bbox": [2.0, 3.0, 4.0, 5.0],
                "area": 20.0,
            },
            {
                "id": 2,
                "image_id": 10,
                "category_id": 3,
                "iscrowd": 0,
                "segmentation": {"size": [H10, W10], "counts": rle_counts_by_hand(rle_block())},
                "bbox": [12, 10, 3, 2],
                "area": 6,
            },
            {
                "id": 3,
                "image_id": 10,
                "category_id": 42,
                "iscrowd": 1,
                "segmentation": {"size": [H10, W10], "counts": rle_counts_by_hand(np.ones((H10, W10), np.uint8))},
                "bbox": [0, 0, W10, H10],
                "area": W10 * H10,
            },
        ],
    }


def write_images(image_dir: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "a.png": rng.integers(0, 256, size=(H10, W10, 3), dtype=np.uint8),
        "sub/b.png": rng.integers(0, 256, size=(H11, W11, 3), dtype=np.uint8),
    }
    for name, a in arrays.items():
        (image_dir / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(image_dir / name)
    return arrays
