"""RoIPool against the loop reference; gradients to the first maximum. Tests that take ``device``
run on every device of ``tests.helpers.DEVICES`` against the same CPU reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from maskrcnn.ops import roi_pool

from . import reference

roi_pool_module = importlib.import_module("maskrcnn.ops.roi_pool")


def random_rois(k: int, batch: int, generator: torch.Generator, extent: float) -> torch.Tensor:
    xy = torch.rand(k, 2, generator=generator, dtype=torch.float64) * extent * 1.4 - extent * 0.3
    wh = torch.rand(k, 2, generator=generator, dtype=torch.float64) * extent * 0.8 - 1.0
    ids = torch.randint(0, batch, (k, 1), generator=generator).double()
    return torch.cat([ids, xy, xy + wh], dim=1)


def expected(features: torch.Tensor, rois: torch.Tensor, pooled, scale) -> torch.Tensor:
    return torch.from_numpy(reference.roi_pool(features.double().numpy(), rois.tolist(), pooled, scale))


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
def test_matches_reference(scale: float, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = random_rois(40, 2, g, 11 / scale)
    out = roi_pool(features.to(device), rois.to(device), (3, 4), scale)
    assert out.shape == (40, 3, 3, 4) and out.is_contiguous() and out.device.type == device.type
    torch.testing.assert_close(out.cpu(), expected(features, rois, (3, 4), scale), rtol=0, atol=0)


def test_round_half_away_from_zero(device: torch.device) -> None:
    # x1 * scale = 2.5 rounds to 3 (C round), not 2 (round half to even); -0.5 rounds to -1.
    features = torch.arange(10.0).reshape(1, 1, 1, 10)
    out = roi_pool(features.to(device), torch.tensor([[0.0, 5.0, 0.0, 5.0, 0.0]], device=device), 1, 0.5)
    assert out.item() == 3.0
    rois = torch.tensor([[0.0, 2.5, 0.0, 2.5, 0.0], [0.0, -0.5, 0.0, 0.4, 0.0]])
    out = roi_pool(features.to(device), rois.to(device), 1, 1.0).cpu()
    torch.testing.assert_close(out, expected(features, rois, (1, 1), 1.0).float())


def test_empty_bins_and_outside(device: torch.device) -> None:
    features = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    rois = torch.tensor([[0.0, 10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    out = roi_pool(features.to(device), rois.to(device), 3, 1.0).cpu()
    assert torch.equal(out[0], torch.zeros(2, 3, 3, dtype=torch.float64))
    torch.testing.assert_close(out, expected(features, rois, (3, 3), 1.0), rtol=0, atol=0)


def test_chunking(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 2, 12, 12, generator=g, dtype=torch.float64)
    rois = random_rois(30, 2, g, 12.0)
    monkeypatch.setattr(roi_pool_module, "_MAX_CELLS_PER_CHUNK", 20)
    out = roi_pool(features.to(device), rois.to(device), 2, 1.0).cpu()
    torch.testing.assert_close(out, expected(features, rois, (2, 2), 1.0), rtol=0, atol=0)


def test_list_form_and_empty(device: torch.device) -> None:
    features = torch.randn(2, 3, 5, 5, device=device)
    boxes = [torch.tensor([[0.0, 0.0, 3.0, 3.0]], device=device), torch.tensor([[1.0, 1.0, 4.0, 2.0]], device=device)]
    rois = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0], [1.0, 1.0, 1.0, 4.0, 2.0]], device=device)
    assert torch.equal(roi_pool(features, boxes, 2), roi_pool(features, rois, 2))
    assert roi_pool(features, torch.zeros(0, 5, device=device), (2, 3)).shape == (0, 3, 2, 3)


def test_gradcheck(device: torch.device) -> None:
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64)  # distinct values: no ties
    features = features.to(device).requires_grad_(True)
    rois = torch.tensor(
        [[0, 0.0, 0.0, 4.0, 5.0], [1, 1.2, 2.0, 7.0, 4.0], [1, -2.0, -1.0, 1.0, 9.0]],
        dtype=torch.float64,
        device=device,
    )
    torch.autograd.gradcheck(lambda x: roi_pool(x, rois, (2, 3), 1.0), (features,))


def test_gradient_goes_to_first_maximum(device: torch.device) -> None:
    features = torch.tensor([[[[1.0, 5.0], [5.0, 2.0]]]], device=device, requires_grad=True)
    roi_pool(features, torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]], device=device), 1).sum().backward()
    assert features.grad.tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]


def test_gradient_with_ties_goes_to_each_bins_first_cell(device: torch.device) -> None:
    features = torch.zeros(1, 1, 6, 6, device=device, requires_grad=True)  # every cell ties
    roi_pool(features, torch.tensor([[0.0, 0.0, 0.0, 5.0, 5.0]], device=device), 3).sum().backward()
    expected = torch.zeros(6, 6)
    expected[0::2, 0::2] = 1.0  # 2 x 2 bins starting at even rows and columns
    assert torch.equal(features.grad[0, 0].cpu(), expected)
