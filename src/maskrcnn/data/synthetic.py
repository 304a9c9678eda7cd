"""Built-in synthetic datasets, written as PNG images plus COCO JSON with RLE masks.

* ``shapes``: circles, squares and triangles (3 categories) of random colour, size and
  rotation on a noisy random background.
* ``digits``: scenes of handwritten digits "0".."9" (10 categories) cut from scikit-learn's
  bundled ``load_digits()`` 8x8 images, upscaled, the MNIST-style toy example of the seed
  paper's section 5.1.1. Train and val scenes use disjoint digit samples.

Objects may overlap; a later object occludes earlier ones, whose masks lose the covered
pixels, and an object left with fewer than ``min_visible`` pixels is not annotated. Output is
deterministic given the seed. Layout::

    out_dir/{train,val}/images/000000.png ...
    out_dir/{train,val}/annotations.json
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

logger = logging.getLogger(__name__)

SHAPE_NAMES = ("circle", "square", "triangle")
DIGIT_NAMES = tuple(str(d) for d in range(10))
_MANIFEST = "manifest.json"
_VERSION = 1  # bump when generation changes, so ensure_dataset regenerates old folders


@dataclass(frozen=True)
class SplitPaths:
    """Where one generated split lives: ``CocoDataset(p.ann_file, p.image_dir)`` reads it."""

    image_dir: Path
    ann_file: Path


class _Canvas:
    """One scene: a noisy background onto which objects are painted back to front."""

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        self.rng = rng
        self.height, self.width = height, width
        self.base = rng.uniform(0, 255, size=3)
        # A linear colour gradient in a random direction, so the background is not flat.
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (xx * math.cos(angle) + yy * math.sin(angle)) / max(height, width)  # (H, W) in ~[-1.4, 1.4]
        self.image = self.base[None, None, :] + ramp[:, :, None] * rng.uniform(-40, 40, size=3)  # (H, W, 3)
        self.masks: list[np.ndarray] = []  # (H, W) bool each, reduced by later occluders
        self.category_ids: list[int] = []
        self.windows: list[tuple[int, int, int]] = []  # (y0, x0, side) of every object painted

    def place(self, size: int, max_overlap: float, tries: int = 10) -> tuple[int, int]:
        """Top-left (y0, x0) of a size x size window inside the image.

        Overlap is allowed, but up to ``tries`` random positions are drawn to find one whose
        window covers at most ``max_overlap`` of any earlier window, so that most objects
        stay recognisable; the last draw is used if none does.
        """
        for _ in range(tries):
            y0 = int(self.rng.integers(0, self.height - size + 1))
            x0 = int(self.rng.integers(0, self.width - size + 1))
            covered = [
                max(0, min(y0 + size, y + s) - max(y0, y)) * max(0, min(x0 + size, x + s) - max(x0, x)) / (s * s)
                for y, x, s in self.windows
            ]
            if max(covered, default=0.0) <= max_overlap:
                break
        return y0, x0

    def colour(self) -> np.ndarray:
        """A random RGB colour far enough from the background to be seen."""
        for _ in range(50):
            c = self.rng.uniform(0, 255, size=3)
            if np.abs(c - self.base).sum() > 180:
                break
        return c

    def paint(self, y0: int, x0: int, alpha: np.ndarray, colour: np.ndarray, category_id: int) -> None:
        """Blend ``colour`` with coverage ``alpha`` ((h, w) in [0, 1]) at top-left (y0, x0).

        The object's mask is alpha >= 0.5; it is removed from every earlier object's mask.
        """
        h, w = alpha.shape
        window = (slice(y0, y0 + h), slice(x0, x0 + w))
        a = alpha[:, :, None]  # (h, w, 1)
        self.image[window] = self.image[window] * (1 - a) + colour * a
        local = alpha >= 0.5
        for m in self.masks:
            m[window] &= ~local
        full = np.zeros((self.height, self.width), dtype=bool)
        full[window] = local
        self.masks.append(full)
        self.category_ids.append(category_id)
        self.windows.append((y0, x0, h))

    def finish(self, min_visible: int, noise: float = 8.0) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
        """(H, W, 3) uint8 image with pixel noise, and the (mask, category id) pairs kept."""
        image = self.image + self.rng.normal(0, noise, size=self.image.shape)
        image = np.rint(image).clip(0, 255).astype(np.uint8)
        kept = [(m, c) for m, c in zip(self.masks, self.category_ids) if m.sum() >= min_visible]
        return image, kept


def _shape_alpha(kind: str, size: int, angle: float) -> np.ndarray:
    """(size, size) 0/1 coverage of a shape inscribed in the window, tested at pixel centres."""
    r = size / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5 - r  # offsets from the centre
    if kind == "circle":
        inside = xx**2 + yy**2 <= r**2
    elif kind == "square":
        half = r / math.sqrt(2)  # a rotated square stays inside the window
        u = xx * math.cos(angle) + yy * math.sin(angle)
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        inside = (np.abs(u) <= half) & (np.abs(v) <= half)
    elif kind == "triangle":
        corners = [
            (r * math.cos(angle + k * 2 * math.pi / 3), r * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)
        ]
        inside = np.ones((size, size), dtype=bool)
        for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):
            # Counter-clockwise corners: the inside is left of every edge.
            inside &= (bx - ax) * (yy - ay) - (by - ay) * (xx - ax) >= 0
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return inside.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: (1797, 8, 8) float32 in [0, 1], (1797,) int."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _digit_alpha(sample: np.ndarray, size: int) -> np.ndarray:
    """(size, size) coverage in [0, 1]: an 8x8 digit upscaled bilinearly."""
    img = Image.fromarray(sample, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img).clip(0.0, 1.0)


def _write_split(
    out_dir: Path,
    split: str,
    num_images: int,
    rng: np.random.Generator,
    image_size: tuple[int, int],
    draw: Callable[[_Canvas], None],
    categories: list[dict[str, Any]],
    min_visible: int,
) -> SplitPaths:
    image_dir = out_dir / split / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        h, w = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, size=2))
        canvas = _Canvas(rng, h, w)
        draw(canvas)
        image, kept = canvas.finish(min_visible)
        file_name = f"{index:06d}.png"
        Image.fromarray(image).save(image_dir / file_name, compress_level=1)
        images.append({"id": index + 1, "file_name": file_name, "width": w, "height": h})
        for mask, category_id in kept:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": category_id,
                    "iscrowd": 0,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                }
            )
    ann_file = out_dir / split / "annotations.json"
    coco = {
        "info": {"description": f"synthetic {split} split"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    ann_file.write_text(json.dumps(coco))
    logger.info("wrote %d images, %d instances to %s", len(images), len(annotations), out_dir / split)
    return SplitPaths(image_dir=image_dir, ann_file=ann_file)


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, {"train": 0, "val": 1}[split]])


def generate_shapes(
    out_dir: str | Path,
    num_train: int = 200,
    num_val: int = 50,
    image_size: tuple[int, int] = (128, 256),
    objects_per_image: tuple[int, int] = (1, 5),
    object_size: tuple[int, int] = (16, 64),
    min_visible: int = 40,
    max_overlap: float = 0.3,
    seed: int = 0,
) -> dict[str, SplitPaths]:
    """Write the ``shapes`` dataset: circles (id 1), squares (id 2), triangles (id 3).

    Args:
        out_dir: output folder.
        num_train, num_val: images per split.
        image_size: range (inclusive) of image height and width, drawn independently.
        objects_per_image: range (inclusive) of shapes drawn per image.
        object_size: range of the shape's window side in pixels (circle diameter).
        min_visible: an object with fewer visible pixels after occlusion is not annotated.
        max_overlap: preferred limit on the share of an earlier object's window that a new
            object covers (1.0: place uniformly at random).
        seed: RNG seed; the same arguments give byte-identical output.

    Returns:
        ``{"train": SplitPaths, "val": SplitPaths}``.
    """
    out_dir = Path(out_dir)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_NAMES)]

    def draw(rng: np.random.Generator) -> Callable[[_Canvas], None]:
        def _draw(canvas: _Canvas) -> None:
            for _ in range(rng.integers(objects_per_image[0], objects_per_image[1] + 1)):
                size = int(rng.integers(object_size[0], min(object_size[1], canvas.height, canvas.width) + 1))
                kind = int(rng.integers(len(SHAPE_NAMES)))
                alpha = _shape_alpha(SHAPE_NAMES[kind], size, float(rng.uniform(0, 2 * math.pi)))
                y0, x0 = canvas.place(size, max_overlap)
                canvas.paint(y0, x0, alpha, canvas.colour(), kind + 1)

        return _draw

    paths = {}
    for split, n in (("train", num_train), ("val", num_val)):
        rng = _split_rng(seed, split)
        paths[split] = _write_split(out_dir, split, n, rng, image_size, draw(rng), categories, min_visible)
    return paths


def generate_digits(
    out_dir: str | Path,
    num_train: int = 200,
    num_val: int = 50,
    image_size: tuple[int, int] = (128, 256),
    objects_per_image: tuple[int, int] = (2, 6),
    object_size: tuple[int, int] = (24, 64),
    min_visible: int = 40,
    max_overlap: float = 0.3,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, SplitPaths]:
    """Write the ``digits`` dataset: handwritten digits, category id d + 1 named "d".

    Args:
        out_dir, num_train, num_val, image_size, objects_per_image, min_visible,
            max_overlap, seed: as ``generate_shapes``.
        object_size: range of the upscaled digit's side in pixels (from 8).
        val_fraction: share of the 1797 digit samples reserved for val scenes.

    Returns:
        ``{"train": SplitPaths, "val": SplitPaths}``.
    """
    out_dir = Path(out_dir)
    samples, targets = _digits()
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = int(round(len(samples) * val_fraction))
    pools = {"train": order[n_val:], "val": order[:n_val]}
    categories = [{"id": d + 1, "name": n, "supercategory": "digit"} for d, n in enumerate(DIGIT_NAMES)]

    def draw(rng: np.random.Generator, pool: np.ndarray) -> Callable[[_Canvas], None]:
        def _draw(canvas: _Canvas) -> None:
            for _ in range(rng.integers(objects_per_image[0], objects_per_image[1] + 1)):
                size = int(rng.integers(object_size[0], min(object_size[1], canvas.height, canvas.width) + 1))
                k = int(pool[rng.integers(len(pool))])
                alpha = _digit_alpha(samples[k], size)
                y0, x0 = canvas.place(size, max_overlap)
                canvas.paint(y0, x0, alpha, canvas.colour(), int(targets[k]) + 1)

        return _draw

    paths = {}
    for split, n in (("train", num_train), ("val", num_val)):
        rng = _split_rng(seed, split)
        paths[split] = _write_split(
            out_dir, split, n, rng, image_size, draw(rng, pools[split]), categories, min_visible
        )
    return paths


GENERATORS: dict[str, Callable[..., dict[str, SplitPaths]]] = {"shapes": generate_shapes, "digits": generate_digits}


def ensure_dataset(kind: str, out_dir: str | Path, **params: Any) -> dict[str, SplitPaths]:
    """Generate a built-in dataset into ``out_dir`` once; reuse it while the parameters match.

    ``out_dir/manifest.json`` records the kind and every generator argument; a later call
    with the same ones returns the existing paths without writing anything, a call with other
    ones regenerates. A folder that already has ``train``/``val`` but no manifest is not
    ours and is left alone (error).

    Args:
        kind: "shapes" or "digits".
        out_dir: output folder.
        **params: arguments of ``generate_shapes`` / ``generate_digits``.
    """
    if kind not in GENERATORS:
        close = difflib.get_close_matches(kind, GENERATORS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown built-in dataset {kind!r}{hint} (known: {', '.join(GENERATORS)})")
    generate = GENERATORS[kind]
    out_dir = Path(out_dir)
    bound = inspect.signature(generate).bind(out_dir, **params)
    bound.apply_defaults()
    wanted = {
        "kind": kind,
        "version": _VERSION,
        "params": json.loads(json.dumps({k: v for k, v in bound.arguments.items() if k != "out_dir"})),
    }
    manifest = out_dir / _MANIFEST
    paths = {s: SplitPaths(out_dir / s / "images", out_dir / s / "annotations.json") for s in ("train", "val")}
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            found = {}
        if found == {**wanted, "complete": True} and all(p.ann_file.is_file() for p in paths.values()):
            logger.info("reusing %s dataset in %s", kind, out_dir)
            return paths
        for split in paths:  # ours (it has our manifest): safe to replace
            shutil.rmtree(out_dir / split, ignore_errors=True)
    elif any((out_dir / s).exists() for s in paths):
        raise FileExistsError(
            f"{out_dir} has train/ or val/ but no {_MANIFEST}; not overwriting a folder this function did not create"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({**wanted, "complete": False}))
    logger.info("generating %s dataset in %s", kind, out_dir)
    paths = generate(**bound.arguments)
    manifest.write_text(json.dumps({**wanted, "complete": True}, indent=1))
    return paths
