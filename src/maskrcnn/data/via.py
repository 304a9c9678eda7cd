"""VGG Image Annotator (VIA 1.x/2.x) region JSON -> COCO instance JSON.

Reads the "balloon-style" export (an object of entries ``{filename, size, regions,
file_attributes}``, ``regions`` a list or, in VIA 1.x, an object) or a full VIA project file
(entries under ``_via_img_metadata``). Region shapes: ``polygon`` is copied unchanged (cut at
the image's edges where it crosses them, ``clip_polygon``); ``rect``, ``circle`` and ``ellipse``
become polygons; ``point`` and ``polyline`` (no area) are skipped with a warning.

Polygon ``area`` is the exact polygon area (shoelace formula) and ``bbox`` the vertices'
extent, which is what tools that copy VIA polygons into COCO write; pycocotools' rasterised
area differs by a few pixels along the border and only matters to COCOeval's size ranges.
Image sizes come from the image files (after EXIF orientation, the frame ``load_rgb`` gives).

Every coordinate must be a finite number (a numeric string is accepted, ``"nan"`` is not), and
a polygon's ``all_points_x`` / ``all_points_y`` must be lists. File names must stay inside the
image folder, as for ``CocoDataset``, unless ``allow_outside_root``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_json
from .coco import image_path, read_json
from .errors import DatasetError
from .formats.common import clip_polygon, number
from .images import image_size

logger = logging.getLogger(__name__)

# Vertices of the polygon that stands in for a VIA circle or ellipse.
ELLIPSE_VERTICES = 32

FilenameMap = str | Callable[[str], str] | None


def _resolve(filename: str, filename_map: FilenameMap) -> str:
    if filename_map is None:
        return filename
    if isinstance(filename_map, str):
        return filename_map + filename
    return str(filename_map(filename))


def _ellipse(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0) -> list[float]:
    t = np.linspace(0.0, 2 * math.pi, ELLIPSE_VERTICES, endpoint=False)
    x = cx + rx * np.cos(t) * math.cos(theta) - ry * np.sin(t) * math.sin(theta)
    y = cy + rx * np.cos(t) * math.sin(theta) + ry * np.sin(t) * math.cos(theta)
    return [float(v) for xy in zip(x, y) for v in xy]


def _shape_to_polygon(shape: dict[str, Any], where: str) -> list[float] | None:
    """Flat ``[x0, y0, x1, y1, ...]`` for an area shape, None for a shape without area."""
    name = shape.get("name")
    need = {
        "polygon": ("all_points_x", "all_points_y"),
        "rect": ("x", "y", "width", "height"),
        "circle": ("cx", "cy", "r"),
        "ellipse": ("cx", "cy", "rx", "ry"),
    }
    if name in ("point", "polyline"):
        logger.warning("%s: skipping a '%s' region (it has no area)", where, name)
        return None
    if name not in need:
        raise DatasetError(f"{where}: unsupported region shape {name!r}; expected one of {sorted(need)}")
    missing = [k for k in need[name] if k not in shape]
    if missing:
        raise DatasetError(f"{where}: {name} shape_attributes lack {', '.join(repr(m) for m in missing)}")
    if name == "polygon":
        for key in need[name]:
            if not isinstance(shape[key], list):  # a string would be read character by character
                raise DatasetError(f"{where}: polygon '{key}' must be a list of numbers, got {shape[key]!r:.40}")
        xs = [_coordinate(v, "all_points_x", where) for v in shape["all_points_x"]]
        ys = [_coordinate(v, "all_points_y", where) for v in shape["all_points_y"]]
        if len(xs) != len(ys):
            raise DatasetError(f"{where}: polygon has {len(xs)} x but {len(ys)} y coordinates")
        return [v for xy in zip(xs, ys) for v in xy]
    v = {k: _coordinate(shape[k], k, where) for k in need[name]}
    if name == "rect":
        x, y, w, h = v["x"], v["y"], v["width"], v["height"]
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    if name == "circle":
        return _ellipse(v["cx"], v["cy"], v["r"], v["r"])
    return _ellipse(v["cx"], v["cy"], v["rx"], v["ry"], _coordinate(shape.get("theta", 0.0), "theta", where))


def _polygon_area(poly: list[float]) -> float:
    """Shoelace area of a flat ``[x0, y0, ...]`` polygon."""
    x, y = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _category_name(region: dict[str, Any], attribute: str, where: str) -> str:
    attrs = region.get("region_attributes") or {}
    if attribute not in attrs:
        raise DatasetError(
            f"{where}: region_attributes lack the category attribute {attribute!r} (has {sorted(attrs)})"
        )
    value = attrs[attribute]
    if isinstance(value, dict):  # VIA checkbox attribute: {"option": true, ...}
        chosen = [k for k, on in value.items() if on]
        if len(chosen) != 1:
            raise DatasetError(f"{where}: attribute {attribute!r} must select exactly one option, got {value!r}")
        value = chosen[0]
    if not isinstance(value, (str, int)) or str(value).strip() == "":
        raise DatasetError(f"{where}: attribute {attribute!r} has no category name: {value!r}")
    return str(value).strip()


def via_to_coco(
    via_json: str | Path,
    image_dir: str | Path,
    out_json: str | Path,
    category_name: str = "object",
    category_attribute: str | None = None,
    filename_map: FilenameMap = None,
    allow_outside_root: bool = False,
) -> dict[str, Any]:
    """Convert a VIA region file to COCO instance JSON and write it.

    Args:
        via_json: VIA export or project file.
        image_dir: folder holding the images; COCO ``file_name`` is relative to it.
        out_json: where to write the COCO JSON (parent folders created).
        category_name: the single category's name when ``category_attribute`` is None.
        category_attribute: region attribute holding each region's class name; categories
            are then the sorted distinct names with ids 1..K.
        filename_map: turns a VIA ``filename`` into the file name under ``image_dir``: a
            prefix string (``"train_"`` maps ``1.jpg`` to ``train_1.jpg``) or a callable.
        allow_outside_root: accept (mapped) file names that are absolute or lead out of
            ``image_dir``; they are written into the COCO JSON as they are.

    Returns:
        The COCO dict written: ``images`` (ids 1.. in VIA order), ``annotations`` (ids 1..,
        one polygon each, ``iscrowd`` 0), ``categories``.

    Raises:
        DatasetError: unreadable JSON, a malformed entry or region (named by VIA key and
            region index), a file name outside ``image_dir``, or a missing image file.
    """
    via_json, image_dir, out_json = Path(via_json), Path(image_dir), Path(out_json)
    data = read_json(via_json)
    if isinstance(data, dict) and "_via_img_metadata" in data:
        data = data["_via_img_metadata"]
    if not isinstance(data, dict):
        raise DatasetError(f"{via_json}: expected a JSON object of VIA entries, got {type(data).__name__}")

    images: list[dict[str, Any]] = []
    records: list[tuple[int, str, list[float], str]] = []  # image id, where, polygon, category name
    seen: dict[str, str] = {}
    clipped = 0
    for key, entry in data.items():
        where = f"{via_json}: entry {key!r}"
        if not isinstance(entry, dict) or "filename" not in entry or "regions" not in entry:
            raise DatasetError(f"{where}: a VIA entry needs 'filename' and 'regions'")
        file_name = _resolve(entry["filename"], filename_map)
        if file_name in seen:
            raise DatasetError(f"{where}: image {file_name} already listed by entry {seen[file_name]!r}")
        seen[file_name] = key
        path = image_path(image_dir, file_name, allow_outside_root, f"{where} (filename {entry['filename']!r})")
        try:
            h, w = image_size(path)
        except DatasetError as e:
            raise DatasetError(f"{where} (filename {entry['filename']!r}): {e}") from None
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})

        regions = entry["regions"]
        if isinstance(regions, dict):  # VIA 1.x keys regions by "0", "1", ...
            regions = list(regions.values())
        if not isinstance(regions, list):
            raise DatasetError(f"{where}: 'regions' must be a list or an object")
        for k, region in enumerate(regions):
            rwhere = f"{where} region {k} ({file_name})"
            if not isinstance(region, dict) or not isinstance(region.get("shape_attributes"), dict):
                raise DatasetError(f"{rwhere}: a region needs a 'shape_attributes' object")
            poly = _shape_to_polygon(region["shape_attributes"], rwhere)
            if poly is None:
                continue
            if len(poly) < 6:
                logger.warning("%s: skipping a polygon with %d point(s)", rwhere, len(poly) // 2)
                continue
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)  # (K, 2)
            if ((xy < 0) | (xy > [w, h])).any():
                clipped += 1
                xy = clip_polygon(xy, float(w), float(h))
                if len(xy) < 3:
                    logger.warning("%s: skipping a polygon wholly outside its image", rwhere)
                    continue
            bounded = [float(v) for v in xy.ravel()]
            name = category_name if category_attribute is None else _category_name(region, category_attribute, rwhere)
            records.append((image_id, rwhere, bounded, name))
    if clipped:
        logger.warning("%s: clipped %d polygon(s) with vertices outside their image", via_json, clipped)

    names = sorted({name for *_, name in records}) if category_attribute is not None else [category_name]
    category_ids = {name: i + 1 for i, name in enumerate(names)}
    annotations = []
    for image_id, _, poly, name in records:
        xs, ys = poly[0::2], poly[1::2]
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_ids[name],
                "iscrowd": 0,
                "segmentation": [poly],
                "area": _polygon_area(poly),
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
            }
        )
    coco = {
        "info": {"description": f"converted from VIA file {via_json.name}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for n, i in category_ids.items()],
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    write_json(coco, out_json)
    logger.info("%s: %d images, %d instances -> %s", via_json, len(images), len(annotations), out_json)
    return coco


def _coordinate(value: Any, key: str, where: str) -> float:
    """A finite coordinate from a JSON number or numeric string; anything else raises."""
    return number(value, where, f"{key} value")
