"""Anchor / proposal matching and balanced sampling, on hand-computed cases."""

import pytest
import torch

from maskrcnn.model.matcher import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    label_anchors,
    match_anchors,
    sample_balanced,
    sample_rois,
)


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# match_anchors


def test_constants():
    assert BELOW_LOW_THRESHOLD == -1 and BETWEEN_THRESHOLDS == -2


def test_match_thresholds_without_low_quality():
    # columns: anchors; rows: gt boxes
    iou = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.4, 0.4]])
    # a0: 0.9 >= 0.7 -> gt 0; a1: best 0.4 in [0.3, 0.7) -> -2; a2: best 0.5 -> -2
    assert match_anchors(iou, 0.7, 0.3, allow_low_quality=False).tolist() == [0, -2, -2]


def test_match_low_quality_ties_use_the_anchor_argmax():
    iou = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.4, 0.4]])
    # gt 1's best IoU 0.4 is reached by a1 and a2 (tie): both are restored. a1's own best box
    # is gt 1; a2's own best box is gt 0 (0.5 > 0.4), so a2 goes to gt 0, as in torchvision.
    assert match_anchors(iou, 0.7, 0.3, allow_low_quality=True).tolist() == [0, 1, 0]


def test_match_low_quality_restores_below_low():
    iou = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.25, 0.25]])
    assert match_anchors(iou, 0.7, 0.3, allow_low_quality=False).tolist() == [0, -1, -1]
    assert match_anchors(iou, 0.7, 0.3, allow_low_quality=True).tolist() == [0, 1, 1]


def test_match_threshold_boundaries():
    iou = torch.tensor([[0.7, 0.3, 0.2999]])
    # >= high matches, == low is between, < low is below
    assert match_anchors(iou, 0.7, 0.3, allow_low_quality=False).tolist() == [0, -2, -1]


def test_match_zero_overlap_gt_does_not_make_everything_positive():
    iou = torch.tensor([[0.8, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert match_anchors(iou, 0.7, 0.3, allow_low_quality=True).tolist() == [0, -1, -1]


def test_match_empty():
    out = match_anchors(torch.zeros((0, 5)), 0.7, 0.3, allow_low_quality=True)
    assert out.dtype == torch.int64 and out.tolist() == [-1] * 5
    assert match_anchors(torch.zeros((3, 0)), 0.7, 0.3, True).shape == (0,)


# ---------------------------------------------------------------------------------------
# label_anchors


def test_label_anchors_thresholds():
    gt = boxes([0, 0, 10, 10])
    anchors = boxes([0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30], [0, 0, 10, 2])
    # IoU 1.0 -> object; 0.5 -> neutral; 0 -> no object; 0.2 -> no object
    labels, matched = label_anchors(anchors, gt, (40, 40))
    assert labels.dtype == torch.float32
    assert labels.tolist() == [1.0, -1.0, 0.0, 0.0]
    assert torch.equal(matched[0], gt[0])


def test_label_anchors_best_for_gt_is_positive():
    gt = boxes([0, 0, 10, 10])
    anchors = boxes([0, 0, 10, 6], [0, 0, 10, 4], [50, 50, 60, 60])
    # IoU 0.6 < 0.7 but it is the best anchor for the box
    labels, matched = label_anchors(anchors, gt, (80, 80))
    assert labels.tolist() == [1.0, -1.0, 0.0]
    assert torch.equal(matched[0], gt[0])


def test_label_anchors_exclude_border():
    gt = boxes([0, 0, 10, 10])
    anchors = boxes(
        [-2, 0, 8, 10],  # IoU 80/120 = 0.667, best for gt, crosses the left border by 2
        [0, 0, 10, 6],  # IoU 0.6, inside
        [10, 10, 20, 20],  # IoU 0, inside
        [15, 15, 25, 25],  # IoU 0, crosses the bottom-right border by 5
    )
    labels, _ = label_anchors(anchors, gt, (20, 20))
    assert labels.tolist() == [1.0, -1.0, 0.0, 0.0]
    labels, _ = label_anchors(anchors, gt, (20, 20), exclude_border=True)
    # the border anchor is ignored and the best remaining anchor takes its place
    assert labels.tolist() == [-1.0, 1.0, 0.0, -1.0]
    labels, _ = label_anchors(anchors, gt, (20, 20), exclude_border=True, border=2)
    assert labels.tolist() == [1.0, -1.0, 0.0, -1.0]


def test_label_anchors_no_gt():
    anchors = boxes([0, 0, 10, 10], [-5, 0, 5, 10])
    labels, matched = label_anchors(anchors, torch.zeros((0, 4)), (20, 20))
    assert labels.tolist() == [0.0, 0.0]
    assert matched.shape == (2, 4) and not matched.any()
    labels, _ = label_anchors(anchors, torch.zeros((0, 4)), (20, 20), exclude_border=True)
    assert labels.tolist() == [0.0, -1.0]


# ---------------------------------------------------------------------------------------
# sample_balanced


def make_labels(num_pos, num_neg, num_ignore, seed=0):
    labels = torch.cat([torch.ones(num_pos), torch.zeros(num_neg), -torch.ones(num_ignore)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize(
    "num_pos, num_neg, batch, fraction, expected",
    [
        (10, 100, 16, 0.25, (4, 12)),  # both capped
        (2, 100, 16, 0.25, (2, 14)),  # few positives: negatives fill the batch
        (10, 3, 16, 0.25, (4, 3)),  # few negatives: batch is smaller
        (10, 100, 256, 0.5, (10, 100)),  # everything
        (0, 0, 16, 0.5, (0, 0)),
    ],
)
def test_sample_balanced_counts(num_pos, num_neg, batch, fraction, expected):
    labels = make_labels(num_pos, num_neg, 20)
    pos, neg = sample_balanced(labels, batch, fraction)
    assert (pos.numel(), neg.numel()) == expected
    assert pos.dtype == torch.int64 and neg.dtype == torch.int64
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()  # never an ignored one
    assert pos.unique().numel() == pos.numel() and neg.unique().numel() == neg.numel()


def test_sample_balanced_class_labels_count_as_positive():
    labels = torch.tensor([3, 0, -1, 7, 0, 1])
    pos, neg = sample_balanced(labels, 10, 0.5)
    assert sorted(pos.tolist()) == [0, 3, 5] and sorted(neg.tolist()) == [1, 4]


def test_sample_balanced_reproducible():
    labels = make_labels(50, 500, 50)
    a = sample_balanced(labels, 64, 0.25, generator=torch.Generator().manual_seed(7))
    b = sample_balanced(labels, 64, 0.25, generator=torch.Generator().manual_seed(7))
    c = sample_balanced(labels, 64, 0.25, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


# ---------------------------------------------------------------------------------------
# sample_rois


GT = boxes([0, 0, 10, 10], [20, 20, 40, 40])
GT_LABELS = torch.tensor([3, 5])


def test_sample_rois_labels_and_gt_appended():
    proposals = boxes(
        [0, 0, 10, 5.1],  # IoU 0.51 with gt 0 -> class 3
        [0, 0, 10, 4.9],  # IoU 0.49 with gt 0 -> background
        [20, 20, 40, 30.2],  # IoU 0.51 with gt 1 -> class 5
    )
    rois, labels, matched = sample_rois(proposals, GT, GT_LABELS)
    # all 5 (3 proposals + 2 gt boxes) are sampled, in index order
    assert torch.equal(rois, torch.cat([proposals, GT]))
    assert labels.tolist() == [3, 0, 5, 3, 5]
    assert labels.dtype == torch.int64 and matched.dtype == torch.int64
    assert matched.tolist() == [0, 0, 1, 0, 1]


def test_sample_rois_ignores_between_thresholds():
    proposals = boxes([0, 0, 10, 4], [0, 0, 10, 2], [0, 0, 10, 6])  # IoU 0.4, 0.2, 0.6
    rois, labels, _ = sample_rois(proposals, GT, GT_LABELS, fg_iou=0.5, bg_iou=0.3)
    # the 0.4 proposal is neither foreground nor background
    assert torch.equal(rois, torch.cat([proposals[1:], GT]))
    assert labels.tolist() == [0, 3, 3, 5]


def test_sample_rois_caps():
    proposals = torch.cat([boxes([50, 50, 60, 60]).repeat(20, 1), GT.repeat(3, 1)])
    rois, labels, _ = sample_rois(proposals, GT, GT_LABELS, batch_size=8, positive_fraction=0.25)
    assert rois.shape == (8, 4)
    assert (labels > 0).sum() == 2 and (labels == 0).sum() == 6


def test_sample_rois_no_gt():
    proposals = boxes([0, 0, 10, 10], [5, 5, 20, 20], [1, 2, 3, 4])
    empty = torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64)
    rois, labels, matched = sample_rois(proposals, *empty)
    assert torch.equal(rois, proposals)
    assert labels.tolist() == [0, 0, 0] and matched.tolist() == [0, 0, 0]
    rois, labels, matched = sample_rois(proposals, *empty, batch_size=2)
    assert rois.shape == (2, 4) and labels.tolist() == [0, 0]


def test_sample_rois_no_proposals():
    rois, labels, matched = sample_rois(torch.zeros((0, 4)), GT, GT_LABELS)
    assert torch.equal(rois, GT) and labels.tolist() == [3, 5] and matched.tolist() == [0, 1]
