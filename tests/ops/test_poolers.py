"""FPN level assignment and multi-level pooling against per-RoI references. Tests that take
``device`` run on every device of ``tests.helpers.DEVICES``."""

from __future__ import annotations

import math

import pytest
import torch

from maskrcnn.ops import assign_fpn_levels, infer_scale, multiscale_roi_align

from . import reference


def level_reference(box: list[float], k_min: int, k_max: int) -> int:
    s = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
    return min(max(math.floor(4 + math.log2(s / 224) + 1e-6), k_min), k_max) - k_min


def test_assign_levels_hand() -> None:
    sides = [10.0, 111.9, 112.0, 224.0, 447.0, 448.0, 2000.0]
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sides])
    assert assign_fpn_levels(boxes, 2, 5).tolist() == [0, 0, 1, 2, 2, 3, 3]
    assert assign_fpn_levels(boxes, 2, 5).dtype == torch.int64
    assert assign_fpn_levels(torch.zeros(0, 4), 2, 5).shape == (0,)


def test_assign_levels_random(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + torch.rand(200, 2, generator=g) * 700 + 1], dim=1)
    expected = [level_reference(b, 2, 5) for b in boxes.tolist()]
    assert assign_fpn_levels(boxes.to(device), 2, 5).tolist() == expected


@pytest.mark.parametrize(
    "feature_hw, image_hw, scale",
    [
        ((200, 272), (800, 1088), 0.25),
        ((25, 34), (800, 1088), 1 / 32),
        ((13, 17), (800, 1088), 1 / 64),  # 800 / 64 = 12.5: log2 rounds to -6
        ((7, 9), (100, 100), 1 / 16),
    ],
)
def test_infer_scale(feature_hw, image_hw, scale) -> None:
    assert infer_scale(feature_hw, image_hw) == scale


@pytest.mark.parametrize("pool", ["align", "pool"])
def test_multiscale_matches_per_roi_reference(pool: str, device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    image_sizes = [(60, 64), (64, 50)]  # padded batch: 64 x 64
    features = [torch.randn(2, 3, 64 // s, 64 // s, generator=g, dtype=torch.float64) for s in (4, 8, 16, 32)]
    # Sides from 4 to 700 pixels spread the RoIs over all four levels (k = 2..5).
    boxes = []
    for n in (9, 7):
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 50
        side = torch.exp(torch.rand(n, 1, generator=g, dtype=torch.float64) * math.log(700 / 4)) * 4
        boxes.append(torch.cat([xy, xy + side * torch.tensor([1.0, 0.7], dtype=torch.float64)], dim=1))
    out = multiscale_roi_align(
        [f.to(device) for f in features], [b.to(device) for b in boxes], image_sizes, (3, 2), 2, pool=pool
    )
    assert out.shape == (16, 3, 3, 2) and out.dtype == torch.float64 and out.device.type == device.type
    out = out.cpu()

    rows = [[float(i)] + b for i, bs in enumerate(boxes) for b in bs.tolist()]
    levels = {level_reference(r[1:], 2, 5) for r in rows}
    assert levels == {0, 1, 2, 3}
    for n, row in enumerate(rows):
        level = level_reference(row[1:], 2, 5)
        feats = features[level].numpy()
        if pool == "align":
            ref = reference.roi_align(feats, [row], (3, 2), 1 / 2 ** (level + 2), 2, False)
        else:
            ref = reference.roi_pool(feats, [row], (3, 2), 1 / 2 ** (level + 2))
        torch.testing.assert_close(out[n], torch.from_numpy(ref[0]), rtol=0, atol=1e-12)


def test_multiscale_single_level_and_empty(device: torch.device) -> None:
    features = [torch.randn(1, 2, 8, 8, dtype=torch.float64)]
    boxes = [torch.tensor([[1.0, 1.0, 20.0, 30.0]], dtype=torch.float64)]
    out = multiscale_roi_align([features[0].to(device)], [boxes[0].to(device)], [(32, 32)], 2, -1, aligned=True)
    ref = reference.roi_align(features[0].numpy(), [[0.0, 1.0, 1.0, 20.0, 30.0]], (2, 2), 0.25, -1, True)
    torch.testing.assert_close(out.cpu(), torch.from_numpy(ref), rtol=0, atol=1e-12)
    empty = multiscale_roi_align(
        [features[0].to(device)] * 2, [torch.zeros(0, 4, dtype=torch.float64, device=device)], [(32, 32)], 2, 2
    )
    assert empty.shape == (0, 2, 2, 2)


def test_multiscale_gradient_reaches_every_level(device: torch.device) -> None:
    features = [torch.randn(1, 1, 256 // s, 256 // s, device=device, requires_grad=True) for s in (4, 8)]
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 200.0, 200.0]], device=device)]  # levels k = 2 and 3
    assert assign_fpn_levels(boxes[0], 2, 3).tolist() == [0, 1]
    multiscale_roi_align(features, boxes, [(256, 256)], 2, 2).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)


def test_multiscale_gradient_is_zero_not_absent_on_a_level_without_rois() -> None:
    features = [torch.randn(1, 1, 256 // s, 256 // s, requires_grad=True) for s in (4, 8)]
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0]])]  # level k = 2 only
    multiscale_roi_align(features, boxes, [(256, 256)], 2, 2).sum().backward()
    assert features[0].grad.abs().sum() > 0
    assert features[1].grad is not None and not features[1].grad.any()


def test_multiscale_rejects_unknown_pool() -> None:
    with pytest.raises(ValueError, match="pool"):
        multiscale_roi_align([torch.zeros(1, 1, 4, 4)], [torch.zeros(1, 4)], [(16, 16)], 2, 2, pool="max")


def test_fixed_strides_pool_a_thin_image_at_one_quarter_on_p2() -> None:
    """Detectron2 pools level l at 1 / stride_l whatever the image; torchvision infers the scale
    from the heights, which a 30:1 image (44 x 1333, padded 64 x 1344: P2 is 16 rows) gets wrong:
    round(log2(16 / 44)) = -1, so 0.5 instead of 0.25 (Detectron2 then found 100 detections where
    we found none)."""
    torch.manual_seed(0)
    sizes = [(44, 1333)]
    features = [torch.randn(1, 2, 64 // s, 1344 // s) for s in (4, 8, 16, 32)]
    boxes = [torch.tensor([[10.0, 5.0, 60.0, 40.0], [100.0, 0.0, 700.0, 44.0]])]  # on P2 and on P3
    assert infer_scale(tuple(features[0].shape[-2:]), sizes[0]) == 0.5  # torchvision's rule, kept for it
    got = multiscale_roi_align(
        features, boxes, sizes, 7, 0, aligned=True, level_mapper="detectron2", strides=(4, 8, 16, 32)
    )
    levels = assign_fpn_levels(boxes[0], 2, 5, mapper="detectron2")
    assert levels.tolist() == [0, 1]
    for i, level in enumerate(levels.tolist()):
        want = reference.roi_align(
            features[level].double().numpy(), [[0.0] + boxes[0][i].tolist()], (7, 7), 1 / 2 ** (level + 2), 0, True
        )
        torch.testing.assert_close(got[i].double(), torch.from_numpy(want[0]), atol=1e-5, rtol=0)
