"""Paste fixed-size mask predictions into full images (torchvision ``paste_masks_in_image``).

An ``M x M`` mask covers its box. It is padded by ``padding`` zero cells on each side and
its box grown by ``(M + 2 * padding) / M`` about its centre, so bilinear resizing fades the
mask out at the box edge instead of clamping. The grown box is truncated to integers
(toward zero); the padded mask is resized to ``(y2 - y1 + 1) x (x2 - x1 + 1)`` pixels with
``F.interpolate(mode="bilinear", align_corners=False)`` and written at rows ``y1..y2`` and
columns ``x1..x2``, clipped to the image. A pixel is foreground where the pasted probability
is above the threshold.

``mode="detectron2"`` pastes as Detectron2's ``paste_masks_in_image`` does instead: each image
pixel centre is mapped into the box's continuous frame and the unpadded mask is sampled there
with ``F.grid_sample`` (zeros outside), over the box's integer hull grown by one pixel; a pixel
is foreground where the probability is at least the threshold.

Shape shorthand: N masks, M x M mask resolution, h x w image.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["paste_crops", "paste_masks"]

MODES = ("torchvision", "detectron2")


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
    mode: str = "torchvision",
) -> Iterator[tuple[int, int, Tensor]]:
    """Resize each mask to its box, clipped to the image: the pasted pixels without the image.

    The same pixels as ``paste_masks`` (which is built on this), but one box-sized crop at a
    time, so a caller can keep 100 masks of a 24-megapixel photo without 100 full frames.

    Args:
        masks: ``Tensor[N, M, M]`` float mask probabilities.
        boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)`` in pixels of the target image.
        image_size: ``(h, w)`` of the target image.
        padding: zero cells added around each mask before resizing (torchvision uses 1).
        threshold: if given, crops are ``mask > threshold`` as bool (``>=`` for "detectron2").
        mode: "torchvision" or "detectron2" (see the module docstring; ``padding`` is unused
            by "detectron2").

    Yields:
        N tuples ``(y0, x0, crop)``, in order: ``crop`` (``Tensor[hc, wc]``, ``masks``' dtype
        or bool) holds image rows ``y0 .. y0 + hc - 1`` and columns ``x0 .. x0 + wc - 1``; every
        pixel outside it is 0 / False. A box entirely outside the image gives a 0 x 0 crop.
    """
    if mode == "detectron2":
        yield from _grid_sample_crops(masks, boxes, image_size, threshold)
        return
    if mode != "torchvision":
        raise ValueError(f"paste mode must be one of {', '.join(MODES)}, got {mode!r}")
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


def _grid_sample_crops(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float | None
) -> Iterator[tuple[int, int, Tensor]]:
    """Detectron2's CPU path of ``paste_masks_in_image``, one mask at a time, in its
    evaluation order (float32 grid, ``align_corners=False``)."""
    im_h, im_w = int(image_size[0]), int(image_size[1])
    for i in range(masks.shape[0]):
        box = boxes[i : i + 1].float()  # (1, 4)
        x0_int, y0_int = (int(v) for v in torch.clamp(box[0, :2].floor() - 1, min=0).to(torch.int32))
        x1_int = int(torch.clamp(box[0, 2].ceil() + 1, max=im_w).to(torch.int32))
        y1_int = int(torch.clamp(box[0, 3].ceil() + 1, max=im_h).to(torch.int32))
        if x1_int <= x0_int or y1_int <= y0_int:  # box entirely outside the image
            yield 0, 0, masks.new_zeros((0, 0), dtype=torch.bool if threshold is not None else masks.dtype)
            continue
        x0, y0, x1, y1 = torch.split(box, 1, dim=1)  # each (1, 1)
        img_y = torch.arange(y0_int, y1_int, device=masks.device, dtype=torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int, device=masks.device, dtype=torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1  # (1, h) in the box's [-1, 1] frame
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1  # (1, w)
        gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
        gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
        grid = torch.stack([gx, gy], dim=3)  # (1, h, w, 2)
        m = masks[i][None, None].float()  # (1, 1, M, M)
        crop = F.grid_sample(m, grid.to(m.dtype), align_corners=False)[0, 0]  # (h, w)
        yield y0_int, x0_int, (crop >= threshold if threshold is not None else crop.to(masks.dtype))


def paste_masks(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    padding: int = 1,
    threshold: float | None = None,
    mode: str = "torchvision",
) -> Tensor:
    """Resize each mask to its box and place it in an otherwise empty image.

    Memory is N x h x w: for large images keep ``paste_crops``' crops (or their RLE, as
    ``Result`` does) instead.

    Args:
        masks: ``Tensor[N, M, M]`` float mask probabilities (any float values work).
        boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)`` in pixels of the target image.
        image_size: ``(h, w)`` of the target image.
        padding: zero cells added around each mask before resizing (torchvision uses 1).
        threshold: if given, return ``mask > threshold`` as bool (a quarter of the memory;
            ``>=`` for "detectron2").
        mode: "torchvision" or "detectron2" (see the module docstring).

    Returns:
        ``Tensor[N, h, w]``: ``masks``' dtype, or bool with ``threshold``. Pixels outside the
        (grown) box are 0 / False.
    """
    out_dtype = torch.bool if threshold is not None else masks.dtype
    out = torch.zeros((masks.shape[0], int(image_size[0]), int(image_size[1])), dtype=out_dtype, device=masks.device)
    for i, (y0, x0, crop) in enumerate(paste_crops(masks, boxes, image_size, padding, threshold, mode)):
        out[i, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return out
