"""Data Science Bowl 2018 nucleus folders -> COCO instance JSON with RLE masks.

Layout: ``root/<ID>/images/<ID>.png`` and ``root/<ID>/masks/*.png``, one binary PNG per
instance (nonzero pixels are the nucleus). A sample without a ``masks`` folder (the test
stages) becomes an image without annotations.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_util

from .errors import DatasetError
from ..results import write_json
from .images import image_size

logger = logging.getLogger(__name__)


def _read_mask(path: Path) -> np.ndarray:
    """(H, W) bool of the nonzero pixels of a mask PNG."""
    try:
        with Image.open(path) as img:
            a = np.asarray(img)
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"cannot decode mask {path}: {e}") from None
    return (a.max(axis=2) if a.ndim == 3 else a) > 0


def dsb_to_coco(root: str | Path, out_json: str | Path, category_name: str = "nucleus") -> dict[str, Any]:
    """Convert a DSB 2018 stage folder to COCO JSON and write it.

    Args:
        root: folder of sample folders ``<ID>/images/<ID>.png``, ``<ID>/masks/*.png``.
        out_json: where to write the COCO JSON; ``file_name`` is relative to ``root``, so
            ``CocoDataset(out_json, root)`` reads it.
        category_name: name of the single category (id 1).

    Returns:
        The COCO dict written; segmentations are compressed RLE with ``counts`` as str.

    Raises:
        DatasetError: a sample folder lacks its image, or a mask is undecodable or of
            another size than its image.
    """
    root, out_json = Path(root), Path(out_json)
    if not root.is_dir():
        raise DatasetError(f"DSB folder not found: {root}")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    empty = 0
    for sample in sorted(p for p in root.iterdir() if p.is_dir()):
        image_path = sample / "images" / f"{sample.name}.png"
        if not image_path.is_file():
            raise DatasetError(f"{sample}: missing image {image_path.relative_to(root)}")
        h, w = image_size(image_path)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": image_path.relative_to(root).as_posix(), "width": w, "height": h})
        for mask_path in sorted((sample / "masks").glob("*.png")):
            mask = _read_mask(mask_path)
            if mask.shape != (h, w):
                raise DatasetError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {w}x{h}")
            if not mask.any():
                empty += 1
                continue
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
            })
    if not images:
        raise DatasetError(f"{root}: no sample folders <ID>/images/<ID>.png found")
    if empty:
        logger.warning("%s: skipped %d empty mask file(s)", root, empty)
    coco = {
        "info": {"description": f"converted from DSB 2018 folder {root.name}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": category_name}],
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    write_json(coco, out_json)
    logger.info("%s: %d images, %d instances -> %s", root, len(images), len(annotations), out_json)
    return coco
