"""Masks as polygon files: COCO polygon results (``--polygons``) and GeoJSON (``--geojson``).

Outlines come from ``maskrcnn.polygons`` (marching squares at 0.5, pixel-edge coordinates,
holes kept), simplified so that no vertex moves more than ``tolerance`` pixels (default
``TOLERANCE``: the outline stays within half a pixel of the mask's own). Masks are those of
``predictions.json``, so an object cut by tile borders is one outline, as it is one mask.

- ``OUT/polygons.json`` (``--polygons``): ``predictions.json`` with each ``segmentation`` a
  COCO polygon list ``[[x1, y1, x2, y2, ...], ...]`` instead of RLE, for tools that take
  polygons (CVAT, Label Studio, Roboflow imports). COCO polygons have no holes: a mask's holes
  stay only in the RLE and GeoJSON outputs.
- ``OUT/<name>.geojson`` (``--geojson``): one Feature per object, a Polygon with holes (a
  MultiPolygon when the mask has separate parts), properties ``object_id`` (its value in the
  ``--labels`` image), ``class``, ``category_id``, ``score``. For a georeferenced TIFF the
  coordinates are map coordinates in the raster's CRS (its affine transform applied to the
  pixel-edge coordinates), named in the collection's ``crs`` member as GDAL and QGIS read it
  (RFC 7946 allows only WGS 84; a UTM raster's outlines are kept in UTM rather than
  reprojected); for other images pixel coordinates (x right, y down) and no ``crs``. Every
  geometry is valid by shapely's ``is_valid``.

Shape shorthand: N detections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import atomic_write, write_json
from ..inference.polygons import coco_polygons, result_polygons
from ..inference.results import Result

TOLERANCE = 0.5  # pixels a simplified outline's vertex may move: within the half pixel of marching squares
# How the files begin: what tells an earlier run's output (replaced) from a user's own file (never).
_GEOJSON_OPENING = b'{"type": "FeatureCollection", "generator": "maskrcnn predict"'
_COCO_OPENINGS = (b'[{"image_id": ', b"[]")


def check_tolerance(tolerance: float) -> float:
    """``tolerance`` if a finite number of pixels >= 0; else a one-line ValueError."""
    if not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance < float("inf")):
        raise ValueError(f"polygon tolerance must be a number of pixels >= 0, got {tolerance!r}")
    return float(tolerance)


def _begins_with(path: Path, *openings: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(max(map(len, openings)) + 1)
    except OSError:
        return False
    return any(head.startswith(o) if len(o) > 2 else head == o for o in openings)


class PolygonWriter:
    """``predict --polygons``: ``OUT/polygons.json``, COCO results with polygon segmentations."""

    def __init__(self, out: Path, tolerance: float = TOLERANCE) -> None:
        self.out = Path(out)
        self.tolerance = check_tolerance(tolerance)
        self.entries: list[dict] = []

    def targets(self, names: list[str]) -> list[Path]:
        return [self.out / "polygons.json"]

    @staticmethod
    def ours(path: Path) -> bool:
        return _begins_with(path, *_COCO_OPENINGS)

    def add(self, image_id: int, name: str, path: Path, result: Result) -> None:
        entries = result.to_coco(image_id)
        for entry, polygons in zip(entries, result_polygons(result, self.tolerance)):
            if "segmentation" in entry:
                entry["segmentation"] = coco_polygons(polygons)
        self.entries.extend(entries)

    def close(self) -> None:
        write_json(self.entries, self.out / "polygons.json")


class GeoJSONWriter:
    """``predict --geojson``: ``OUT/<name>.geojson`` per image, in its CRS or in pixels."""

    def __init__(self, out: Path, tolerance: float = TOLERANCE) -> None:
        self.out = Path(out)
        self.tolerance = check_tolerance(tolerance)

    def targets(self, names: list[str]) -> list[Path]:
        return [self.out / f"{n}.geojson" for n in names]

    @staticmethod
    def ours(path: Path) -> bool:
        return _begins_with(path, _GEOJSON_OPENING)

    def add(self, image_id: int, name: str, path: Path, result: Result) -> None:
        from ..inference.geotiff import georeference

        reference = georeference(path) if path is not None else None
        collection = feature_collection(result, self.tolerance, reference)
        data = json.dumps(collection).encode("utf-8")
        atomic_write(self.out / f"{name}.geojson", lambda f: f.write(data))

    def close(self) -> None:
        pass  # each image's file is written as it finishes


def _counter_clockwise(shape: Any) -> Any:
    """A Polygon or MultiPolygon with exteriors counter-clockwise and holes clockwise."""
    from shapely.geometry import MultiPolygon
    from shapely.geometry.polygon import orient

    if isinstance(shape, MultiPolygon):
        return MultiPolygon([orient(p, 1.0) for p in shape.geoms])
    return orient(shape, 1.0)


def feature_collection(result: Result, tolerance: float, reference: Any = None) -> dict:
    """A GeoJSON FeatureCollection of ``result``'s masks (see the module docstring).

    Args:
        tolerance: simplification, in pixels.
        reference: a ``geo.Georeference`` (map coordinates in its CRS), or None (pixels).
    """
    from shapely.affinity import affine_transform
    from shapely.geometry import MultiPolygon, mapping
    from shapely.ops import unary_union

    collection: dict[str, Any] = {"type": "FeatureCollection", "generator": "maskrcnn predict"}
    if reference is not None and reference.crs is not None:
        collection["crs"] = {"type": "name", "properties": {"name": reference.crs_urn()}}
    features = []
    category_ids = result.category_ids
    for i, polygons in enumerate(result_polygons(result, tolerance)):
        if not polygons:  # an empty mask (or a box-only model): nothing to outline
            continue
        shape = polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)
        if not shape.is_valid:  # parts simplified one by one may cross where the mask's parts touch
            shape = unary_union(polygons)
        if reference is not None:
            a, b, c, d, e, f = reference.transform
            shape = affine_transform(shape, [a, b, d, e, c, f])  # shapely's order: a, b, d, e, xoff, yoff
            shape = _counter_clockwise(shape)  # a north-up map flips y: exteriors back to RFC 7946's orientation
        features.append(
            {
                "type": "Feature",
                "id": i + 1,
                "geometry": mapping(shape),
                "properties": {
                    "object_id": i + 1,
                    "class": result.class_names[i] or str(int(result.labels[i])),
                    "category_id": int(category_ids[i]),
                    "score": float(result.scores[i]),
                },
            }
        )
    collection["features"] = features
    return collection
