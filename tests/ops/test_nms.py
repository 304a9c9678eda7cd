"""NMS against a one-box-at-a-time greedy reference, including ties and exact-threshold IoUs.
Tests that take ``device`` run on every device of ``tests.helpers.DEVICES``."""

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
def test_nms_matches_greedy_float64(seed: int, thresh: float, device: torch.device) -> None:
    g = torch.Generator().manual_seed(seed)
    boxes = clustered_boxes(300, g)
    scores = torch.randint(0, 40, (300,), generator=g).double()  # many exact ties
    keep = nms(boxes.to(device), scores.to(device), thresh)
    assert keep.dtype == torch.int64 and keep.device.type == device.type
    assert keep.tolist() == reference.greedy_nms(boxes.tolist(), scores.tolist(), thresh)


@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_float32(thresh: float, device: torch.device) -> None:
    g = torch.Generator().manual_seed(10)
    boxes = clustered_boxes(250, g, torch.float32)
    scores = torch.rand(250, generator=g)
    keep = nms(boxes.to(device), scores.to(device), thresh)
    assert keep.tolist() == reference.greedy_nms(boxes.tolist(), scores.tolist(), thresh, float32=True)


def test_nms_many_blocks(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    """Small blocks exercise the suppression of later blocks by earlier ones."""
    monkeypatch.setattr(nms_module, "_BLOCK", 16)
    monkeypatch.setattr(nms_module, "_BLOCK_GPU", 16)
    g = torch.Generator().manual_seed(3)
    boxes = clustered_boxes(400, g)
    scores = torch.rand(400, generator=g, dtype=torch.float64)
    keep = nms(boxes.to(device), scores.to(device), 0.5)
    assert keep.tolist() == reference.greedy_nms(boxes.tolist(), scores.tolist(), 0.5)


def test_nms_iou_equal_to_threshold_is_kept(device: torch.device) -> None:
    # IoU exactly 0.5 (1 / 2): not suppressed, since suppression needs IoU > threshold.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 1.0]], device=device)
    scores = torch.tensor([0.9, 0.8, 0.7], device=device)
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]


def test_nms_threshold_compared_as_double(device: torch.device) -> None:
    # IoU = 1/3 evaluates in float32 to 0.33333334, which is > 1/3 as a double: the C++ kernel
    # suppresses. A float32 comparison with float32(1/3) (the same value) would keep the box.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 3.0, 1.0]])
    iou = reference.iou_float32(boxes[0].tolist(), boxes[1].tolist())
    assert iou > 1 / 3 and torch.tensor(iou, dtype=torch.float32) == torch.tensor(1 / 3, dtype=torch.float32)
    boxes, scores = boxes.to(device), torch.tensor([0.9, 0.8], device=device)
    assert nms(boxes, scores, 1 / 3).tolist() == [0]
    assert nms(boxes.double(), scores, 1 / 3).tolist() == [0, 1]  # exactly 1/3 in float64


def test_nms_chain_and_ties(device: torch.device) -> None:
    # a suppresses b, so c (overlapping only b) survives; equal scores keep input order.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [4.0, 0.0, 14.0, 10.0]], device=device)
    assert nms(boxes, torch.tensor([0.5, 0.5, 0.5], device=device), 0.5).tolist() == [0, 2]
    assert nms(boxes, torch.tensor([0.4, 0.5, 0.4], device=device), 0.5).tolist() == [1]


def test_nms_empty_and_single(device: torch.device) -> None:
    empty = nms(torch.zeros(0, 4, device=device), torch.zeros(0, device=device), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64 and empty.device.type == device.type
    assert nms(
        torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device), torch.tensor([0.3], device=device), 0.5
    ).tolist() == [0]


def test_nms_degenerate_boxes(device: torch.device) -> None:
    # Zero-area boxes: IoU 0/0 = nan is not > threshold, so nothing is suppressed.
    boxes = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]], device=device)
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7], device=device), 0.5).tolist() == [0, 1, 2]


# Both strategies of batched_nms, whatever the device (batched_nms picks one by device).
BATCHED = {"public": batched_nms, "by_group": nms_module._batched_by_group, "one_pass": nms_module._batched_in_one_pass}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("how", BATCHED)
def test_batched_nms_matches_reference(seed: int, how: str, device: torch.device) -> None:
    g = torch.Generator().manual_seed(seed)
    boxes = clustered_boxes(300, g)
    scores = torch.randint(0, 30, (300,), generator=g).double()
    groups = torch.randint(0, 5, (300,), generator=g) * 3  # sparse group ids
    keep = BATCHED[how](boxes.to(device), scores.to(device), groups.to(device), 0.5)
    assert keep.tolist() == reference.batched_greedy_nms(boxes.tolist(), scores.tolist(), groups.tolist(), 0.5)


@pytest.mark.parametrize("how", BATCHED)
def test_batched_nms_many_groups_and_blocks(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """90 groups (the box head's classes) over several blocks, float32 scores with ties."""
    monkeypatch.setattr(nms_module, "_BLOCK", 64)
    g = torch.Generator().manual_seed(11)
    boxes = clustered_boxes(500, g, torch.float32)
    scores = (torch.rand(500, generator=g) * 50).round() / 50
    groups = torch.randint(1, 91, (500,), generator=g)
    keep = BATCHED[how](boxes, scores, groups, 0.5)
    expected = reference.batched_greedy_nms(boxes.tolist(), scores.tolist(), groups.tolist(), 0.5, float32=True)
    assert keep.tolist() == expected


def test_batched_nms_groups_do_not_interact(device: torch.device) -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3, device=device)
    scores = torch.tensor([0.9, 0.8, 0.7], device=device)
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0], device=device), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([2, 1, 0], device=device), 0.5).tolist() == [0, 1, 2]


def test_batched_nms_torchvision_compat(device: torch.device) -> None:
    g = torch.Generator().manual_seed(7)
    boxes = clustered_boxes(200, g, torch.float32)
    scores = torch.rand(200, generator=g)
    groups = torch.randint(0, 4, (200,), generator=g)
    keep = batched_nms(boxes.to(device), scores.to(device), groups.to(device), 0.5, torchvision_compat=True)
    offset = groups.float() * (boxes.max() + 1)
    assert keep.tolist() == reference.greedy_nms((boxes + offset[:, None]).tolist(), scores.tolist(), 0.5, float32=True)


def test_batched_nms_empty(device: torch.device) -> None:
    keep = batched_nms(
        torch.zeros(0, 4, device=device),
        torch.zeros(0, device=device),
        torch.zeros(0, dtype=torch.int64, device=device),
        0.5,
    )
    assert keep.shape == (0,) and keep.dtype == torch.int64
