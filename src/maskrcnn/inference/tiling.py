"""Tiled inference: images far larger than the model's input, cut into overlapping tiles.

A 10000-px aerial photo or a whole microscopy slide resized to the model's 800 px loses
every small object. Here the image is cut at its native resolution into ``tile`` x ``tile``
tiles that overlap by ``tile_overlap`` of a tile; the model runs on batches of tiles (its
own resize applies per tile, as configured); detections are moved to the full-image frame
and merged across tile borders.

Tile grid: along each axis, the fewest tiles of side ``tile`` whose neighbours overlap by at
least ``round(tile * tile_overlap)`` pixels, spread evenly from edge to edge, so every tile
is full-size (one batch shape) and every overlap is the requested one or a pixel or so more.
An image side no longer than ``tile`` is one tile.

Merge rule. Two tiles that overlap see exactly the same pixels in the rectangle they share.
An object in that rectangle therefore gets the same mask there from either tile, whether one
tile saw it whole and the other cut it at its edge, or both cut it; two different objects do
not. So, for every pair of overlapping tiles, two detections, one from each, are *the same
object* when they have the same label and their masks, restricted to the shared rectangle,
have IoU >= ``match_iou`` (0.5). For a box-only model the boxes are clipped to the shared
rectangle and compared by intersection over the smaller one, since a piece's box is narrower
there than the whole object's (only the pixels, not their bounding box, are the same in the
shared rectangle; a box-only merge is the cruder one). Same-object links are followed
transitively (an object cut into pieces by several tiles joins through each
pair), and each group becomes one detection: the union of its masks (in a box-local frame,
then run-length encoded; never a full frame), the union of its boxes, the best score. This
removes the duplicates of an object seen whole by two tiles and joins an object cut by a
border into one detection with one mask, with no assumption about object size against the
overlap. Limits: a piece of an object that the model missed in one tile stays unjoined; and
two touching objects of one class that one tile sees as a single detection are joined into
one.

Optionally (``whole``), one extra pass runs the whole image shrunk to a tile, for objects
larger than a tile, which a tile sees as texture without edges (``add_whole_image_pass``).

Memory follows the objects, not the image: the pixels are held once (an array, or Pillow's
decoded image cut tile by tile), each tile's detection stays its tile-frame RLE and is
decoded to a box-local crop only while it is compared or joined, and the picture kept for
drawing is a preview no larger than ``results.DISPLAY_SIZE`` a side.

Shape shorthand: H x W full image, T tile side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from ..data.images import pixel_values, to_rgb
from ..data.normalize import strip_range
from .masks import crop_to_rle, decode_one
from .results import Result

log = logging.getLogger(__name__)

MATCH_IOU = 0.5  # masks of two tiles agreeing this well where both tiles saw them are one object
PREVIEW_STRIP = 1024  # rows of full-size pixels converted at a time while building a preview


@dataclass(frozen=True)
class Tile:
    """A rectangle of the full image: columns x0 .. x1 - 1, rows y0 .. y1 - 1."""

    x0: int
    y0: int
    x1: int
    y1: int

    def intersect(self, other: Tile) -> Tile | None:
        """The shared rectangle, or None when the two do not overlap."""
        x0, y0, x1, y1 = max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1), min(self.y1, other.y1)
        return Tile(x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


# Neighbours sharing a fraction o of a tile make every object up to o x tile wide whole in some
# tile, at about 1 / (1 - o)^2 model passes per pixel: 0.2 (SAHI's default and ours) 1.6, 0.5 4,
# 0.75 16, 0.99 10,000 (13,728 tiles of 100 px for a 242 x 195 image). Past 0.75 a larger tile
# gives the same guarantee far cheaper, so larger overlaps are refused rather than run.
MAX_TILE_OVERLAP = 0.75


MIN_TILE = 32


def check_tiling(tile: int, overlap: float) -> None:
    """A one-line ValueError unless ``tile`` is a positive integer and ``overlap`` in
    [0, ``MAX_TILE_OVERLAP``]."""
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile!r}")
    if tile < MIN_TILE:  # --tile 1 planned 24,165 one-pixel tiles for a 179 x 135 image, without a word
        raise ValueError(
            f"tile must be at least {MIN_TILE} pixels (the coarsest feature stride), got {tile}; "
            "tiles are for images much larger than the model's input, e.g. 512 to 2048"
        )
    if not (isinstance(overlap, (int, float)) and 0.0 <= overlap <= MAX_TILE_OVERLAP):
        raise ValueError(
            f"tile_overlap must be a fraction of the tile in [0, {MAX_TILE_OVERLAP}], got {overlap!r} (an overlap o "
            "runs each pixel through about 1/(1-o)^2 tiles; for larger objects use a larger tile)"
        )


def check_options(tile: int | None, overlap: float, whole: bool) -> None:
    """``check_tiling`` for a tiled run; without ``tile``, a ValueError if ``whole`` is set
    (the whole-image pass completes a tiled run: alone it would be ignored without a word)."""
    if tile is not None:
        check_tiling(tile, overlap)
    elif whole:
        raise ValueError("tile_whole needs tile: it adds a whole-image pass to a tiled run")


def _starts(n: int, tile: int, overlap: float) -> list[int]:
    """Tile start positions along one axis of length ``n``: first at 0, last ending at ``n``."""
    if n <= tile:
        return [0]
    step = max(1, tile - round(tile * overlap))  # the largest step that keeps the overlap
    gaps = math.ceil((n - tile) / step)  # (n - tile) / gaps <= step
    return [round(i * (n - tile) / gaps) for i in range(gaps + 1)]


def tile_grid(height: int, width: int, tile: int, overlap: float = 0.2) -> list[Tile]:
    """The tiles covering an ``height`` x ``width`` image, row by row (see the module docstring).

    Args:
        tile: tile side in pixels.
        overlap: fraction of ``tile`` that neighbouring tiles share at least, in [0, 1).
    """
    check_tiling(tile, overlap)
    xs, ys = _starts(width, tile, overlap), _starts(height, tile, overlap)
    return [Tile(x, y, min(x + tile, width), min(y + tile, height)) for y in ys for x in xs]


# ---- image sources ----------------------------------------------------------------------


class ArrayTiles:
    """Tiles cut from an (H, W, 3) uint8 RGB array already in memory (views, no copies)."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.size = (int(rgb.shape[0]), int(rgb.shape[1]))

    def read(self, box: Tile) -> np.ndarray:
        return self.rgb[box.y0 : box.y1, box.x0 : box.x1]  # (h, w, 3) view


class PillowTiles:
    """Tiles cut from a Pillow image, each converted by ``to_rgb`` on its own.

    The full image is never converted: a 20000 x 20000 RGB file costs Pillow's 1.6 GB
    (4 bytes a pixel) and no second copy; a 16-bit one 0.8 GB. For 32-bit integer and float
    images the peak that ``to_rgb``'s rule scales by is the whole image's, so every tile is
    scaled alike; so are the values that ``percentiles`` (``data.normalize``) stretch by.
    """

    def __init__(self, image: Image.Image, percentiles: tuple[float, float] | None = None) -> None:
        self.image = image
        self.size = (image.height, image.width)
        self.peak = float(max(image.getextrema())) if image.mode in ("I", "F") else None
        self.value_range = (
            None
            if percentiles is None
            else strip_range(lambda y0, y1: pixel_values(image.crop((0, y0, image.width, y1))), *self.size, percentiles)
        )

    def read(self, box: Tile) -> np.ndarray:
        return to_rgb(self.image.crop((box.x0, box.y0, box.x1, box.y1)), peak=self.peak, value_range=self.value_range)


Source = ArrayTiles | PillowTiles


def preview(source: Source, max_side: int) -> np.ndarray:
    """The image shrunk by a whole factor until no side exceeds ``max_side``: (h, w, 3) uint8.

    Built strip by strip (box averages of ``PREVIEW_STRIP`` x W rows), so converting it costs
    one strip of full-size pixels, never a second full image.
    """
    h, w = source.size
    factor = max(1, math.ceil(max(h, w) / max_side))
    if factor == 1:
        return np.ascontiguousarray(source.read(Tile(0, 0, w, h)))
    out = np.zeros((math.ceil(h / factor), math.ceil(w / factor), 3), dtype=np.uint8)
    rows = max(factor, PREVIEW_STRIP // factor * factor)  # a multiple of factor: strips meet exactly
    for y in range(0, h, rows):
        strip = Image.fromarray(np.ascontiguousarray(source.read(Tile(0, y, w, min(y + rows, h)))))
        small = np.asarray(strip.reduce(factor))  # (ceil(rows / f), ceil(w / f), 3) box averages
        out[y // factor : y // factor + small.shape[0]] = small
    return out


# ---- merging ------------------------------------------------------------------------------


@dataclass
class _Part:
    """One tile's detection in the full frame; its mask kept as the tile's RLE until needed
    (62,500 detections of a 20000-px image as bool crops would take gigabytes)."""

    tile: Tile
    label: int
    score: float
    box: np.ndarray  # (4,) x1 y1 x2 y2 full-image pixels
    name: str
    rle: dict | None = None  # in the tile's frame; None for a box-only model

    def crop(self) -> tuple[int, int, np.ndarray]:
        """(y0, x0, (h, w) bool): the mask's box-local pixels at full-image row y0, column x0."""
        assert self.rle is not None
        y0, x0, crop = decode_one(self.rle)
        return y0 + self.tile.y0, x0 + self.tile.x0, crop


def _window(crop: tuple[int, int, np.ndarray], r: Tile) -> np.ndarray:
    """A mask crop over rectangle ``r``: (r.y1 - r.y0, r.x1 - r.x0) bool."""
    top, left, pixels = crop
    out = np.zeros((r.y1 - r.y0, r.x1 - r.x0), dtype=bool)
    y0, x0 = max(top, r.y0), max(left, r.x0)
    y1, x1 = min(top + pixels.shape[0], r.y1), min(left + pixels.shape[1], r.x1)
    if y1 > y0 and x1 > x0:
        out[y0 - r.y0 : y1 - r.y0, x0 - r.x0 : x1 - r.x0] = pixels[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def _parts(tiles: Sequence[Tile], results: Sequence[Result]) -> list[_Part]:
    """Every tile's detections moved to the full frame."""
    parts = []
    for tile, result in zip(tiles, results):
        shift = np.array([tile.x0, tile.y0, tile.x0, tile.y0], dtype=np.float32)
        for i in range(len(result)):
            rle = None if result.rles is None else result.rles[i]
            parts.append(
                _Part(
                    tile,
                    int(result.labels[i]),
                    float(result.scores[i]),
                    result.boxes[i] + shift,
                    result.class_names[i],
                    rle,
                )
            )
    return parts


def _overlap_within(a: _Part, b: _Part, shared: Tile) -> float:
    """IoU of two detections' masks inside ``shared``; for boxes, intersection over the smaller."""
    boxes = np.stack([a.box, b.box])  # (2, 4)
    clip = np.clip(boxes, [shared.x0, shared.y0] * 2, [shared.x1, shared.y1] * 2)
    if a.rle is None or b.rle is None:
        areas = (clip[:, 2] - clip[:, 0]).clip(0) * (clip[:, 3] - clip[:, 1]).clip(0)
        inter = max(0.0, min(clip[:, 2]) - max(clip[:, 0])) * max(0.0, min(clip[:, 3]) - max(clip[:, 1]))
        return float(inter / areas.min()) if areas.min() > 0 else 0.0
    ca, cb = a.crop(), b.crop()
    # Only the part of ``shared`` that either mask's crop reaches needs looking at.
    reach = Tile(
        min(ca[1], cb[1]),
        min(ca[0], cb[0]),
        max(ca[1] + ca[2].shape[1], cb[1] + cb[2].shape[1]),
        max(ca[0] + ca[2].shape[0], cb[0] + cb[2].shape[0]),
    )
    region = reach.intersect(shared)
    if region is None:
        return 0.0
    ma, mb = _window(ca, region), _window(cb, region)
    union = np.count_nonzero(ma | mb)
    return np.count_nonzero(ma & mb) / union if union else 0.0


def _links(tiles: Sequence[Tile], parts: list[_Part], match_iou: float) -> Iterator[tuple[int, int]]:
    """Pairs of part indices that are one object by the merge rule."""
    index = {t: i for i, t in enumerate(tiles)}
    by_tile: dict[int, list[int]] = {}
    for k, p in enumerate(parts):
        by_tile.setdefault(index[p.tile], []).append(k)
    boxes = np.stack([p.box for p in parts]) if parts else np.zeros((0, 4), np.float32)  # (P, 4)
    labels = np.array([p.label for p in parts])
    for i in range(len(tiles)):
        for j in range(i + 1, len(tiles)):
            shared = tiles[i].intersect(tiles[j])
            if shared is None or i not in by_tile or j not in by_tile:
                continue
            lo, hi = np.array([shared.x0, shared.y0] * 2), np.array([shared.x1, shared.y1] * 2)

            def inside(ks: list[int]) -> np.ndarray:  # the parts whose box reaches into ``shared``
                c = np.clip(boxes[ks], lo, hi)  # (n, 4)
                return np.asarray(ks)[(c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])]

            ka, kb = inside(by_tile[i]), inside(by_tile[j])
            if not len(ka) or not len(kb):
                continue
            ba, bb = np.clip(boxes[ka], lo, hi), np.clip(boxes[kb], lo, hi)  # (na, 4), (nb, 4)
            w = np.minimum(ba[:, None, 2], bb[None, :, 2]) - np.maximum(ba[:, None, 0], bb[None, :, 0])  # (na, nb)
            h = np.minimum(ba[:, None, 3], bb[None, :, 3]) - np.maximum(ba[:, None, 1], bb[None, :, 1])
            same = (labels[ka][:, None] == labels[kb][None, :]) & (w > 0) & (h > 0)
            for u, v in zip(*np.nonzero(same)):
                if _overlap_within(parts[ka[u]], parts[kb[v]], shared) >= match_iou:
                    yield int(ka[u]), int(kb[v])


def merge_tiles(
    tiles: Sequence[Tile],
    results: Sequence[Result],
    image_size: tuple[int, int],
    match_iou: float = MATCH_IOU,
    path: str | None = None,
    image: np.ndarray | None = None,
) -> Result:
    """Each tile's ``Result`` (in its tile frame) -> one ``Result`` for the full image.

    Args:
        tiles: the tiles, as ``tile_grid`` gives them.
        results: one ``Result`` per tile, in the tile's own frame.
        image_size: (H, W) of the full image.
        match_iou: mask IoU inside the shared rectangle from which two tiles' detections are
            one object (module docstring).
        path, image: carried into the ``Result`` (``image`` may be a preview).

    Returns:
        Detections in the full frame, best score first; masks as full-image RLEs built from
        box-local crops.
    """
    parts = _parts(tiles, results)
    parent = list(range(len(parts)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b in _links(tiles, parts, match_iou):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[_Part]] = {}
    for k, p in enumerate(parts):
        groups.setdefault(root(k), []).append(p)

    merged = sorted(groups.values(), key=lambda g: -max(p.score for p in g))
    has_masks = bool(results) and all(r.rles is not None for r in results)
    boxes, scores, labels, names, rles = [], [], [], [], []
    for group in merged:
        best = max(group, key=lambda p: p.score)
        stack = np.stack([p.box for p in group])  # (n, 4)
        boxes.append([*stack[:, :2].min(0), *stack[:, 2:].max(0)])
        scores.append(best.score)
        labels.append(best.label)
        names.append(best.name)
        if has_masks:
            rles.append(_union_rle(group, image_size))
    table = next((r.category_table for r in results), None)
    return Result(
        np.array(boxes, dtype=np.float32).reshape(-1, 4),
        np.array(scores),
        np.array(labels),
        image_size,
        rles=rles if has_masks else None,
        class_names=names,
        path=path,
        image=image,
        category_table=table,
    )


def _union_rle(group: list[_Part], image_size: tuple[int, int]) -> dict:
    """The union of a group's masks as one full-image RLE, built in their joint box frame."""
    if len(group) == 1:  # the common case: no pixels to combine, only a frame to move
        y0, x0, crop = group[0].crop()
        return crop_to_rle(crop, y0, x0, image_size)
    crops = [c for c in (p.crop() for p in group) if c[2].size]
    if not crops:
        return crop_to_rle(np.zeros((0, 0), dtype=bool), 0, 0, image_size)
    frame = Tile(
        min(x for _, x, _ in crops),
        min(y for y, _, _ in crops),
        max(x + c.shape[1] for _, x, c in crops),
        max(y + c.shape[0] for y, _, c in crops),
    )
    union = np.zeros((frame.y1 - frame.y0, frame.x1 - frame.x0), dtype=bool)
    for y, x, c in crops:
        union[y - frame.y0 : y - frame.y0 + c.shape[0], x - frame.x0 : x - frame.x0 + c.shape[1]] |= c
    return crop_to_rle(union, frame.y0, frame.x0, image_size)


# ---- the tiled run ------------------------------------------------------------------------


def add_whole_image_pass(
    source: Source,
    run: Callable[[Iterable[list[np.ndarray]]], Iterator[list[Result]]],
    tile: int,
    overlap: float,
    merged: Result,
) -> Result:
    """``merged`` with the objects too large for a tile, found on the whole image shrunk to a tile.

    The image is shrunk by the whole factor ``f`` that brings it within one tile and run once.
    Of its detections, those longer than a tile step (``tile - overlap``: no tile need hold
    them whole) are kept, scaled up by ``f`` (masks pixel for pixel, blocks of ``f x f``); a
    tile detection of the same class with at least half its mask (box for a box-only model)
    inside one of them is taken for a piece of it and dropped.
    """
    h, w = source.size
    factor = math.ceil(max(h, w) / tile)
    (found,) = next(iter(run(iter([[preview(source, tile)]]))))
    if found.error is not None:
        log.warning("whole-image pass failed, tiles only: %s", found.error)
        return merged
    step = tile - round(tile * overlap)
    sides = (found.boxes[:, 2:] - found.boxes[:, :2]).max(axis=1) * factor if len(found) else np.zeros(0)
    big = found[np.flatnonzero(sides > step)]
    if not len(big):
        return merged
    boxes = np.clip(big.boxes * factor, 0, [w, h, w, h])
    rles = None
    if big.rles is not None:
        rles = []
        for rle in big.rles:
            y0, x0, crop = decode_one(rle)
            up = np.repeat(np.repeat(crop, factor, axis=0), factor, axis=1)[: h - y0 * factor, : w - x0 * factor]
            rles.append(crop_to_rle(up, y0 * factor, x0 * factor, (h, w)))
    if len(merged) and rles is not None and merged.rles is not None:
        inside = mask_util.iou(merged.rles, rles, [1] * len(rles))  # (N, B): |tile & big| / |tile| (crowd rule)
    elif len(merged):
        inside = mask_util.iou(_xywh(merged.boxes), _xywh(boxes), [1] * len(boxes))
    else:
        inside = np.zeros((0, len(big)))
    pieces = (
        (np.asarray(inside).reshape(len(merged), len(big)) >= 0.5) & (merged.labels[:, None] == big.labels[None, :])
    ).any(axis=1)
    kept = merged[np.flatnonzero(~pieces)]
    order = np.argsort(-np.concatenate([kept.scores, big.scores]), kind="stable")
    has_masks = kept.rles is not None and rles is not None
    joined = Result(
        np.concatenate([kept.boxes, boxes])[order],
        np.concatenate([kept.scores, big.scores])[order],
        np.concatenate([kept.labels, big.labels])[order],
        (h, w),
        rles=[(kept.rles + rles)[i] for i in order] if has_masks else None,  # type: ignore[operator]
        class_names=[(kept.class_names + big.class_names)[i] for i in order],
        path=merged.path,
        image=merged.image,
        category_table=merged.category_table or big.category_table,
    )
    log.debug("whole-image pass: %d large objects replace %d tile detections", len(big), int(pieces.sum()))
    return joined


def _xywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) x1 y1 x2 y2 -> x y w h, as pycocotools takes boxes."""
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float64)
