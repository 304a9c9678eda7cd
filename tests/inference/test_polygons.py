"""Masks -> polygons, checked by filling the polygons again with matplotlib's point-in-polygon
test (independent of the tracing) and against hand-computed areas."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
from matplotlib.path import Path as MplPath

from maskrcnn.inference.polygons import coco_polygons, mask_polygons, result_polygons
from maskrcnn.inference.results import Result


def fill(polygons, h, w, even_odd_holes=True):
    """(h, w) bool: pixel centres inside a polygon's exterior and outside its holes."""
    ys, xs = np.mgrid[0:h, 0:w]
    centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)
    out = np.zeros(h * w, dtype=bool)
    for p in polygons:
        inside = MplPath(np.asarray(p.exterior.coords)).contains_points(centres)
        for hole in p.interiors:
            inside &= ~MplPath(np.asarray(hole.coords)).contains_points(centres)
        out |= inside
    return out.reshape(h, w)


def test_square_area_and_corners_by_hand():
    mask = np.zeros((12, 14), dtype=bool)
    mask[1:11, 2:12] = True  # 10 x 10 at x 2..12, y 1..11 in pixel edges
    (poly,) = mask_polygons(mask)
    # marching squares cuts each corner by a right triangle of legs 0.5: 100 - 4 * 0.125
    assert poly.area == pytest.approx(99.5)
    assert poly.bounds == pytest.approx((2.0, 1.0, 12.0, 11.0))
    assert poly.is_valid and poly.exterior.is_ccw


def test_hole_and_island_and_offset():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:18, 2:18] = True
    mask[6:14, 6:14] = False  # an 8 x 8 hole
    mask[9:11, 9:11] = True  # a 2 x 2 island inside the hole
    polys = mask_polygons(mask, offset=(100, 50))
    assert len(polys) == 2 and all(p.is_valid for p in polys)
    ring, island = polys
    assert len(ring.interiors) == 1
    assert ring.area == pytest.approx((256 - 0.5) - (64 - 0.5))  # the hole's corners are cut the other way
    assert island.area == pytest.approx(4 - 0.5)
    assert ring.bounds == pytest.approx((102, 52, 118, 68))


@pytest.mark.parametrize("seed", range(6))
def test_random_blobs_fill_back_exactly(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(5, 60, size=2)
    mask = rng.random((h, w)) < 0.45  # speckle: many parts, holes, diagonal touches, the border
    polys = mask_polygons(mask)
    assert all(p.is_valid for p in polys)
    np.testing.assert_array_equal(fill(polys, h, w), mask)


def test_simplify_stays_within_tolerance_and_valid():
    yy, xx = np.mgrid[0:80, 0:80]
    disc = (yy - 40) ** 2 + (xx - 40) ** 2 < 30**2
    (exact,) = mask_polygons(disc)
    (simple,) = mask_polygons(disc, tolerance=1.0)
    assert simple.is_valid and len(simple.exterior.coords) < len(exact.exterior.coords) / 3
    assert exact.hausdorff_distance(simple) <= 1.0 + 1e-9
    with pytest.raises(ValueError, match="tolerance"):
        mask_polygons(disc, tolerance=-1)


def test_result_polygons_and_coco_rings_rasterise_back():
    h, w = 40, 50
    masks = np.zeros((2, h, w), dtype=bool)
    masks[0, 5:20, 10:30] = True
    masks[1, 25:38, 3:9] = True
    result = Result(
        np.array([[10, 5, 30, 20], [3, 25, 9, 38]]), np.array([0.9, 0.8]), np.array([1, 2]), (h, w), masks=masks
    )
    per_det = result_polygons(result)
    assert [len(p) for p in per_det] == [1, 1]
    for k, polys in enumerate(per_det):
        rings = coco_polygons(polys)
        back = mask_util.decode(mask_util.merge(mask_util.frPyObjects(rings, h, w))).astype(bool)
        iou = (back & masks[k]).sum() / (back | masks[k]).sum()
        assert iou >= 0.98
    empty = Result(np.zeros((1, 4)), np.array([0.5]), np.array([1]), (h, w))
    assert result_polygons(empty) == [[]]
