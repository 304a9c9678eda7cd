"""Box geometry against loop references and hand-computed values. Tests that take ``device``
run on every device of ``tests.helpers.DEVICES``."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.ops import box_area, box_iou, clip_boxes, remove_small_boxes

from . import reference


def random_boxes(n: int, generator: torch.Generator, size: float = 50.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size / 2
    return torch.cat([xy, xy + wh], dim=1)


def test_box_area_hand() -> None:
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0], [-1.0, -2.0, 1.5, 0.0]])
    assert torch.equal(box_area(boxes), torch.tensor([6.0, 0.0, 5.0]))


def test_box_area_upcasts_half(device: torch.device) -> None:
    boxes = torch.tensor([[0.0, 0.0, 300.0, 300.0]], dtype=torch.float16, device=device)
    area = box_area(boxes)
    assert area.dtype == torch.float32 and area.item() == 90000.0  # overflows float16


def test_box_iou_hand() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 1.0, 2.0]])
    expected = torch.tensor([[1 / 7, 1.0, 0.0, 0.5]])
    torch.testing.assert_close(box_iou(a, b), expected)


def test_box_iou_matches_reference(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = random_boxes(17, g), random_boxes(23, g)
    got = box_iou(a.to(device), b.to(device)).cpu()
    assert got.shape == (17, 23)
    for i in range(17):
        for j in range(23):
            assert got[i, j].item() == pytest.approx(reference.iou(a[i].tolist(), b[j].tolist()), abs=1e-12)


@pytest.mark.parametrize("n, m", [(0, 3), (3, 0), (0, 0)])
def test_box_iou_empty(n: int, m: int) -> None:
    assert box_iou(torch.zeros(n, 4), torch.zeros(m, 4)).shape == (n, m)


def test_clip_boxes(device: torch.device) -> None:
    boxes = torch.tensor([[-5.0, -1.0, 20.0, 8.0], [3.0, 12.0, 4.0, 13.0]], device=device)
    expected = torch.tensor([[0.0, 0.0, 15.0, 8.0], [3.0, 10.0, 4.0, 10.0]])
    assert torch.equal(clip_boxes(boxes, (10, 15)).cpu(), expected)


def test_clip_boxes_batched_shape() -> None:
    boxes = torch.tensor([[[-1.0, -1.0, 30.0, 30.0]] * 3] * 2)  # (2, 3, 4)
    clipped = clip_boxes(boxes, (20, 10))
    assert clipped.shape == (2, 3, 4)
    assert torch.equal(clipped[1, 2], torch.tensor([0.0, 0.0, 10.0, 20.0]))


def test_remove_small_boxes(device: torch.device) -> None:
    boxes = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 4.0], [0.0, 0.0, 4.0, 0.99], [2.0, 2.0, 5.0, 6.0], [3.0, 3.0, 2.0, 5.0]],
        device=device,
    )
    keep = remove_small_boxes(boxes, 1.0)
    assert keep.dtype == torch.int64
    assert keep.tolist() == [0, 3]
    assert remove_small_boxes(torch.zeros(0, 4), 1.0).shape == (0,)
