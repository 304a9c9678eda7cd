"""Data Science Bowl 2018 nucleus folders -> COCO instance JSON with RLE masks.

Layout: ``root/<ID>/images/<ID>.png`` and ``root/<ID>/masks/*.png``, one binary mask image
per instance. A sample without a ``masks`` folder (the test stages) becomes an image without
annotations.

A mask's instance pixels are the non-zero pixels of its grey or colour content: alpha is not
content, so an RGBA mask counts as composited over black (colour non-zero where alpha is
non-zero), and an opaque alpha channel does not make the whole image an instance. Masks may be
PNG, TIFF, BMP or GIF (lossless); a JPEG mask is an error, since its compression noise would
become instance pixels; other files in ``masks/`` are skipped with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_util

from ..files import write_json
from .errors import DatasetError
from .images import image_size

logger = logging.getLogger(__name__)


# Mask file suffixes read (lossless formats), and lossy ones refused.
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif")
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")


def _read_mask(path: Path) -> np.ndarray:
    """(H, W) bool of the instance pixels of a mask image, after EXIF orientation like its image."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # also forces the full decode
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
                rgba = np.asarray(img.convert("RGBA"))  # (H, W, 4)
                return (rgba[..., :3].max(axis=2) > 0) & (rgba[..., 3] > 0)
            if img.mode in ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
                return np.nan_to_num(np.asarray(img, dtype=np.float64)) != 0
            return np.asarray(img.convert("RGB")).max(axis=2) > 0  # palette, CMYK, YCbCr, ...
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"cannot decode mask {path}: {e}") from None


def _mask_files(masks: Path, ignored: list[str]) -> list[Path]:
    """The mask images in ``masks`` (sorted); other visible files are appended to ``ignored``."""
    files = []
    for path in sorted(masks.iterdir()) if masks.is_dir() else []:
        suffix = path.suffix.lower()
        if suffix in LOSSY_SUFFIXES:
            raise DatasetError(
                f"{path}: a {suffix} mask is lossy (its noise would become instance pixels); "
                f"save masks as {', '.join(MASK_SUFFIXES)}"
            )
        if suffix in MASK_SUFFIXES and path.is_file():
            files.append(path)
        elif not path.name.startswith("."):
            ignored.append(str(path))
    return files


def dsb_to_coco(root: str | Path, out_json: str | Path, category_name: str = "nucleus") -> dict[str, Any]:
    """Convert a DSB 2018 stage folder to COCO JSON and write it.

    Args:
        root: folder of sample folders ``<ID>/images/<ID>.png``, ``<ID>/masks/*.png``
            (or ``.tif``, ``.tiff``, ``.bmp``, ``.gif``).
        out_json: where to write the COCO JSON; ``file_name`` is relative to ``root``, so
            ``CocoDataset(out_json, root)`` reads it.
        category_name: name of the single category (id 1).

    Returns:
        The COCO dict written; segmentations are compressed RLE with ``counts`` as str.

    Raises:
        DatasetError: a sample folder lacks its image, or a mask is undecodable, lossy
            (JPEG) or of another size than its image.
    """
    root, out_json = Path(root), Path(out_json)
    if not root.is_dir():
        raise DatasetError(f"DSB folder not found: {root}")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    empty, ignored = 0, []
    for sample in sorted(p for p in root.iterdir() if p.is_dir()):
        image_path = sample / "images" / f"{sample.name}.png"
        if not image_path.is_file():
            raise DatasetError(f"{sample}: missing image {image_path.relative_to(root)}")
        h, w = image_size(image_path)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": image_path.relative_to(root).as_posix(), "width": w, "height": h})
        for mask_path in _mask_files(sample / "masks", ignored):
            mask = _read_mask(mask_path)
            if mask.shape != (h, w):
                raise DatasetError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {w}x{h}")
            if not mask.any():
                empty += 1
                continue
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                }
            )
    if not images:
        raise DatasetError(f"{root}: no sample folders <ID>/images/<ID>.png found")
    if empty:
        logger.warning("%s: skipped %d empty mask file(s)", root, empty)
    if ignored:
        logger.warning(
            "%s: ignored %d file(s) in masks/ folders that are not mask images: %s%s",
            root,
            len(ignored),
            ", ".join(ignored[:5]),
            ", ..." if len(ignored) > 5 else "",
        )
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
