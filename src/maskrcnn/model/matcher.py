"""Training targets: matching anchors / proposals to ground truth and balanced sampling.

Pure functions, no parameters. Semantics follow torchvision's ``Matcher``,
``BalancedPositiveNegativeSampler`` and the target assignment of its RPN and RoI heads, with
the seed's labelling rule (section 3.3.6): an anchor is an object if it is the best anchor
for some ground-truth box or has IoU >= 0.7 with one, no object if IoU < 0.3 and not positive,
neutral otherwise (left out of the loss).

Label conventions (torchvision's, *not* the seed's numbering):
    anchors (RPN):  1.0 object, 0.0 no object, -1.0 neutral / ignored
    RoIs (heads):   1..num_classes foreground class, 0 background, -1 ignored

Shape shorthand:
    G  ground-truth boxes of one image
    A  anchors of one image (all FPN levels concatenated)
    P  proposals of one image
    S  sampled RoIs of one image

Boxes are float32 ``(x1, y1, x2, y2)`` pixels in the resized (model input) frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskrcnn.ops.boxes import box_iou

BELOW_LOW_THRESHOLD = -1  # match value: best IoU < low (background)
BETWEEN_THRESHOLDS = -2  # match value: low <= best IoU < high (neutral)


def match_anchors(iou: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """Best ground-truth box for every anchor / proposal (torchvision ``Matcher``).

    Args:
        iou: (G, A) float IoU of every ground-truth box with every anchor.
        high: an anchor whose best IoU is >= ``high`` is matched to that box.
        low: an anchor whose best IoU is < ``low`` gets ``BELOW_LOW_THRESHOLD`` (-1);
            ``low <= IoU < high`` gets ``BETWEEN_THRESHOLDS`` (-2).
        allow_low_quality: also match, for every ground-truth box, the anchors with the
            highest IoU for it (all of them when tied), even below ``high``. Such an anchor
            is matched to its own best box (the argmax over its column), as torchvision does.
            Deviation from torchvision: a box whose highest IoU is 0 (it overlaps no anchor)
            does not match the anchors that have IoU 0 with it; torchvision would make all
            of them positive.

    Returns:
        (A,) int64: index in 0..G-1 of the matched box, or -1 / -2 as above. With G == 0
        every entry is -1 (background).
    """
    num_gt, num_anchors = iou.shape
    if num_gt == 0 or num_anchors == 0:
        return torch.full((num_anchors,), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou.device)

    best_iou, matches = iou.max(dim=0)  # (A,), (A,)
    all_matches = matches.clone()
    matches[best_iou < low] = BELOW_LOW_THRESHOLD
    matches[(best_iou >= low) & (best_iou < high)] = BETWEEN_THRESHOLDS

    if allow_low_quality:
        best_per_gt = iou.max(dim=1).values  # (G,)
        # every (gt, anchor) pair reaching that gt's maximum; ties all count
        is_best = (iou == best_per_gt[:, None]) & (best_per_gt[:, None] > 0)  # (G, A)
        anchor_idx = is_best.any(dim=0).nonzero().squeeze(1)
        matches[anchor_idx] = all_matches[anchor_idx]
    return matches


def label_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    image_size: tuple[int, int],
    fg_iou: float = 0.7,
    bg_iou: float = 0.3,
    exclude_border: bool = False,
    border: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """RPN objectness labels and regression partners of the anchors of one image (seed 3.3.6).

    Args:
        anchors: (A, 4) float32 anchors, image frame.
        gt_boxes: (G, 4) float32 ground-truth boxes, image frame; G may be 0.
        image_size: (h, w) of the resized image (without batch padding).
        fg_iou: IoU at or above which an anchor is an object.
        bg_iou: IoU below which an anchor that is not an object is "no object".
        exclude_border: make anchors not fully inside the image (grown by ``border`` pixels
            on each side) neutral, as in the original Faster R-CNN (seed 3.3.7). They are
            removed before matching, so the "best anchor for a box" is chosen among the
            anchors that remain.
        border: allowed overhang in pixels when ``exclude_border`` is set.

    Returns:
        labels: (A,) float32, 1.0 object, 0.0 no object, -1.0 neutral.
        matched_gt_boxes: (A, 4) float32 box each anchor regresses to; meaningful only where
            the label is 1 (others hold some box, or zeros when G == 0).
    """
    num_anchors = anchors.shape[0]
    if exclude_border:
        h, w = image_size
        inside = (
            (anchors[:, 0] >= -border)
            & (anchors[:, 1] >= -border)
            & (anchors[:, 2] <= w + border)
            & (anchors[:, 3] <= h + border)
        )  # (A,)
    else:
        inside = torch.ones(num_anchors, dtype=torch.bool, device=anchors.device)

    if gt_boxes.shape[0] == 0:
        labels = torch.zeros(num_anchors, dtype=torch.float32, device=anchors.device)
        matched_gt_boxes = torch.zeros((num_anchors, 4), dtype=anchors.dtype, device=anchors.device)
    else:
        iou = box_iou(gt_boxes, anchors)  # (G, A)
        # an outside anchor can neither be best for a box nor clear any threshold
        iou = torch.where(inside[None, :], iou, torch.full_like(iou, -1.0))
        matches = match_anchors(iou, fg_iou, bg_iou, allow_low_quality=True)  # (A,)
        matched_gt_boxes = gt_boxes[matches.clamp(min=0)]  # (A, 4)
        labels = (matches >= 0).to(torch.float32)
        labels[matches == BETWEEN_THRESHOLDS] = -1.0
    labels[~inside] = -1.0
    return labels, matched_gt_boxes


def sample_balanced(
    labels: Tensor,
    batch_size: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw a class-balanced subset of anchors / RoIs for the loss (seed 3.3.6).

    Negatives usually outnumber positives by far; at most ``batch_size * positive_fraction``
    positives are taken and the batch is filled with negatives. Neutral entries are never
    drawn. Without enough of either kind the batch is simply smaller.

    Args:
        labels: (A,) labels; >= 1 positive (1.0 for anchors, a class index for RoIs),
            0 negative, -1 ignored.
        batch_size: total number of entries to draw.
        positive_fraction: largest share of positives in the batch.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        pos_idx: (num_pos,) int64 indices into ``labels``, in random order.
        neg_idx: (num_neg,) int64 indices into ``labels``, in random order.
    """
    positive = torch.where(labels >= 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(positive.numel(), int(batch_size * positive_fraction))
    num_neg = min(negative.numel(), batch_size - num_pos)
    device = generator.device if generator is not None else labels.device
    perm_pos = torch.randperm(positive.numel(), generator=generator, device=device)[:num_pos]
    perm_neg = torch.randperm(negative.numel(), generator=generator, device=device)[:num_neg]
    return positive[perm_pos.to(labels.device)], negative[perm_neg.to(labels.device)]


def sample_rois(
    proposals: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    fg_iou: float = 0.5,
    bg_iou: float = 0.5,
    batch_size: int = 512,
    positive_fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training RoIs of one image for the box and mask heads (torchvision RoIHeads).

    The ground-truth boxes are appended to the proposals first, so every box has at least one
    perfect foreground RoI even early in training. No low-quality matching here: a RoI is
    foreground at IoU >= ``fg_iou`` with its best box, background at IoU in [0, ``bg_iou``),
    ignored in between (never with the default 0.5 / 0.5).

    Args:
        proposals: (P, 4) float32 RPN proposals, image frame.
        gt_boxes: (G, 4) float32 ground-truth boxes, image frame; G may be 0.
        gt_labels: (G,) int64 classes in 1..num_classes.
        fg_iou, bg_iou: IoU thresholds as above.
        batch_size: RoIs drawn per image.
        positive_fraction: largest share of foreground RoIs.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        rois: (S, 4) float32 sampled RoIs, image frame, in increasing index order of
            ``cat([proposals, gt_boxes])`` (as torchvision).
        labels: (S,) int64 class of each RoI; 0 = background.
        matched_gt_idx: (S,) int64 index into ``gt_boxes`` of each RoI's box (0 for
            background RoIs, whose box is not used; 0 everywhere when G == 0).
    """
    # float32: low-precision proposals (autocast) must not round the ground-truth boxes.
    proposals = torch.cat([proposals.float(), gt_boxes.float()], dim=0)  # (P + G, 4)
    num_rois = proposals.shape[0]
    if gt_boxes.shape[0] == 0:
        matched_gt_idx = torch.zeros(num_rois, dtype=torch.int64, device=proposals.device)
        labels = torch.zeros(num_rois, dtype=torch.int64, device=proposals.device)
    else:
        matches = match_anchors(box_iou(gt_boxes, proposals), fg_iou, bg_iou, allow_low_quality=False)
        matched_gt_idx = matches.clamp(min=0)  # (P + G,)
        labels = gt_labels[matched_gt_idx].to(torch.int64)
        labels[matches == BELOW_LOW_THRESHOLD] = 0
        labels[matches == BETWEEN_THRESHOLDS] = -1

    pos_idx, neg_idx = sample_balanced(labels, batch_size, positive_fraction, generator)
    keep = torch.cat([pos_idx, neg_idx]).sort().values  # (S,)
    return proposals[keep], labels[keep], matched_gt_idx[keep]
