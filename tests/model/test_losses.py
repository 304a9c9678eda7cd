"""Losses and mask targets, on hand-computed numbers and a float64 bilinear reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.model.losses import fast_rcnn_losses, mask_loss, mask_targets, rpn_losses, smooth_l1

from ..ops import reference

LOG2 = math.log(2.0)


# ---------------------------------------------------------------------------------------
# smooth_l1


def test_smooth_l1_hand_computed():
    x = torch.tensor([0.2, -2.0, 0.0])
    t = torch.zeros(3)
    # beta 0.5: |0.2| < beta -> 0.5 * 0.04 / 0.5 = 0.04; |-2| >= beta -> 2 - 0.25 = 1.75
    assert smooth_l1(x, t, 0.5, "none").tolist() == pytest.approx([0.04, 1.75, 0.0])
    assert smooth_l1(x, t, 0.5).item() == pytest.approx(1.79)
    assert smooth_l1(x, t, 0.5, "mean").item() == pytest.approx(1.79 / 3)
    assert smooth_l1(x, t, 0.0).item() == pytest.approx(2.2)  # plain L1


def test_smooth_l1_matches_torch():
    x, t = torch.randn(50, 4), torch.randn(50, 4)
    for beta in (1.0 / 9, 1.0):
        assert torch.allclose(smooth_l1(x, t, beta), F.smooth_l1_loss(x, t, beta=beta, reduction="sum"))


def test_smooth_l1_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        smooth_l1(torch.zeros(1), torch.zeros(1), 1.0, "max")


# ---------------------------------------------------------------------------------------
# rpn_losses


def rpn_case():
    objectness = torch.tensor([0.0, 0.0, 5.0, -3.0], requires_grad=True)
    deltas = torch.zeros(4, 4)
    deltas[0] = torch.tensor([0.05, 0.0, 0.0, 1.0])
    deltas[2] = 100.0  # an ignored anchor: must not count
    labels = torch.tensor([1.0, 0.0, -1.0, 0.0])
    targets = torch.zeros(4, 4)
    return objectness, deltas, labels, targets, torch.tensor([0]), torch.tensor([1])


def test_rpn_losses_sigmoid():
    loss_obj, loss_box = rpn_losses(*rpn_case())
    # logits 0 with labels 1 and 0: BCE = log 2 each
    assert loss_obj.item() == pytest.approx(LOG2)
    # beta 1/9: 0.05 -> 0.5 * 0.0025 * 9 = 0.01125; 1.0 -> 1 - 1/18; divided by 2 sampled
    assert loss_box.item() == pytest.approx((0.01125 + 1 - 1 / 18) / 2)
    loss_obj.backward()


def test_rpn_losses_per_image_lists():
    objectness, deltas, labels, targets, pos, neg = rpn_case()
    split = rpn_losses(objectness, deltas, [labels[:2], labels[2:]], [targets[:1], targets[1:]], pos, neg)
    whole = rpn_losses(objectness, deltas, labels, targets, pos, neg)
    assert torch.allclose(split[0], whole[0]) and torch.allclose(split[1], whole[1])


def test_rpn_losses_softmax():
    objectness = torch.tensor([[0.0, 0.0], [1.0, 0.0], [9.0, -9.0]])  # (no-object, object) logits
    labels = torch.tensor([1.0, 0.0, -1.0])
    loss_obj, loss_box = rpn_losses(
        objectness, torch.zeros(3, 4), labels, torch.zeros(3, 4), torch.tensor([0]), torch.tensor([1]), "softmax"
    )
    # row 0: log 2; row 1, class 0 with logits (1, 0): -log(e / (e + 1)) = log(1 + e^-1)
    assert loss_obj.item() == pytest.approx((LOG2 + math.log1p(math.exp(-1))) / 2)
    assert loss_box.item() == 0.0


def test_rpn_losses_nothing_sampled():
    objectness = torch.randn(5, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int64)
    loss_obj, loss_box = rpn_losses(objectness, torch.zeros(5, 4), -torch.ones(5), torch.zeros(5, 4), empty, empty)
    assert loss_obj.item() == 0.0 and loss_box.item() == 0.0
    (loss_obj + loss_box).backward()
    assert objectness.grad is not None and not objectness.grad.any()


def test_rpn_losses_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        rpn_losses(*rpn_case(), mode="tanh")


# ---------------------------------------------------------------------------------------
# fast_rcnn_losses


def test_fast_rcnn_losses_hand_computed():
    # K = 2 foreground classes -> 3 logits, 12 regression outputs
    class_logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([2, 0])
    box_regression = torch.full((2, 12), 50.0)  # other classes' outputs are large and unused
    box_regression[0, 8:12] = torch.tensor([0.1, 0.0, 0.0, 0.0])  # RoI 0, class 2
    targets = torch.zeros(2, 4)
    loss_cls, loss_box = fast_rcnn_losses(class_logits, box_regression, labels, targets)
    ce0 = math.log(3.0)
    ce1 = math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 1.0
    assert loss_cls.item() == pytest.approx((ce0 + ce1) / 2)
    # |0.1| < 1/9: 0.5 * 0.01 * 9 = 0.045, divided by the 2 RoIs
    assert loss_box.item() == pytest.approx(0.045 / 2)


def test_fast_rcnn_losses_only_background():
    class_logits = torch.zeros(3, 4, requires_grad=True)
    box_regression = torch.randn(3, 16, requires_grad=True)
    labels = [torch.zeros(3, dtype=torch.int64)]  # one image, all background
    loss_cls, loss_box = fast_rcnn_losses(class_logits, box_regression, labels, [torch.zeros(3, 4)])
    assert loss_cls.item() == pytest.approx(math.log(4.0)) and loss_box.item() == 0.0
    (loss_cls + loss_box).backward()


# ---------------------------------------------------------------------------------------
# mask_loss


def test_mask_loss_uses_only_the_gt_channel():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    logits[0, 1] = 0.0  # RoI 0 is class 1
    logits[1, 2] = 2.0  # RoI 1 is class 2
    labels = torch.tensor([1, 2])
    targets = torch.ones(2, 4, 4)
    targets[0] = torch.rand(4, 4)  # logit 0: BCE is log 2 whatever the target
    loss = mask_loss(logits, labels, targets)
    expected = (LOG2 + math.log1p(math.exp(-2.0))) / 2  # mean over 2 * 4 * 4 pixels
    assert loss.item() == pytest.approx(expected)

    changed = logits.clone()
    changed[0, 0] += 10.0
    changed[0, 2] -= 5.0
    changed[1, :2] = torch.randn(2, 4, 4)
    assert mask_loss(changed, labels, targets).item() == pytest.approx(expected)


def test_mask_loss_empty_keeps_graph():
    logits = torch.randn(0, 3, 28, 28, requires_grad=True)
    loss = mask_loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


# ---------------------------------------------------------------------------------------
# mask_targets


def roi_align_ref(image, roi, size):
    """float64 RoIAlign of one (H, W) map: aligned=False, adaptive sampling (torchvision)."""
    out = reference.roi_align(image.double().numpy()[None, None], [[0, *map(float, roi)]], (size, size), 1.0, -1, False)
    return torch.from_numpy(out[0, 0])


def rectangle_mask(height, width, y0, y1, x0, x1):
    """uint8 mask, ones on rows y0..y1-1 and columns x0..x1-1."""
    mask = torch.zeros(height, width, dtype=torch.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_mask_targets_roi_on_the_rectangle():
    masks = rectangle_mask(20, 20, 4, 12, 4, 12)[None]  # pixels 4..11
    idx = torch.tensor([0])
    # aligned=False samples pixel i at coordinate i: on [4, 11] the mask interpolates to 1
    out = mask_targets(masks, torch.tensor([[4.0, 4.0, 11.0, 11.0]]), idx)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    assert torch.allclose(out, torch.ones_like(out))
    # the box (4, 4, 12, 12): samples 4 + (p + 0.5) * 8/28 <= 11 for p <= 24, fade after
    out = mask_targets(masks, torch.tensor([[4.0, 4.0, 12.0, 12.0]]), idx)[0]
    assert torch.allclose(out[:25, :25], torch.ones(25, 25))
    assert (out[25:, :] < 1).all() and (out[:, 25:] < 1).all()


def test_mask_targets_half_outside():
    # RoI (9.5, 9.5, 37.5, 37.5): 28 px wide, one sample per bin, at integer pixels 10..37
    roi = torch.tensor([[9.5, 9.5, 37.5, 37.5]])
    idx = torch.tensor([0])
    masks = rectangle_mask(48, 48, 0, 48, 10, 24)[None]  # columns 10..23: the RoI's left half
    out = mask_targets(masks, roi, idx)[0]
    assert torch.allclose(out[:, :14], torch.ones(28, 14)) and not out[:, 14:].any()

    # RoI half outside the image (24 px wide, all ones): x <= W still reads the last column,
    # x > W reads 0 (torchvision's border rule); samples 10..24 are in, 25..37 out
    masks = torch.ones(1, 48, 24, dtype=torch.uint8)
    out = mask_targets(masks, roi, idx)[0]
    assert torch.allclose(out[:, :15], torch.ones(28, 15)) and not out[:, 15:].any()


def test_mask_targets_picks_matched_mask_and_matches_reference():
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(2, 24, 30, generator=g) > 0.5).to(torch.uint8)
    rois = torch.tensor([[3.3, 5.7, 17.2, 12.9], [-1.5, 2.0, 29.5, 23.0], [10.0, 10.0, 10.4, 10.2]])
    idx = torch.tensor([1, 0, 1])
    out = mask_targets(masks, rois, idx, size=7)  # 7 bins over 13.9 px: 2 samples per bin side
    for k in range(3):
        ref = roi_align_ref(masks[idx[k]], rois[k], 7)
        assert torch.allclose(out[k].double(), ref, atol=1e-5), k
    out28 = mask_targets(masks, rois[:1], idx[:1])
    assert torch.allclose(out28[0].double(), roi_align_ref(masks[1], rois[0], 28), atol=1e-5)


def test_mask_targets_empty():
    no_masks = torch.zeros(0, 10, 10, dtype=torch.uint8)
    out = mask_targets(no_masks, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 28, 28)
