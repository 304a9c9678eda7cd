"""Instance masks as polygons: what annotation tools, GeoJSON and COCO polygon files take.

A mask's outline is traced by marching squares (scikit-image's ``find_contours``) at level 0.5,
so it runs halfway between the centres of object and background pixels: every object pixel's
centre lies inside the polygon and every background pixel's outside, and filling the polygon
by pixel centres gives the mask back exactly. Coordinates are pixel edges, the convention of
COCO and of the annotation tools: pixel (row 0, col 0) covers x in [0, 1] and y in [0, 1].

Rings nest (an object, a hole in it, an island in the hole): their symmetric difference
(shapely) gives each polygon with its holes, valid by construction.

Shape shorthand: h x w mask (or box-sized crop), K vertices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .masks import RLE, decode_one

if TYPE_CHECKING:
    from shapely.geometry import Polygon

    from .results import Result


def mask_polygons(mask: np.ndarray, offset: tuple[float, float] = (0.0, 0.0), tolerance: float = 0.0) -> list[Polygon]:
    """The polygons, with holes, whose filled pixel centres are ``mask``.

    Args:
        mask: (h, w) bool.
        offset: (x0, y0) added to every vertex: where the mask's pixel (0, 0) lies in the image
            (a box-sized crop from ``masks.decode_one``).
        tolerance: simplify each polygon so that no vertex moves more than this many pixels
            (Douglas-Peucker, topology kept); 0 keeps every traced vertex.

    Returns:
        shapely Polygons (exterior counter-clockwise, holes clockwise), largest first; empty
        for an empty mask. Separate parts of the mask (8-connected diagonals count as separate)
        are separate polygons.
    """
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.geometry.polygon import orient
    from skimage.measure import find_contours

    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (h, w), got shape {mask.shape}")
    if not mask.any():
        return []
    padded = np.pad(mask, 1).astype(np.uint8)  # closes every contour, also along the border
    shape = None
    for ring in find_contours(padded, 0.5):  # (K, 2) row, col of the padded frame's pixel centres
        # padded centre (r, c) -> mask pixel edges: minus the pad, plus half a pixel
        xy = ring[:, ::-1] - 0.5 + np.asarray(offset, dtype=np.float64)  # (K, 2) x, y
        part = Polygon(xy)
        shape = part if shape is None else shape.symmetric_difference(part)
    parts = list(shape.geoms) if isinstance(shape, MultiPolygon) else [shape]
    if tolerance > 0:
        parts = [p.simplify(tolerance, preserve_topology=True) for p in parts]
    parts = [orient(p, 1.0) for p in parts if isinstance(p, Polygon) and not p.is_empty]
    return sorted(parts, key=lambda p: -p.area)


def rle_polygons(rle: RLE, tolerance: float = 0.0) -> list[Polygon]:
    """``mask_polygons`` of one full-image RLE, traced in its box-sized crop only."""
    y0, x0, crop = decode_one(rle)
    return mask_polygons(crop, (x0, y0), tolerance) if crop.size else []


def result_polygons(result: Result, tolerance: float = 0.0) -> list[list[Polygon]]:
    """Each detection's polygons in image pixel-edge coordinates; [] per detection for a
    box-only model (no masks)."""
    if result.rles is None:
        return [[] for _ in range(len(result))]
    return [rle_polygons(rle, tolerance) for rle in result.rles]


def coco_polygons(polygons: list[Polygon]) -> list[list[float]]:
    """COCO ``segmentation`` polygons ``[[x1, y1, x2, y2, ...], ...]``: one exterior ring each.

    COCO's polygon form has no holes (pycocotools fills every ring and unions them), so a
    polygon's holes are dropped here; a mask with holes keeps them only in RLE form.
    """
    rings = []
    for polygon in polygons:
        xy = np.asarray(polygon.exterior.coords)[:-1]  # (K, 2), the closing vertex repeats the first
        if len(xy) >= 3:
            rings.append([round(float(v), 2) for v in xy.reshape(-1)])
    return rings
