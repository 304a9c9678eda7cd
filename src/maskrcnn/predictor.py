"""``model.predict``: images in whatever form a user has, ``Result`` objects out."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .data.images import load_rgb, to_tensor
from .model.mask_rcnn import MaskRCNN
from .results import Result

log = logging.getLogger(__name__)

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


def as_rgb(image: ImageLike) -> tuple[np.ndarray, str | None]:
    """Any supported image -> ((H, W, 3) uint8 RGB array, source path or None).

    Paths are decoded with EXIF orientation; PIL images of any mode are converted; arrays may
    be (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA, uint8 (or float in 0..1); tensors are
    (3, H, W) float in 0..1.
    """
    if isinstance(image, (str, Path)):
        return load_rgb(image), str(image)
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(image, dtype=np.float64)
            a = np.clip(a / max(a.max(), 1.0) * 255.0, 0, 255).astype(np.uint8)
            return np.repeat(a[:, :, None], 3, axis=2), None
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy(), None
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor images must be (3, H, W) floats in 0..1, got shape {tuple(image.shape)}")
        return (image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()), None
    if isinstance(image, np.ndarray):
        a = image
        if a.dtype != np.uint8:
            if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
                a = (a * 255).round()
            a = np.clip(a, 0, 255).astype(np.uint8)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise ValueError(f"array images must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
        return np.ascontiguousarray(a[:, :, :3]), None
    raise TypeError(f"unsupported image type {type(image).__name__}; pass a path, PIL image, array or tensor")


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.inference_mode()
def predict(
    model: MaskRCNN,
    images: ImageLike | Iterable[ImageLike],
    batch_size: int = 1,
    score_thresh: float | None = None,
    mask_thresh: float | None = None,
    keep_images: bool = True,
) -> Result | list[Result]:
    """Run ``model`` on one image or a list of images.

    Args:
        model: a ``MaskRCNN`` (switched to eval mode for the call).
        images: a path, PIL image, array or tensor, or a list of them.
        batch_size: images per forward pass.
        score_thresh: keep detections with score >= this (default: the model's own threshold,
            0.05 for torchvision's weights, so results equal torchvision's).
        mask_thresh: mask probability above which a pixel belongs to the object (default the
            config's, 0.5).
        keep_images: keep the pixels in each ``Result`` for ``.plot()``.
    Returns:
        A ``Result`` for a single image, else a list in input order.
    """
    single = isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor))
    items = [images] if single else list(images)  # type: ignore[list-item]
    cfg = model.config
    mask_thresh = cfg.roi_heads.mask_thresh if mask_thresh is None else mask_thresh
    names = cfg.label_names()
    was_training = model.training
    saved_thresh = model.roi_heads.score_thresh
    if score_thresh is not None and score_thresh < saved_thresh:
        model.roi_heads.score_thresh = score_thresh  # let lower-scored candidates through NMS too
    model.eval()
    results: list[Result] = []
    try:
        for chunk in _chunks(items, max(1, batch_size)):
            arrays = [as_rgb(x) for x in chunk]
            tensors = [to_tensor(a).to(model.device) for a, _ in arrays]
            out = model(tensors, mask_threshold=mask_thresh)
            for (array, path), det in zip(arrays, out.detections or []):
                if score_thresh is not None:
                    det = det[det.scores >= score_thresh]
                results.append(
                    Result.from_detections(
                        det, array.shape[:2], names, path=path, image=array if keep_images else None
                    )
                )
    finally:
        model.roi_heads.score_thresh = saved_thresh
        model.train(was_training)
    return results[0] if single else results
