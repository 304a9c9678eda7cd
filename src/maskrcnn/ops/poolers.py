"""RoI feature extraction from a feature pyramid (FPN paper, eq. 1), as torchvision's
``MultiScaleRoIAlign``.

Each RoI is pooled from one level: ``k = floor(4 + log2(sqrt(area) / 224))`` clamped to the
pyramid, so a 224 x 224 RoI reads the stride-16 map. Each map's scale is 1 / its fixed stride
(4 ... 32, as Detectron2, and torchvision after its first call), or, with no strides given,
inferred per batch from its height relative to the largest image height, rounded to a power of
two (torchvision's ``_infer_scale``): 1/4 ... 1/32 for ordinary images, larger once an image is
under ~45 px tall, with the level range following. The exported graph computes the same, from
constants or from the traced sizes (``_multiscale_roi_align_traced``).

Shape shorthand: B images, C channels, L levels, K RoIs over the batch, PH x PW output bins.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .boxes import box_area
from .roi_align import _pair, roi_align, rois_from_boxes
from .roi_pool import roi_pool

__all__ = ["assign_fpn_levels", "infer_scale", "multiscale_roi_align"]


def assign_fpn_levels(
    boxes: Tensor,
    k_min: int | Tensor,
    k_max: int | Tensor,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
    mapper: str = "torchvision",
) -> Tensor:
    """Pyramid level of each box, counted from ``k_min``.

    ``clamp(floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), k_min, k_max)
    - k_min``, evaluated in the boxes' dtype as torchvision's ``LevelMapper``.

    Args:
        boxes: ``Tensor[K, 4]`` ``(x1, y1, x2, y2)`` in input-image pixels.
        k_min, k_max: levels (-log2 of the scale) of the finest and coarsest maps; 0-dim float
            tensors when traced for export (they depend on the image height).
        canonical_scale, canonical_level: a box of side ``canonical_scale`` maps to
            ``canonical_level``.
        eps: guards ``floor`` against ``log2`` rounding just below an integer.
        mapper: "torchvision" as above, or "detectron2":
            ``floor(canonical_level + log2(sqrt(area) / canonical_scale + 1e-8))`` (its eps
            sits inside the log; ``eps`` is then unused).

    Returns:
        ``Tensor[K]`` int64 in ``[0, k_max - k_min]``.
    """
    s = torch.sqrt(box_area(boxes))
    if mapper == "detectron2":
        levels = torch.floor(canonical_level + torch.log2(s / canonical_scale + 1e-8))
    elif mapper == "torchvision":
        levels = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    else:
        raise ValueError(f"level mapper must be 'torchvision' or 'detectron2', got {mapper!r}")
    levels = torch.clamp(levels, min=k_min, max=k_max)
    return (levels - k_min).to(torch.int64)


def infer_scale(feature_hw: tuple[int, int], image_hw: tuple[int, int]) -> float:
    """Feature pixels per image pixel, ``2 ** round(log2(feature_h / image_h))``.

    The heights decide (torchvision ``_infer_scale``); the log is taken in float32 as there.

    Args:
        feature_hw: ``(h, w)`` of the feature map.
        image_hw: ``(h, w)`` of the padded input batch.

    Returns:
        A power of two, e.g. ``0.25`` for a stride-4 map.
    """
    approx = float(feature_hw[0]) / float(image_hw[0])
    return 2 ** float(torch.tensor(approx).log2().round())


def multiscale_roi_align(
    features: list[Tensor],
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    output_size: int | tuple[int, int],
    sampling_ratio: int,
    aligned: bool = False,
    pool: str = "align",
    level_mapper: str = "torchvision",
    strides: tuple[int, ...] = (),
) -> Tensor:
    """Pool every RoI from its FPN level.

    Args:
        features: L maps ``Tensor[B, C, Hl, Wl]``, finest first, strides powers of two.
        boxes: one ``Tensor[Ki, 4]`` ``(x1, y1, x2, y2)`` per image, in pixels of the
            (resized, unpadded) input image.
        image_sizes: ``(h, w)`` of each image before padding; their maxima give the padded
            size from which the strides are inferred.
        output_size: ``PH`` or ``(PH, PW)``.
        sampling_ratio: as :func:`roi_align` (ignored by ``pool="pool"``).
        aligned: as :func:`roi_align`.
        pool: ``"align"`` (RoIAlign, seed 3.4.2) or ``"pool"`` (quantised max RoIPool, seed 3.4.1).
        level_mapper: ``mapper`` of :func:`assign_fpn_levels`.
        strides: each level's stride in input pixels (4, 8, 16, 32 for P2..P5), or () to infer
            the scales from the heights (:func:`infer_scale`). Detectron2 uses the fixed strides;
            torchvision infers the scales once, at its first call, and keeps them, which from any
            first image over 74 px high are the fixed strides. Inferred per batch they are wrong
            for thin images: a 30:1 image (44 px high, P2 16 rows) gets 1/2 on P2, 1/16 on P5.

    Returns:
        ``Tensor[sum Ki, C, PH, PW]`` in the features' dtype, RoIs in input order (image 0
        first). Differentiable with respect to the features: every level that requires grad
        gets one, zero where no RoI falls on it.
    """
    if pool not in ("align", "pool"):
        raise ValueError(f"pool must be 'align' or 'pool', got {pool!r}")
    pooled = _pair(output_size)
    rois = rois_from_boxes(boxes)  # (K, 5)
    if strides and len(strides) != len(features):
        raise ValueError(f"{len(strides)} strides for {len(features)} feature levels")
    if torch.onnx.is_in_onnx_export():
        return _multiscale_roi_align_traced(
            features, rois, image_sizes, pooled, sampling_ratio, aligned, level_mapper, strides
        )
    padded_hw = (max(s[0] for s in image_sizes), max(s[1] for s in image_sizes))
    scales = [1.0 / s for s in strides] if strides else [infer_scale(tuple(f.shape[-2:]), padded_hw) for f in features]

    def run(feature: Tensor, level_rois: Tensor, scale: float) -> Tensor:
        if pool == "pool":
            return roi_pool(feature, level_rois, pooled, scale)
        return roi_align(feature, level_rois, pooled, scale, sampling_ratio, aligned)

    if len(features) == 1:
        return run(features[0], rois, scales[0])

    k_min = int(-math.log2(scales[0]))
    k_max = int(-math.log2(scales[-1]))
    levels = assign_fpn_levels(rois[:, 1:], k_min, k_max, mapper=level_mapper)  # (K,)
    first = features[0]
    result = first.new_zeros((rois.shape[0], first.shape[1]) + pooled)  # (K, C, PH, PW)
    for level, (feature, scale) in enumerate(zip(features, scales)):
        idx = torch.where(levels == level)[0]
        if idx.numel() == 0:
            if feature.requires_grad:
                # A level without RoIs stays in the graph with a zero gradient (the sum of an
                # empty slice is exactly 0, whatever the features hold): DistributedDataParallel,
                # which waits for a gradient of every parameter, then needs no search for unused
                # ones (small images often send no RoI to P5).
                result = result + feature[..., :0, :0].sum().to(result.dtype)
            continue
        result[idx] = run(feature, rois[idx], scale).to(result.dtype)
    return result


def _log2_scales(features: list[Tensor], image_h: Tensor) -> Tensor:
    """``log2`` of each level's scale as :func:`infer_scale` computes it, from traced sizes:
    ``Tensor[L]`` float32 of integers, ``round(log2(feature_h / image_h))``.

    Why not a constant: the scales depend on the image height (below ~45 px after resizing they
    are no longer 1/4 ... 1/32), and a Python float taken from the example image would freeze
    the 480 x 640 values into the graph. float32 ``log2`` as in ``infer_scale``: over every
    ``feature_h / image_h`` of images up to 4096 px tall, ``log2`` stays > 1e-4 away from a
    rounding tie, so the ONNX ``Log(x) / Log(2)`` cannot round another way.
    """
    heights = torch.stack([torch.as_tensor(f.shape[-2]) for f in features]).to(torch.float32)  # (L,)
    return torch.round(torch.log2(heights / image_h.to(torch.float32)))  # (L,)


def _multiscale_roi_align_traced(
    features: list[Tensor],
    rois: Tensor,
    image_sizes: list[tuple[int, int]],
    pooled: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    level_mapper: str,
    strides: tuple[int, ...] = (),
) -> Tensor:
    """:func:`multiscale_roi_align` (``pool="align"``) for ``torch.onnx.export``: the scales, the
    level range and the level of each RoI are computed in the graph from the traced sizes, so
    the exported model pools as PyTorch does for every image shape.

    ONNX ``RoiAlign`` takes its scale as a constant attribute, so each level's RoIs are multiplied
    by the graph-computed scale (a power of two: exact) and pooled with ``spatial_scale=1``.
    Every level stays in the graph (which have RoIs is known only at run time), and the results
    are put back in RoI order by a permutation: indexing by level would freeze the example
    image's RoI counts into the graph.
    """
    if strides:  # fixed scales: constants in the graph, whatever the image
        log2_scales = torch.tensor([-math.log2(s) for s in strides], dtype=torch.float32)  # (L,)
    else:
        image_h = torch.stack([torch.as_tensor(s[0]) for s in image_sizes]).max()  # () traced
        log2_scales = _log2_scales(features, image_h)  # (L,)
    scales = torch.pow(2.0, log2_scales)  # (L,)
    if len(features) == 1:
        return roi_align(features[0], _scaled(rois, scales[0]), pooled, 1.0, sampling_ratio, aligned)
    k_min, k_max = -log2_scales[0], -log2_scales[-1]  # () float32 each
    levels = assign_fpn_levels(rois[:, 1:], k_min, k_max, mapper=level_mapper)  # (K,)
    idx = [torch.where(levels == level)[0] for level in range(len(features))]
    parts = [
        roi_align(f, _scaled(rois[i], scales[level]), pooled, 1.0, sampling_ratio, aligned)
        for level, (f, i) in enumerate(zip(features, idx))
    ]
    return torch.cat(parts)[torch.argsort(torch.cat(idx))]  # (K, C, PH, PW)


def _scaled(rois: Tensor, scale: Tensor) -> Tensor:
    """``(batch_index, x1, y1, x2, y2)`` rows with the coordinates multiplied by ``scale``."""
    return torch.cat((rois[:, :1], rois[:, 1:] * scale.to(rois.dtype)), dim=1)  # (K, 5)
