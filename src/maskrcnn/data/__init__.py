"""Datasets, converters, augmentation and batching.

Every dataset yields ``(image, targets, info)``: image (3, H, W) float32 RGB in [0, 1],
``maskrcnn.structures.Targets`` in the image's pixel frame with labels 1..K, and an info
dict (``image_id``, ``file_name``, ``orig_size``). Other formats (VIA, DSB 2018) are converted
to COCO JSON once and read with ``CocoDataset``.
"""

from __future__ import annotations

from .coco import CocoDataset, read_coco, read_json, segmentation_to_mask
from .dsb import dsb_to_coco
from .errors import DatasetError
from .images import image_size, load_rgb, to_tensor
from .sampler import DistributedGroupedBatchSampler, GroupedBatchSampler, aspect_ratio_groups, collate
from .synthetic import SplitPaths, ensure_dataset, generate_digits, generate_shapes
from .transforms import ColorJitter, Compose, FlipAugmented, RandomHorizontalFlip, hflip
from .via import via_to_coco

__all__ = [
    "CocoDataset",
    "ColorJitter",
    "Compose",
    "DatasetError",
    "DistributedGroupedBatchSampler",
    "FlipAugmented",
    "GroupedBatchSampler",
    "RandomHorizontalFlip",
    "SplitPaths",
    "aspect_ratio_groups",
    "collate",
    "dsb_to_coco",
    "ensure_dataset",
    "generate_digits",
    "generate_shapes",
    "hflip",
    "image_size",
    "load_rgb",
    "read_coco",
    "read_json",
    "segmentation_to_mask",
    "to_tensor",
    "via_to_coco",
]
