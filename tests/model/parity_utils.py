"""Helpers shared by the parity tests (torchvision and Detectron2 fixtures): float32 math on
CUDA, moving stage outputs to the CPU, and the README tolerances' matching rules."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from maskrcnn.ops.boxes import box_iou


@contextlib.contextmanager
def float32_math() -> Iterator[None]:
    """True float32 convolutions and matrix products on CUDA (no TF32) for the block's duration."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def to_cpu(x):
    """Stage outputs (tensors, Detections, ImageBatch, lists and tuples of them) on the CPU."""
    if isinstance(x, (list, tuple)):
        return type(x)(to_cpu(v) for v in x)
    return None if x is None else x.to("cpu")


def rms_of(ref: dict, level: str) -> float:
    """Root mean square of a reference FPN level, from its stored channel sums of squares."""
    shape = ref[f"feature_{level}_shape"]
    count = shape[0] * shape[2] * shape[3]
    return float(np.sqrt(ref[f"feature_{level}_channel_sumsq"].sum() / (count * shape[1])))


def check_features(feats: list[torch.Tensor], ref: dict) -> None:
    """FPN outputs P2..P6 against a fixture's shapes, channel sums, sums of squares and crops,
    within 1e-3 relative to each level's root mean square."""
    for i, level in enumerate(["0", "1", "2", "3", "pool"]):
        f = feats[i]
        assert list(f.shape) == list(ref[f"feature_{level}_shape"]), level
        rms = rms_of(ref, level)
        count = f.shape[0] * f.shape[2] * f.shape[3]
        fd = f.double()
        sums = fd.sum(dim=(0, 2, 3)).numpy()
        sumsq = (fd**2).sum(dim=(0, 2, 3)).numpy()
        assert np.abs(sums - ref[f"feature_{level}_channel_sum"]).max() <= 1e-3 * rms * count, level
        assert np.abs(sumsq - ref[f"feature_{level}_channel_sumsq"]).max() <= 1e-3 * rms**2 * count, level
        h, w = f.shape[-2:]
        corner = f[:, :, :8, :8].numpy()
        centre = f[:, :, h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4].numpy()
        assert np.abs(corner - ref[f"feature_{level}_crop_corner"]).max() <= 1e-3 * rms, level
        assert np.abs(centre - ref[f"feature_{level}_crop_center"]).max() <= 1e-3 * rms, level


def matched_fraction(ours: torch.Tensor, theirs: torch.Tensor, thresh: float = 0.99) -> float:
    """Share of ``theirs`` boxes that one of ``ours`` overlaps with IoU >= ``thresh``."""
    if len(theirs) == 0:
        return 1.0
    if len(ours) == 0:
        return 0.0
    return float((box_iou(theirs, ours).max(dim=1).values >= thresh).float().mean())


def match_detections(boxes, labels, ref_boxes, ref_labels):
    """For each reference detection, the index of our same-label detection with IoU >= 0.99, or -1."""
    if len(boxes) == 0 or len(ref_boxes) == 0:
        return np.full(len(ref_boxes), -1)
    iou = box_iou(ref_boxes, boxes)
    iou[ref_labels[:, None] != labels[None, :]] = 0
    best, idx = iou.max(dim=1)
    return np.where(best.numpy() >= 0.99, idx.numpy(), -1)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
