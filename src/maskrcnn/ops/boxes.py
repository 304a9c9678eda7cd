"""Elementary box geometry.

Boxes are ``(x1, y1, x2, y2)`` in pixels with ``x1 <= x2`` and ``y1 <= y2`` expected (not
checked): a box's width is ``x2 - x1`` (no ``+ 1``), so a box is a continuous region, not a
set of pixel indices. Formulas and their evaluation order follow torchvision's ``ops.boxes``,
so results agree bit for bit.

Shape shorthand: N, M boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_area", "box_iou", "clip_boxes", "remove_small_boxes"]


def _upcast(t: Tensor) -> Tensor:
    """Protect products of coordinates from overflow: half precision to float32, small ints to int32."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def box_area(boxes: Tensor) -> Tensor:
    """Area ``(x2 - x1) * (y2 - y1)`` of each box.

    Args:
        boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)``.

    Returns:
        ``Tensor[N]``, float32/float64 (half precision is upcast to float32; integer boxes give
        int32/int64 areas). Degenerate boxes with ``x2 < x1`` give negative areas.
    """
    boxes = _upcast(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection over union.

    ``inter = clamp(min(x2) - max(x1), 0) * clamp(min(y2) - max(y1), 0)`` and
    ``iou = inter / (area1 + area2 - inter)``. Two empty (zero-area) boxes give ``nan``
    (0 / 0), as in torchvision.

    Args:
        boxes1: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)``.
        boxes2: ``Tensor[M, 4]`` ``(x1, y1, x2, y2)``, same frame.

    Returns:
        ``Tensor[N, M]`` floating point; ``(N, M)`` with a zero dimension when either input
        is empty.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = _upcast(rb - lt).clamp(min=0)  # (N, M, 2)
    inter = wh[:, :, 0] * wh[:, :, 1]  # (N, M)
    union = area1[:, None] + area2[None, :] - inter
    return inter / union


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp boxes into an image: ``x`` into ``[0, w]`` and ``y`` into ``[0, h]``.

    Args:
        boxes: ``Tensor[..., 4]`` ``(x1, y1, x2, y2)``.
        size: ``(h, w)`` of the image, in the boxes' frame.

    Returns:
        A new tensor of the same shape and dtype (torchvision ``clip_boxes_to_image``).
    """
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)  # (..., 2)
    y = boxes[..., 1::2].clamp(min=0, max=h)  # (..., 2)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)  # interleave back to x1, y1, x2, y2


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both ``>= min_size``.

    Args:
        boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)``.
        min_size: minimum side length, in the boxes' units.

    Returns:
        ``Tensor[K]`` int64 indices into ``boxes``, increasing.
    """
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    keep = (ws >= min_size) & (hs >= min_size)
    return torch.where(keep)[0]
