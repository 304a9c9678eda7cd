"""Mask pasting against a per-pixel reference of the torchvision recipe. Tests that take
``device`` run on every device of ``tests.helpers.DEVICES``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskrcnn.ops import paste_crops, paste_masks

from . import reference


def test_reference_resize_matches_known_values() -> None:
    # 2 -> 4 upsampling with half-pixel centres: sources -0.25 (clamped 0), 0.25, 0.75, 1.25 (clamped).
    out = reference.resize_bilinear(np.array([[0.0, 1.0]]), 1, 4)
    assert np.allclose(out, [[0.0, 0.25, 0.75, 1.0]])


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_matches_reference(padding: int, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 7, 7, generator=g, dtype=torch.float64)
    boxes = torch.tensor(
        [
            [3.2, 4.7, 20.1, 15.3],  # inside
            [-6.3, -2.5, 8.0, 9.9],  # over the top-left corner (negative coordinates truncate toward 0)
            [25.0, 18.0, 44.0, 33.0],  # over the bottom-right corner
            [10.0, 10.0, 10.4, 10.2],  # tiny
            [50.0, 50.0, 60.0, 60.0],  # outside
            [-0.4, 0.0, 31.9, 23.9],  # whole image
        ],
        dtype=torch.float64,
    )
    out = paste_masks(masks.to(device), boxes.to(device), (24, 32), padding=padding)
    assert out.shape == (6, 24, 32) and out.dtype == torch.float64 and out.device.type == device.type
    out = out.cpu()
    for i in range(6):
        expected = reference.paste_mask(masks[i].numpy(), boxes[i].tolist(), (24, 32), padding)
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=0, atol=1e-12)
    assert out[4].abs().sum() == 0


def test_float32_and_threshold(device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 28, 28, generator=g)
    boxes = torch.tensor([[5.0, 6.0, 40.0, 30.0], [0.0, 0.0, 63.0, 47.0], [30.0, 20.0, 70.0, 60.0]])
    probs = paste_masks(masks.to(device), boxes.to(device), (48, 64)).cpu()
    assert probs.dtype == torch.float32
    for i in range(3):
        expected = reference.paste_mask(masks[i].double().numpy(), boxes[i].tolist(), (48, 64))
        np.testing.assert_allclose(probs[i].numpy(), expected, rtol=0, atol=1e-5)  # float32 source indices
    binary = paste_masks(masks.to(device), boxes.to(device), (48, 64), threshold=0.5).cpu()
    assert binary.dtype == torch.bool
    assert torch.equal(binary, probs > 0.5)


def test_empty(device: torch.device) -> None:
    masks, boxes = torch.zeros(0, 28, 28, device=device), torch.zeros(0, 4, device=device)
    out = paste_masks(masks, boxes, (10, 12))
    assert out.shape == (0, 10, 12) and out.device.type == device.type
    assert paste_masks(masks, boxes, (10, 12), threshold=0.5).dtype == torch.bool


def test_crops_hold_every_pasted_pixel() -> None:
    """paste_crops against the per-pixel reference: the reference frame is zero outside each
    crop and equal to it inside, so keeping crops loses nothing of the full paste."""
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(4, 7, 7, generator=g, dtype=torch.float64)
    boxes = torch.tensor(
        [[3.2, 4.7, 20.1, 15.3], [-6.3, -2.5, 8.0, 9.9], [25.0, 18.0, 44.0, 33.0], [50.0, 50.0, 60.0, 60.0]],
        dtype=torch.float64,
    )
    crops = list(paste_crops(masks, boxes, (24, 32)))
    assert len(crops) == 4 and crops[3][2].shape == (0, 0)  # the box outside the image
    for i, (y0, x0, crop) in enumerate(crops):
        expected = reference.paste_mask(masks[i].numpy(), boxes[i].tolist(), (24, 32), 1)
        h, w = crop.shape
        np.testing.assert_allclose(crop.numpy(), expected[y0 : y0 + h, x0 : x0 + w], rtol=0, atol=1e-12)
        expected[y0 : y0 + h, x0 : x0 + w] = 0
        assert not expected.any()
    binary = list(paste_crops(masks, boxes, (24, 32), threshold=0.5))
    assert all(torch.equal(b, c > 0.5) for (_, _, b), (_, _, c) in zip(binary, crops))


def test_detectron2_mode_by_hand() -> None:
    """Grid-sample pasting: an all-ones mask over box (10, 10, 20, 20) covers exactly the pixels
    whose centres lie 1.4 mask cells or more inside the box: columns and rows 10..19. A pixel is
    foreground at probability >= the threshold (torchvision's rule is >)."""
    ones = torch.ones(1, 28, 28)
    box = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    soft = paste_masks(ones, box, (30, 30), mode="detectron2")[0]
    expected = torch.zeros(30, 30)
    expected[10:20, 10:20] = 1
    torch.testing.assert_close(soft, expected)
    half_soft = paste_masks(ones * 0.5, box, (30, 30), mode="detectron2")[0]
    assert (half_soft == 0.5).sum() >= 90  # most samples are exactly 0.5 ...
    half = paste_masks(ones * 0.5, box, (30, 30), threshold=0.5, mode="detectron2")[0]
    assert torch.equal(half, half_soft >= 0.5)  # ... and those are foreground
    assert paste_masks(ones * 0.5, box, (30, 30), threshold=0.5)[0].sum() == 0  # torchvision: 0.5 > 0.5 is false
    # Crops start one pixel outside the box's integer hull and stop at the image border.
    ((y0, x0, crop),) = paste_crops(ones, torch.tensor([[2.5, 3.5, 29.5, 12.0]]), (30, 30), mode="detectron2")
    assert (y0, x0, tuple(crop.shape)) == (2, 1, (11, 29))
    with pytest.raises(ValueError, match="paste mode"):
        paste_masks(ones, box, (30, 30), mode="opencv")
