"""Detection operators in pure PyTorch, numerically matching torchvision's kernels.

Boxes are ``(x1, y1, x2, y2)`` pixels with width ``x2 - x1``. Every function works on CPU and
CUDA tensors; see each module for shapes and coordinate rules.
"""

from __future__ import annotations

from .box_coder import BoxCoder
from .boxes import box_area, box_iou, clip_boxes, remove_small_boxes
from .nms import batched_nms, nms
from .paste import paste_crops, paste_masks
from .poolers import assign_fpn_levels, infer_scale, multiscale_roi_align
from .roi_align import RoIAlign, roi_align, rois_from_boxes
from .roi_pool import roi_pool

__all__ = [
    "BoxCoder",
    "RoIAlign",
    "assign_fpn_levels",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "infer_scale",
    "multiscale_roi_align",
    "nms",
    "paste_crops",
    "paste_masks",
    "remove_small_boxes",
    "roi_align",
    "roi_pool",
    "rois_from_boxes",
]
