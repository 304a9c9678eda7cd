"""Paste fixed-size mask predictions into full images (torchvision ``paste_masks_in_image``).

An ``M x M`` mask covers its box. It is padded by ``padding`` zero cells on each side and
its box grown by ``(M + 2 * padding) / M`` about its centre, so bilinear resizing fades the
mask out at the box edge instead of clamping. The grown box is truncated to integers
(toward zero); the padded mask is resized to ``(y2 - y1 + 1) x (x2 - x1 + 1)`` pixels with
``F.interpolate(mode="bilinear", align_corners=False)`` and written at rows ``y1..y2`` and
columns ``x1..x2``, clipped to the image.

Shape shorthand: N masks, M x M mask resolution, h x w image.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["paste_crops", "paste_masks"]


def _expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Grow boxes by ``scale`` about their centres, in torchvision's evaluation order."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1)  # (N, 4)


def paste_crops(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    padding: int = 1,
    threshold: float | None = None,
) -> Iterator[tuple[int, int, Tensor]]:
    """Resize each mask to its box, clipped to the image: the pasted pixels without the image.

    The same pixels as ``paste_masks`` (which is built on this), but one box-sized crop at a
    time, so a caller can keep 100 masks of a 24-megapixel photo without 100 full frames.

    Args:
        masks: ``Tensor[N, M, M]`` float mask probabilities.
        boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)`` in pixels of the target image.
        image_size: ``(h, w)`` of the target image.
        padding: zero cells added around each mask before resizing (torchvision uses 1).
        threshold: if given, crops are ``mask > threshold`` as bool.

    Yields:
        N tuples ``(y0, x0, crop)``, in order: ``crop`` (``Tensor[hc, wc]``, ``masks``' dtype
        or bool) holds image rows ``y0 .. y0 + hc - 1`` and columns ``x0 .. x0 + wc - 1``; every
        pixel outside it is 0 / False. A box entirely outside the image gives a 0 x 0 crop.
    """
    n, m = masks.shape[0], masks.shape[-1]
    im_h, im_w = int(image_size[0]), int(image_size[1])
    if n == 0:
        return
    scale = float(m + 2 * padding) / m
    padded = F.pad(masks, (padding,) * 4)  # (N, M + 2p, M + 2p)
    boxes_int = _expand_boxes(boxes, scale).to(torch.int64).tolist()  # truncation toward zero
    for i, (x1, y1, x2, y2) in enumerate(boxes_int):
        w = max(x2 - x1 + 1, 1)
        h = max(y2 - y1 + 1, 1)
        x0, x_end = max(x1, 0), min(x2 + 1, im_w)
        y0, y_end = max(y1, 0), min(y2 + 1, im_h)
        if x_end <= x0 or y_end <= y0:  # box entirely outside the image
            dtype = torch.bool if threshold is not None else masks.dtype
            yield 0, 0, masks.new_zeros((0, 0), dtype=dtype)
            continue
        resized = F.interpolate(padded[i][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        part = resized[y0 - y1 : y_end - y1, x0 - x1 : x_end - x1]  # (y_end - y0, x_end - x0)
        yield y0, x0, (part > threshold if threshold is not None else part)


def paste_masks(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    padding: int = 1,
    threshold: float | None = None,
) -> Tensor:
    """Resize each mask to its box and place it in an otherwise empty image.

    Memory is N x h x w: for large images keep ``paste_crops``' crops (or their RLE, as
    ``Result`` does) instead.

    Args:
        masks: ``Tensor[N, M, M]`` float mask probabilities (any float values work).
        boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)`` in pixels of the target image.
        image_size: ``(h, w)`` of the target image.
        padding: zero cells added around each mask before resizing (torchvision uses 1).
        threshold: if given, return ``mask > threshold`` as bool (a quarter of the memory).

    Returns:
        ``Tensor[N, h, w]``: ``masks``' dtype, or bool with ``threshold``. Pixels outside the
        (grown) box are 0 / False.
    """
    out_dtype = torch.bool if threshold is not None else masks.dtype
    out = torch.zeros((masks.shape[0], int(image_size[0]), int(image_size[1])), dtype=out_dtype, device=masks.device)
    for i, (y0, x0, crop) in enumerate(paste_crops(masks, boxes, image_size, padding, threshold)):
        out[i, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return out
