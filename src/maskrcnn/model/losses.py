"""Losses of the RPN, the box head and the mask head, and the mask targets they train on.

Pure functions with torchvision's semantics (``rpn.compute_loss``, ``fastrcnn_loss``,
``project_masks_on_boxes``, ``maskrcnn_loss``), plus the seed's 2-class softmax objectness
(section 3.3.7). Labels follow ``maskrcnn.model.matcher``: class index 0 is background.

Shape shorthand:
    A  anchors of all images of the batch, concatenated (sum_A)
    S  sampled RoIs of all images, concatenated
    P  positive (foreground) RoIs of all images, concatenated
    K  foreground classes (predictors have K + 1 outputs, index 0 background)
    M  mask resolution (28)
    G  ground-truth instances of all images, concatenated
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maskrcnn.ops.roi_align import roi_align

from .mask_head import select_class_masks


def _cat(x: Tensor | list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    return torch.cat(list(x), dim=0) if isinstance(x, (list, tuple)) else x


def smooth_l1(input: Tensor, target: Tensor, beta: float, reduction: str = "sum") -> Tensor:
    """Smooth L1 loss, as ``torch.nn.functional.smooth_l1_loss``.

    With ``d = input - target`` (seed footnote, generalised by the transition point beta)::

        |d|_smooth = 0.5 * d**2 / beta   if |d| < beta
                     |d| - 0.5 * beta    otherwise

    Quadratic (differentiable) near 0, linear for outliers. ``beta`` below 1e-5 gives plain L1.

    Args:
        input: (...) predicted box deltas.
        target: (...) target box deltas, same shape.
        beta: transition point; torchvision uses 1/9 in the RPN and in the box head.
        reduction: "sum", "mean" or "none".

    Returns:
        A scalar for "sum" / "mean", else a tensor shaped like ``input``.
    """
    d = torch.abs(input - target)
    if beta < 1e-5:
        loss = d
    else:
        loss = torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


def rpn_losses(
    objectness: Tensor,
    box_deltas: Tensor,
    labels: Tensor | list[Tensor],
    regression_targets: Tensor | list[Tensor],
    pos_idx: Tensor,
    neg_idx: Tensor,
    mode: str = "sigmoid",
    beta: float = 1.0 / 9,
) -> tuple[Tensor, Tensor]:
    """Objectness and box-regression losses of the RPN over the sampled anchors.

    Args:
        objectness: logits, (A,) for ``mode="sigmoid"`` (one object logit per anchor) or
            (A, 2) for ``mode="softmax"`` (no-object, object logits; seed 3.3.7).
        box_deltas: (A, 4) predicted encoded deltas (dx, dy, dw, dh) per anchor.
        labels: (A,) float 1 / 0 / -1 per anchor, or one (A_i,) tensor per image.
        regression_targets: (A, 4) encoded deltas of each anchor's matched box, or one
            (A_i, 4) tensor per image.
        pos_idx: (num_pos,) int64 sampled positive anchors, indices into the concatenation.
        neg_idx: (num_neg,) int64 sampled negative anchors, same indexing.
        mode: "sigmoid" (binary cross-entropy, torchvision) or "softmax" (2-class
            cross-entropy).
        beta: smooth L1 transition point.

    Returns:
        loss_objectness: scalar, cross-entropy averaged over the sampled anchors.
        loss_rpn_box: scalar, smooth L1 summed over the positives' 4 deltas and divided by
            the number of sampled anchors (torchvision's normalisation).
        Both are 0 (still attached to the graph) when nothing was sampled.
    """
    labels = _cat(labels)
    regression_targets = _cat(regression_targets)
    sampled = torch.cat([pos_idx, neg_idx])  # (num_pos + num_neg,)
    if sampled.numel() == 0:
        zero = 0.0 * (objectness.sum() + box_deltas.sum())
        return zero, zero.clone()

    if mode == "sigmoid":
        loss_objectness = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], labels[sampled].to(objectness.dtype)
        )
    elif mode == "softmax":
        loss_objectness = F.cross_entropy(objectness.reshape(-1, 2)[sampled], labels[sampled].long())
    else:
        raise ValueError(f"mode must be 'sigmoid' or 'softmax', got {mode!r}")

    loss_box = smooth_l1(box_deltas[pos_idx], regression_targets[pos_idx], beta, "sum") / sampled.numel()
    return loss_objectness, loss_box


def fast_rcnn_losses(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: Tensor | list[Tensor],
    regression_targets: Tensor | list[Tensor],
    beta: float = 1.0 / 9,
) -> tuple[Tensor, Tensor]:
    """Classification and class-specific box-regression losses of the box head.

    Args:
        class_logits: (S, K + 1) logits, column 0 background.
        box_regression: (S, (K + 1) * 4) predicted deltas, 4 per class (class-major).
        labels: (S,) int64 class of each sampled RoI (0 background), or one tensor per image.
        regression_targets: (S, 4) encoded deltas of each RoI's matched box, or one tensor
            per image; only the foreground rows are used.
        beta: smooth L1 transition point (torchvision: 1/9).

    Returns:
        loss_classifier: scalar, multinomial cross-entropy averaged over the S RoIs.
        loss_box_reg: scalar, smooth L1 of the foreground RoIs' own-class 4 deltas, summed
            and divided by S (torchvision's normalisation).
    """
    labels = _cat(labels)
    regression_targets = _cat(regression_targets)
    if labels.numel() == 0:  # no proposals and no ground truth: nothing to learn, not NaN
        zero = 0.0 * (class_logits.sum() + box_regression.sum())
        return zero, zero.clone()
    loss_classifier = F.cross_entropy(class_logits, labels)

    pos = torch.where(labels > 0)[0]
    num_rois = class_logits.shape[0]
    box_regression = box_regression.reshape(num_rois, -1, 4)  # (S, K + 1, 4)
    loss_box = smooth_l1(box_regression[pos, labels[pos]], regression_targets[pos], beta, "sum")
    return loss_classifier, loss_box / labels.numel()


def mask_targets(gt_masks: Tensor, rois: Tensor, matched_gt_idx: Tensor, size: int = 28) -> Tensor:
    """Crop each positive RoI's ground-truth mask and resample it to ``size x size``.

    torchvision's ``project_masks_on_boxes``: RoIAlign (``spatial_scale=1``, adaptive
    sampling, ``aligned=False``) of the full-image binary masks, so targets are soft in
    [0, 1] near the mask border.

    Args:
        gt_masks: (G, H, W) uint8 {0, 1} full-image instance masks, image frame.
        rois: (P, 4) float32 positive RoIs, image frame (pixels of the same H x W).
        matched_gt_idx: (P,) int64 index into ``gt_masks`` of each RoI's instance.
        size: output resolution M.

    Returns:
        (P, M, M) float32 target probabilities in [0, 1].
    """
    rois = rois.to(torch.float32)
    boxes = torch.cat([matched_gt_idx.to(rois)[:, None], rois], dim=1)  # (P, 5) batch_idx x1 y1 x2 y2
    masks = gt_masks[:, None].to(rois)  # (G, 1, H, W)
    return roi_align(masks, boxes, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=False)[:, 0]


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Per-class binary cross-entropy of the mask head (seed 3.5.2).

    Each class has its own mask channel; only the channel of the RoI's ground-truth class is
    trained, so classes do not compete for a pixel.

    Args:
        mask_logits: (P, K + 1, M, M) logits for the positive RoIs.
        labels: (P,) int64 ground-truth class of each RoI (1..K).
        targets: (P, M, M) float target probabilities from ``mask_targets``.

    Returns:
        Scalar, binary cross-entropy with logits averaged over P * M * M. With P == 0 it is
        ``0 * mask_logits.sum()``, so the graph stays connected.
    """
    if targets.numel() == 0 or mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    logits = select_class_masks(mask_logits, labels)  # (P, M, M)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
