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

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["paste_masks"]


def _expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Grow boxes by ``scale`` about their centres, in torchvision's evaluation order."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1)  # (N, 4)


def paste_masks(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    padding: int = 1,
    threshold: float | None = None,
) -> Tensor:
    """Resize each mask to its box and place it in an otherwise empty image.

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
    n, m = masks.shape[0], masks.shape[-1]
    im_h, im_w = int(image_size[0]), int(image_size[1])
    out_dtype = torch.bool if threshold is not None else masks.dtype
    out = torch.zeros((n, im_h, im_w), dtype=out_dtype, device=masks.device)
    if n == 0:
        return out
    scale = float(m + 2 * padding) / m
    padded = F.pad(masks, (padding,) * 4)  # (N, M + 2p, M + 2p)
    boxes_int = _expand_boxes(boxes, scale).to(torch.int64).tolist()  # truncation toward zero
    for i, (x1, y1, x2, y2) in enumerate(boxes_int):
        w = max(x2 - x1 + 1, 1)
        h = max(y2 - y1 + 1, 1)
        x0, x_end = max(x1, 0), min(x2 + 1, im_w)
        y0, y_end = max(y1, 0), min(y2 + 1, im_h)
        if x_end <= x0 or y_end <= y0:  # box entirely outside the image
            continue
        resized = F.interpolate(padded[i][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        part = resized[y0 - y1 : y_end - y1, x0 - x1 : x_end - x1]  # (y_end - y0, x_end - x0)
        out[i, y0:y_end, x0:x_end] = part > threshold if threshold is not None else part
    return out
