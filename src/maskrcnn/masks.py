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

from .ops.paste import paste_crops

RLE = dict  # {"size": [H, W], "counts": bytes}, pycocotools' compressed form


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
    framed = np.zeros((w, h + 2), dtype=np.int8)  # (w, h + 2): crop columns as rows
    framed[:, 1:-1] = crop.T
    col, row = np.nonzero(np.diff(framed, axis=1))  # (w, h + 1) edges, found column by column
    edges = (x0 + col).astype(np.int64) * im_h + y0 + row  # flat Fortran index of each edge
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
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float, padding: int = 1, mode: str = "torchvision"
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

    An empty mask gives a 0 x 0 crop. (The full frame is decoded, then cropped: H x W bytes
    for as long as this call runs.)
    """
    x, y, w, h = (int(v) for v in mask_util.toBbox(rle))
    if w == 0 or h == 0:
        return 0, 0, np.zeros((0, 0), dtype=bool)
    full = mask_util.decode(rle)  # (H, W) uint8, Fortran order
    return y, x, full[y : y + h, x : x + w].astype(bool)
