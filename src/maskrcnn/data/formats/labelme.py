"""LabelMe JSON files <-> COCO: ``labelme_to_coco`` reads a folder of them, ``LabelMeWriter``
writes predictions as LabelMe files that open as pre-annotations.

A LabelMe file (one per image): ``{"version", "flags", "shapes": [{"label", "points": [[x, y],
...], "group_id", "shape_type", "flags", "description", "mask"}], "imagePath", "imageData",
"imageHeight", "imageWidth"}``, ``imagePath`` relative to the JSON file. Points are in pixel
coordinates as LabelMe draws them (the pixel-edge frame of COCO polygons).

Shapes: ``polygon`` (3+ points); ``rectangle`` (two opposite corners); ``circle`` (centre and a
point on the circle) as a 32-gon; ``mask`` (LabelMe 5.3+: a base64 PNG of the box given by two
points). Shapes sharing a ``group_id`` and label are one instance (LabelMe's way of drawing an
object in several parts). ``point``, ``line``, ``linestrip`` and ``points`` have no area; they,
shapes of another type and JSON files that are not LabelMe's are named as not converted (the
``.maskrcnn-export.json`` manifest of ``predict --export`` is passed over).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..coco import read_json
from ..errors import DatasetError
from .common import (
    CLASSES_FILE,
    EXPORT_TOLERANCE,
    CocoBuilder,
    ExportFolder,
    detection_rings,
    ellipse,
    number,
    write_classes,
)

if TYPE_CHECKING:
    from ...inference.results import Result

logger = logging.getLogger(__name__)

# The LabelMe file version written: 5.x reads files of any 5.x version.
LABELME_VERSION = "5.5.0"
NO_AREA = ("point", "line", "linestrip", "points")
AREA = ("polygon", "rectangle", "circle", "mask")


def _points(shape: dict[str, Any], where: str) -> list[tuple[float, float]]:
    pts = shape.get("points")
    if not isinstance(pts, list) or not all(isinstance(p, list) and len(p) == 2 for p in pts):
        raise DatasetError(f"{where}: 'points' must be a list of [x, y] pairs, got {pts!r:.60}")
    return [(number(x, where), number(y, where)) for x, y in pts]


def _mask_shape(shape: dict[str, Any], pts: list[tuple[float, float]], h: int, w: int, where: str) -> np.ndarray:
    """(h, w) bool of a LabelMe ``mask`` shape: its PNG placed at the first point."""
    if len(pts) != 2 or not isinstance(shape.get("mask"), str):
        raise DatasetError(f"{where}: a mask shape needs 2 points and a base64 PNG 'mask'")
    try:
        with Image.open(io.BytesIO(base64.b64decode(shape["mask"]))) as img:
            patch = np.asarray(img.convert("L")) > 0
    except (ValueError, OSError) as e:
        raise DatasetError(f"{where}: cannot decode the mask PNG: {e}") from None
    x0, y0 = (math.floor(min(p[i] for p in pts)) for i in (0, 1))
    x1, y1 = (math.floor(max(p[i] for p in pts)) for i in (0, 1))
    ph, pw = patch.shape
    if (pw, ph) != (x1 - x0 + 1, y1 - y0 + 1):  # LabelMe fills mask[y0 : y1 + 1, x0 : x1 + 1] with it
        raise DatasetError(
            f"{where}: the mask PNG is {pw}x{ph} but its points span {x1 - x0 + 1}x{y1 - y0 + 1} pixels "
            f"(({x0}, {y0}) to ({x1}, {y1}), both included)"
        )
    full = np.zeros((h, w), dtype=bool)
    ys, xs = slice(max(y0, 0), min(y0 + ph, h)), slice(max(x0, 0), min(x0 + pw, w))
    full[ys, xs] = patch[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return full


def _polygon(kind: str, pts: list[tuple[float, float]]) -> list[float] | None:
    if kind == "polygon":
        return [v for p in pts for v in p]
    if kind == "rectangle":
        if len(pts) != 2:
            return [v for p in pts for v in p] if len(pts) == 4 else None
        (xa, ya), (xb, yb) = pts
        x1, x2, y1, y2 = min(xa, xb), max(xa, xb), min(ya, yb), max(ya, yb)
        return [x1, y1, x2, y1, x2, y2, x1, y2]
    if kind == "circle":
        if len(pts) != 2:
            return None
        (cx, cy), (px, py) = pts
        r = math.hypot(px - cx, py - cy)
        return ellipse(cx, cy, r, r)
    raise ValueError(f"not an area shape type: {kind}")


def labelme_to_coco(
    source: str | Path,
    out_json: str | Path,
    image_dir: str | Path | None = None,
    allow_outside_root: bool = False,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Convert a folder of LabelMe JSON files (or one file) to COCO JSON and write it.

    Args:
        source: folder of ``*.json`` LabelMe files (sorted by name; subfolders included) or one file.
        out_json: COCO JSON to write.
        image_dir: folder COCO ``file_name`` is relative to (default: the source folder).
        allow_outside_root: accept images that lie outside ``image_dir``.
        classes: the class names, category ids 1.. in this order (``--classes``); an instance of
            another label is named as not converted. None: the labels of converted shapes, in order of first appearance.

    Returns:
        The COCO dict: image ids 1.. in file-name order, one annotation per shape (or group).

    Raises:
        DatasetError: unreadable JSON, a malformed shape (named by file and shape index), an
            image missing or of another size than ``imageWidth`` x ``imageHeight``.
    """
    source = Path(source)
    files = (
        sorted(p for p in source.rglob("*.json") if p.name != ExportFolder.MANIFEST) if source.is_dir() else [source]
    )
    if not files or not source.exists():
        raise DatasetError(f"no LabelMe JSON files found at {source}")
    root = Path(image_dir) if image_dir is not None else (source if source.is_dir() else source.parent)
    builder = CocoBuilder(source, root, allow_outside_root)
    order: list[str] = []
    for path in files:
        data = read_json(path)
        if not isinstance(data, dict) or "shapes" not in data or "imagePath" not in data:
            if source.is_dir():  # another JSON in the folder (a COCO file, a config): not LabelMe's
                builder.skip(str(path), "not a LabelMe file (no 'shapes' and 'imagePath')")
                continue
            raise DatasetError(f"{path}: a LabelMe file needs 'shapes' and 'imagePath'")
        if not isinstance(data["imagePath"], str) or not isinstance(data["shapes"], list):
            raise DatasetError(f"{path}: 'imagePath' must be a string and 'shapes' a list")
        file_name = os.path.relpath(path.parent / data["imagePath"].replace("\\", "/"), root)
        image = builder.add_image(file_name, data.get("imageWidth"), data.get("imageHeight"), str(path))
        groups: dict[tuple[Any, str], list[tuple[str, list[float] | np.ndarray]]] = {}
        for k, shape in enumerate(data["shapes"]):
            where = f"{path} shape {k}"
            if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"].strip():
                raise DatasetError(f"{where}: a shape needs a non-empty 'label'")
            kind, label = shape.get("shape_type") or "polygon", shape["label"].strip()
            order.append(label)
            if kind in NO_AREA:
                builder.skip(where, f"a {kind} has no area")
                continue
            if kind not in AREA:
                builder.skip(where, f"shape_type {kind!r} is not one of {', '.join(AREA + NO_AREA)}")
                continue
            pts = _points(shape, where)
            part = _mask_shape(shape, pts, image.height, image.width, where) if kind == "mask" else _polygon(kind, pts)
            if part is None:
                builder.skip(where, f"a {kind} with a wrong number of points")
                continue
            gid = shape.get("group_id")
            groups.setdefault((k if gid is None else ("g", gid), label), []).append((where, part))
        for (_, label), parts in groups.items():
            builder.add_parts(image, label, [p for _, p in parts], parts[0][0])
    if not builder.images:
        raise DatasetError(f"no LabelMe JSON files found at {source}")
    return builder.write(out_json, "LabelMe", classes, seen=order)


class LabelMeWriter:
    """Predictions as LabelMe files ``out/labelme/<name>.json``, one polygon shape per part of
    each mask (parts of one detection share a ``group_id``), the score in ``description``.

    At ``close``, ``out/labelme/classes.txt``: the class names, one a line in category id order
    (LabelMe's ``--labels`` file; ``convert labelme --classes`` numbers the classes by it).

    Open the folder in LabelMe (``labelme out/labelme``): ``imagePath`` points back at the image,
    relative to the JSON file. Holes in masks are not kept (LabelMe polygons have none).

    Args:
        out: predict's output folder.
        classes: the model's class names by category id (``common.class_list``), all written
            whether detected or not, so ``convert`` numbers them back as the model does.
        tolerance: polygon simplification in pixels (``polygons.mask_polygons``).
    """

    def __init__(self, out: Path, classes: Sequence[str] = (), tolerance: float = EXPORT_TOLERANCE) -> None:
        self.folder = ExportFolder(Path(out) / "labelme", "maskrcnn predict --export")
        self.classes = list(classes)
        self.seen: list[str] = []  # labels detected, for those that ``classes`` lacks
        self.tolerance = tolerance

    def targets(self, images: dict[str, Path]) -> list[Path]:
        return [*(self.folder.root / f"{n}.json" for n in images), self.folder.root / CLASSES_FILE]

    def check(self, images: dict[str, Path]) -> None:
        self.folder.check(self.targets(images))

    def add(self, image_id: int, name: str, path: Path, result: Result) -> None:
        target = self.folder.root / f"{name}.json"
        shapes = []
        for k, (_, label, score, rings) in enumerate(detection_rings(result, self.tolerance)):
            self.seen.append(label)
            for ring in rings:
                shapes.append(
                    {
                        "label": label,
                        "points": ring.round(2).tolist(),
                        "group_id": k if len(rings) > 1 else None,
                        "description": f"score {score:.3f}",
                        "shape_type": "polygon",
                        "flags": {},
                        "mask": None,
                    }
                )
        h, w = result.image_size
        doc = {
            "version": LABELME_VERSION,
            "flags": {},
            "shapes": shapes,
            "imagePath": os.path.relpath(Path(path).resolve(), target.parent.resolve()),
            "imageData": None,
            "imageHeight": h,
            "imageWidth": w,
        }
        self.folder.write(target, json.dumps(doc, indent=1).encode("utf-8"))

    def close(self) -> None:
        write_classes(self.folder, [*self.classes, *self.seen])
        self.folder.close(remove_stale=True)
