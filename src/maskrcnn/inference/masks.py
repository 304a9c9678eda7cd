"""Instance masks as COCO run-length encodings (RLE): the form ``Result`` keeps them in.

A mask is stored as pycocotools' compressed RLE of the full image (``{"size": [H, W],
"counts": bytes}``), what COCO results files, ``COCOeval`` and ``pycocotools.mask`` take. A
pasted mask is zero outside its box, so its RLE is built from the box-sized crop alone
(``crop_to_rle``): time and memory grow with the box, never with the image, and 100 masks of a
24-megapixel photo take kilobytes instead of 2.4 GB of bool frames. A full frame is decoded
only when asked for (``decode``) and one mask at a time for drawing (``decode_one``).

Shape shorthand: N masks, H x W image, h x w crop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pycocotools.mask as mask_util
from torch import Tensor

from ..ops.paste import paste_crops

RLE = dict  # {"size": [H, W], "counts": bytes}, pycocotools' compressed form
_EDGE_BLOCK = 1 << 24  # crop pixels whose run edges crop_to_rle finds at a time (16 MB of scratch)


def crop_to_rle(crop: np.ndarray, y0: int, x0: int, image_size: tuple[int, int]) -> RLE:
    """Compressed COCO RLE of an H x W mask that is ``crop`` at (y0, x0) and False elsewhere.

    Equal to ``pycocotools.mask.encode`` of the full frame, computed from the crop only.

    Args:
        crop: (h, w) bool, inside the image: 0 <= y0, y0 + h <= H, 0 <= x0, x0 + w <= W.
        y0, x0: image row and column of the crop's top-left pixel.
        image_size: (H, W).
    """
    im_h, im_w = int(image_size[0]), int(image_size[1])
    crop = np.asarray(crop, dtype=bool)
    h, w = crop.shape
    if h and w and not (0 <= y0 and y0 + h <= im_h and 0 <= x0 and x0 + w <= im_w):
        raise ValueError(f"crop {h}x{w} at (y={y0}, x={x0}) is not inside the {im_h}x{im_w} image")
    # RLE runs go down each column, then on to the next one (Fortran order). Each crop column,
    # framed by a zero above and below, changes value exactly where a run starts or ends.
    # Columns are taken a block at a time, so a crop as large as the image (a road network,
    # an object joined across many tiles) costs a block of scratch memory, not 3 copies of it.
    step = max(1, _EDGE_BLOCK // (h + 2))
    found = []
    for c0 in range(0, w, step):
        block = crop[:, c0 : c0 + step]  # (h, wb)
        framed = np.zeros((block.shape[1], h + 2), dtype=np.int8)  # (wb, h + 2): crop columns as rows
        framed[:, 1:-1] = block.T
        col, row = np.nonzero(np.diff(framed, axis=1))  # (wb, h + 1) edges, found column by column
        found.append((x0 + c0 + col).astype(np.int64) * im_h + y0 + row)  # flat Fortran index of each edge
    edges = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    starts, ends = edges[0::2], edges[1::2]  # runs of ones: [start, end)
    # A run that reaches the bottom of a column continues at the top of the next one.
    if len(starts):
        joined = starts[1:] == ends[:-1]
        starts = starts[np.concatenate(([True], ~joined))]
        ends = ends[np.concatenate((~joined, [True]))]
    bounds = np.stack([starts, ends], axis=1).reshape(-1)  # (2R,) s0 e0 s1 e1 ...
    counts = np.diff(np.concatenate(([0], bounds, [im_h * im_w])))  # zeros, ones, zeros, ...
    if len(bounds) and bounds[-1] == im_h * im_w:
        counts = counts[:-1]  # pycocotools ends on the last run, with no empty zeros run
    return mask_util.frPyObjects({"size": [im_h, im_w], "counts": counts.tolist()}, im_h, im_w)


def paste_to_rles(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    threshold: float,
    padding: int = 1,
    mode: str = "torchvision",
) -> list[RLE]:
    """Per-box mask probabilities pasted into the image (``ops.paste``) and thresholded, as RLEs.

    Args:
        masks: (N, M, M) float probabilities over each box.
        boxes: (N, 4) x1 y1 x2 y2 in pixels of the image.
        image_size: (H, W).
        threshold: a pixel is foreground where its pasted probability is above this.
        mode: the pasting rule, ``ops.paste``'s "torchvision" or "detectron2".

    Returns:
        N RLEs, pixel for pixel ``paste_masks(masks, boxes, image_size, threshold=threshold, mode=mode)``.
    """
    return [
        crop_to_rle(crop.cpu().numpy(), y0, x0, image_size)
        for y0, x0, crop in paste_crops(masks, boxes, image_size, padding=padding, threshold=threshold, mode=mode)
    ]


def encode(masks: np.ndarray) -> list[RLE]:
    """(N, H, W) masks (nonzero = foreground) -> N RLEs, one frame in memory at a time."""
    masks = np.asarray(masks)
    return [mask_util.encode(np.asfortranarray(m, dtype=np.uint8)) for m in (masks != 0)]


def decode(rles: Sequence[RLE], image_size: tuple[int, int]) -> np.ndarray:
    """N RLEs -> (N, H, W) bool (N x H x W bytes: for drawing, prefer ``decode_one``)."""
    out = np.zeros((len(rles), int(image_size[0]), int(image_size[1])), dtype=bool)
    for i, rle in enumerate(rles):
        y0, x0, crop = decode_one(rle)
        out[i, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return out


def decode_one(rle: RLE) -> tuple[int, int, np.ndarray]:
    """One RLE -> (y0, x0, crop): the (h, w) bool pixels of the mask's bounding box at (y0, x0).

    Only the box is decoded, from the runs themselves: time and memory follow the object, not
    the image (a full 20000 x 20000 frame would be 400 MB per mask). An empty mask gives a
    0 x 0 crop.
    """
    x, y, w, h = (int(v) for v in mask_util.toBbox(rle))
    if w == 0 or h == 0:
        return 0, 0, np.zeros((0, 0), dtype=bool)
    im_h = int(rle["size"][0])
    counts = rle["counts"]
    runs = _uncompress(counts) if isinstance(counts, (bytes, str)) else np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(runs)  # flat Fortran index where each run ends; odd runs are ones
    starts = ends - runs
    starts, ends = starts[1::2], ends[1::2]  # (R,) runs of ones: [start, end)
    starts, ends = starts[ends > starts], ends[ends > starts]
    # A run may continue from the bottom of one column to the top of the next: split it into
    # column pieces. Inside the box's columns every piece lies within rows y .. y + h - 1.
    first_col, last_col = starts // im_h, (ends - 1) // im_h
    pieces = last_col - first_col + 1  # (R,) columns each run touches
    col = np.repeat(first_col, pieces) + (np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces))
    run = np.repeat(np.arange(len(starts)), pieces)
    row0 = np.where(col == first_col[run], starts[run] - col * im_h, 0)
    row1 = np.where(col == last_col[run], ends[run] - col * im_h, im_h)
    # Mark each piece's start and end in the crop's own Fortran layout; a running sum fills it.
    # Pieces never overlap, so the sum is 0 or 1: int8 keeps this at 3 bytes a box pixel (a
    # default int64 sum took 13, 1.3 GB for a 10000 x 10000 box).
    edges = np.zeros(w * h + 1, dtype=np.int8)
    np.add.at(edges, (col - x) * h + row0 - y, 1)
    np.add.at(edges, (col - x) * h + row1 - y, -1)
    crop = np.cumsum(edges[:-1], dtype=np.int8).reshape(w, h).T > 0  # (h, w)
    return y, x, crop


def _uncompress(counts: bytes | str) -> np.ndarray:
    """pycocotools' compressed counts string -> run lengths (``rleFrString`` in maskApi.c)."""
    data = counts.encode("ascii") if isinstance(counts, str) else counts
    runs: list[int] = []
    p = 0
    while p < len(data):
        value, shift, more = 0, 0, True
        while more:
            c = data[p] - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift  # sign-extend the last 5-bit group
        if len(runs) > 2:
            value += runs[-2]  # each count after the third is stored as a difference
        runs.append(value)
    return np.asarray(runs, dtype=np.int64)
