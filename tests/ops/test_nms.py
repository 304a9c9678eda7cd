"""NMS against a one-box-at-a-time greedy reference, including ties and exact-threshold IoUs."""
from __future__ import annotations

import importlib

import pytest
import torch

from maskrcnn.ops import batched_nms, nms

from . import reference

nms_module = importlib.import_module("maskrcnn.ops.nms")  # the package re-exports a function named nms


def clustered_boxes(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Boxes jittered around a few centres, so that suppression chains are long."""
    centres = torch.rand(6, 2, generator=generator, dtype=torch.float64) * 60
    which = torch.randint(0, 6, (n,), generator=generator)
    xy = centres[which] + torch.randn(n, 2, generator=generator, dtype=torch.float64) * 4
    wh = 10 + torch.rand(n, 2, generator=generator, dtype=torch.float64) * 15
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_float64(seed: int, thresh: float) -> None:
    g = torch.Generator().manual_seed(seed)
    boxes = clustered_boxes(300, g)
    scores = torch.randint(0, 40, (300,), generator=g).double()  # many exact ties
    keep = nms(boxes, scores, thresh)
    assert keep.dtype == torch.int64
    assert keep.tolist() == reference.greedy_nms(boxes.tolist(), scores.tolist(), thresh)


@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_float32(thresh: float) -> None:
    g = torch.Generator().manual_seed(10)
    boxes = clustered_boxes(250, g, torch.float32)
    scores = torch.rand(250, generator=g)
    keep = nms(boxes, scores, thresh)
    assert keep.tolist() == reference.greedy_nms(boxes.tolist(), scores.tolist(), thresh, float32=True)


def test_nms_many_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks exercise the suppression of later blocks by earlier ones."""
    monkeypatch.setattr(nms_module, "_BLOCK", 16)
    g = torch.Generator().manual_seed(3)
    boxes = clustered_boxes(400, g)
    scores = torch.rand(400, generator=g, dtype=torch.float64)
    assert nms(boxes, scores, 0.5).tolist() == reference.greedy_nms(boxes.tolist(), scores.tolist(), 0.5)


def test_nms_iou_equal_to_threshold_is_kept() -> None:
    # IoU exactly 0.5 (1 / 2): not suppressed, since suppression needs IoU > threshold.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 1.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]


def test_nms_threshold_compared_as_double() -> None:
    # IoU = 1/3 evaluates in float32 to 0.33333334, which is > 1/3 as a double: the C++ kernel
    # suppresses. A float32 comparison with float32(1/3) (the same value) would keep the box.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 3.0, 1.0]])
    iou = reference.iou_float32(boxes[0].tolist(), boxes[1].tolist())
    assert iou > 1 / 3 and torch.tensor(iou, dtype=torch.float32) == torch.tensor(1 / 3, dtype=torch.float32)
    assert nms(boxes, torch.tensor([0.9, 0.8]), 1 / 3).tolist() == [0]
    assert nms(boxes.double(), torch.tensor([0.9, 0.8]), 1 / 3).tolist() == [0, 1]  # exactly 1/3 in float64


def test_nms_chain_and_ties() -> None:
    # a suppresses b, so c (overlapping only b) survives; equal scores keep input order.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [4.0, 0.0, 14.0, 10.0]])
    assert nms(boxes, torch.tensor([0.5, 0.5, 0.5]), 0.5).tolist() == [0, 2]
    assert nms(boxes, torch.tensor([0.4, 0.5, 0.4]), 0.5).tolist() == [1]


def test_nms_empty_and_single() -> None:
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).dtype == torch.int64
    assert nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.3]), 0.5).tolist() == [0]


def test_nms_degenerate_boxes() -> None:
    # Zero-area boxes: IoU 0/0 = nan is not > threshold, so nothing is suppressed.
    boxes = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", range(3))
def test_batched_nms_matches_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    boxes = clustered_boxes(300, g)
    scores = torch.randint(0, 30, (300,), generator=g).double()
    groups = torch.randint(0, 5, (300,), generator=g) * 3  # sparse group ids
    keep = batched_nms(boxes, scores, groups, 0.5)
    assert keep.tolist() == reference.batched_greedy_nms(boxes.tolist(), scores.tolist(), groups.tolist(), 0.5)


def test_batched_nms_groups_do_not_interact() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([2, 1, 0]), 0.5).tolist() == [0, 1, 2]


def test_batched_nms_torchvision_compat() -> None:
    g = torch.Generator().manual_seed(7)
    boxes = clustered_boxes(200, g, torch.float32)
    scores = torch.rand(200, generator=g)
    groups = torch.randint(0, 4, (200,), generator=g)
    keep = batched_nms(boxes, scores, groups, 0.5, torchvision_compat=True)
    offset = groups.float() * (boxes.max() + 1)
    assert keep.tolist() == reference.greedy_nms((boxes + offset[:, None]).tolist(), scores.tolist(), 0.5, float32=True)


def test_batched_nms_empty() -> None:
    keep = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)
    assert keep.shape == (0,) and keep.dtype == torch.int64
