"""Synthetic 12-bit nucleus images (16-bit TIFFs, COCO RLE annotations) and a GeoTIFF of bright
crowns, for trying ``docs/applications.md``'s recipes without a dataset of your own.

    python benchmarks/applications/make_nuclei.py runs/nuclei

writes ``train/`` and ``val/`` (``cell_000.tif`` ...), ``train.json``, ``val.json`` and
``field.tif`` (3-band uint8, EPSG:32633, 0.5 m pixels) under the folder given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import tifffile
from scipy.ndimage import gaussian_filter


def ellipses(rng: np.random.Generator, h: int, w: int, count: int, axes: tuple[float, float]) -> list[np.ndarray]:
    """Up to ``count`` non-overlapping rotated ellipse masks (h, w) bool."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    taken = np.zeros((h, w), bool)
    masks = []
    for _ in range(count * 5):
        if len(masks) == count:
            break
        a, b = rng.uniform(*axes), rng.uniform(*axes)
        cx, cy, t = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        mask = (u / a) ** 2 + (v / b) ** 2 <= 1
        if mask.sum() < 20 or (mask & taken).any():
            continue
        taken |= mask
        masks.append(mask)
    return masks


def nucleus_image(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, list[np.ndarray]]:
    """(size, size) uint16 with 12-bit values: dim background, nuclei of varied brightness."""
    masks = ellipses(rng, size, size, int(rng.integers(8, 20)), (size / 40, size / 16))
    image = rng.normal(120, 15, (size, size))
    for mask in masks:
        image[mask] = rng.uniform(600, 3200) * (1 + 0.15 * rng.standard_normal(mask.sum()))
    image = gaussian_filter(image, 1.0) + rng.normal(0, 20, image.shape)
    return image.clip(0, 4095).astype(np.uint16), masks


def write_split(root: Path, split: str, n: int, rng: np.random.Generator, size: int) -> None:
    images, annotations = [], []
    (root / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, masks = nucleus_image(rng, size)
        name = f"cell_{i:03d}.tif"
        tifffile.imwrite(root / split / name, image)
        images.append({"id": i + 1, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        for mask in masks:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "area": int(mask.sum()),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "nucleus"}]}
    (root / f"{split}.json").write_text(json.dumps(coco))


def write_field(path: Path, rng: np.random.Generator, h: int = 1500, w: int = 2000) -> None:
    """Bright round crowns on dark ground, as a 3-band uint8 GeoTIFF in UTM 33N."""
    import rasterio
    from rasterio.transform import from_origin

    ground = gaussian_filter(rng.normal(40, 8, (h, w)), 2)
    for mask in ellipses(rng, h, w, 120, (8, 20)):
        ground[mask] = rng.uniform(150, 230)
    rgb = np.stack([ground * 0.8, ground, ground * 0.6]).clip(0, 255).astype(np.uint8)  # (3, H, W)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=h,
        width=w,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500_000, 4_650_000, 0.5, 0.5),
        tiled=True,
    ) as ds:
        ds.write(rgb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=60)
    p.add_argument("--val", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="image side in pixels (nuclei are 1/20 to 1/8 of it across)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    write_split(args.out, "train", args.train, rng, args.size)
    write_split(args.out, "val", args.val, rng, args.size)
    write_field(args.out / "field.tif", rng)
    print(f"{args.train} + {args.val} nucleus images and field.tif -> {args.out}/")


if __name__ == "__main__":
    main()
