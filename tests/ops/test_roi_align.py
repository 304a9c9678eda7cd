"""RoIAlign against the loop reference; gradients by finite differences. Tests that take
``device`` run on every device of ``tests.helpers.DEVICES`` against the same CPU reference."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from maskrcnn.ops import RoIAlign, roi_align

from . import reference

roi_align_module = importlib.import_module("maskrcnn.ops.roi_align")


def random_rois(k: int, batch: int, generator: torch.Generator, extent: float = 24.0) -> torch.Tensor:
    """``(batch, x1, y1, x2, y2)`` rows; some partly or wholly outside the map, some degenerate."""
    xy = torch.rand(k, 2, generator=generator, dtype=torch.float64) * extent * 1.4 - extent * 0.3
    wh = torch.rand(k, 2, generator=generator, dtype=torch.float64) * extent * 0.7 - 1.0  # a few negative
    ids = torch.randint(0, batch, (k, 1), generator=generator).double()
    return torch.cat([ids, xy, xy + wh], dim=1)


def expected(features: torch.Tensor, rois: torch.Tensor, pooled, scale, sampling_ratio, aligned) -> torch.Tensor:
    out = reference.roi_align(features.double().numpy(), rois.tolist(), pooled, scale, sampling_ratio, aligned)
    return torch.from_numpy(out)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_matches_reference(aligned: bool, sampling_ratio: int, scale: float, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = random_rois(25, 2, g, extent=11 / scale)
    out = roi_align(features.to(device), rois.to(device), (3, 4), scale, sampling_ratio, aligned)
    assert out.shape == (25, 3, 3, 4) and out.dtype == torch.float64 and out.is_contiguous()
    assert out.device.type == device.type
    ref = expected(features, rois, (3, 4), scale, sampling_ratio, aligned)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-12)


def test_float32_follows_kernel_arithmetic(device: torch.device) -> None:
    """Sample positions and weights computed step by step in float32 as the C++ kernel does:
    only the order of the final additions may differ, so the results agree to float32 rounding
    of the sums (a float64 reference would differ by the coordinate rounding, ~1e-5)."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(1, 4, 16, 20, generator=g) * 10
    rois = random_rois(30, 1, g, extent=60.0).float()
    for aligned in (False, True):
        out = roi_align(features.to(device), rois.to(device), 5, 0.25, -1, aligned)
        assert out.dtype == torch.float32
        ref = reference.roi_align(features.double().numpy(), rois.tolist(), (5, 5), 0.25, -1, aligned, f=np.float32)
        torch.testing.assert_close(out.cpu().double(), torch.from_numpy(ref), rtol=1e-6, atol=2e-6)


def test_hand_computed(device: torch.device) -> None:
    # 2 x 3 map, values = 10 * row + col. One bin, one sample at the RoI centre (1.0, 0.5):
    # halfway between (1, 0) and (1, 1), and y = 1 is the last row (clamped).
    features = torch.tensor([[[[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]]]], device=device)
    rois = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0]], device=device)
    assert roi_align(features, rois, 1, 1.0, 1).item() == pytest.approx(10.5)
    # aligned: the same RoI shifted by -0.5 samples (0.5, 0.0): halfway between rows, column 0.
    assert roi_align(features, rois, 1, 1.0, 1, aligned=True).item() == pytest.approx(5.0)
    # 2 x 2 samples at x in {-4, 0}, y in {0.5, 1.5}: x = -4 < -1 contributes 0 but still counts
    # in the average; (0.5, 0) reads 5 (between rows); y = 1.5 is past the last row, which it reads: 10.
    rois = torch.tensor([[0.0, -6.0, 0.0, 2.0, 2.0]], device=device)
    assert roi_align(features, rois, 1, 1.0, 2).item() == pytest.approx((0 + 0 + 5.0 + 10.0) / 4)


def test_outside_map_is_zero(device: torch.device) -> None:
    features = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=device)
    rois = torch.tensor(
        [[0.0, 20.0, 20.0, 30.0, 30.0], [0.0, -30.0, -30.0, -10.0, -10.0]], dtype=torch.float64, device=device
    )
    assert torch.equal(roi_align(features, rois, 2, 1.0, 2).cpu(), torch.zeros(2, 2, 2, 2, dtype=torch.float64))


def test_list_of_boxes_equals_rois_tensor(device: torch.device) -> None:
    g = torch.Generator().manual_seed(2)
    features = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    boxes = [random_rois(n, 1, g, 8.0)[:, 1:] for n in (4, 0, 3)]
    ids = [torch.full((len(b), 1), float(i), dtype=torch.float64) for i, b in enumerate(boxes)]
    rois = torch.cat([torch.cat([i, b], 1) for i, b in zip(ids, boxes)])  # (7, 5)
    from_list = roi_align(features.to(device), [b.to(device) for b in boxes], (2, 3), 1.0, 2)
    torch.testing.assert_close(from_list, roi_align(features.to(device), rois.to(device), (2, 3), 1.0, 2))
    torch.testing.assert_close(from_list.cpu(), expected(features, rois, (2, 3), 1.0, 2, False))


def test_empty(device: torch.device) -> None:
    features = torch.randn(2, 3, 4, 4, device=device)
    assert roi_align(features, torch.zeros(0, 5, device=device), (7, 6), 0.5, 2).shape == (0, 3, 7, 6)
    assert roi_align(features, [torch.zeros(0, 4, device=device)] * 2, 2).shape == (0, 3, 2, 2)


def test_single_row_and_column_map(device: torch.device) -> None:
    g = torch.Generator().manual_seed(3)
    for hw in [(1, 6), (5, 1), (1, 1)]:
        features = torch.randn(1, 2, *hw, generator=g, dtype=torch.float64)
        rois = random_rois(10, 1, g, 6.0)
        for aligned in (False, True):
            out = roi_align(features.to(device), rois.to(device), 2, 1.0, -1, aligned).cpu()
            torch.testing.assert_close(out, expected(features, rois, (2, 2), 1.0, -1, aligned))


def test_chunking(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    g = torch.Generator().manual_seed(4)
    features = torch.randn(2, 2, 10, 10, generator=g, dtype=torch.float64, device=device)
    rois = random_rois(20, 2, g, 10.0).to(device)
    full = roi_align(features, rois, 3, 1.0, -1)
    monkeypatch.setattr(roi_align_module, "_MAX_ENTRIES_PER_CHUNK", 50)
    torch.testing.assert_close(roi_align(features, rois, 3, 1.0, -1), full, rtol=0, atol=0)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_gradcheck(aligned: bool, sampling_ratio: int, device: torch.device) -> None:
    g = torch.Generator().manual_seed(5)
    features = torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    rois = torch.tensor(
        [[0, 0.3, 0.2, 4.7, 3.9], [1, -1.5, 1.0, 3.0, 6.5], [1, 2.2, 2.1, 9.0, 4.0], [0, 1.0, 1.0, 1.2, 1.1]],
        dtype=torch.float64,
        device=device,
    )
    torch.autograd.gradcheck(lambda x: roi_align(x, rois, (2, 3), 1.0, sampling_ratio, aligned), (features,))


def test_gradient_of_single_channel_single_bin(device: torch.device) -> None:
    # The output layout copy may be a no-op here (C = 1, one bin); backward must still work.
    features = torch.randn(1, 1, 4, 4, dtype=torch.float64, device=device, requires_grad=True)
    rois = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]], dtype=torch.float64, device=device)
    roi_align(features, rois, 1, 1.0, 2).sum().backward()
    assert features.grad is not None and features.grad.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_is_pooled_in_float32(dtype: torch.dtype, device: torch.device) -> None:
    """Under autocast the FPN maps arrive in half precision; coordinates and weights must still be
    float32 (bf16 sample positions would be off by whole pixels), and the result comes back in
    the input's dtype: the float32 pooling of the same (rounded) maps, rounded once."""
    g = torch.Generator().manual_seed(6)
    features = (torch.randn(1, 4, 40, 60, generator=g) * 3).to(dtype)
    rois = torch.tensor([[0.0, 101.3, 57.9, 187.2, 143.6], [0.0, 3.7, 2.2, 230.1, 155.0]])
    out = roi_align(features.to(device), rois.to(device), 7, 0.25, 2)
    assert out.dtype == dtype and out.device.type == device.type
    ref = reference.roi_align(features.double().numpy(), rois.tolist(), (7, 7), 0.25, 2, False)
    torch.testing.assert_close(out.cpu(), torch.from_numpy(ref).to(dtype))  # the dtype's own tolerance


def test_module() -> None:
    module = RoIAlign((2, 2), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    features = torch.randn(1, 3, 6, 6)
    rois = torch.tensor([[0.0, 1.0, 1.0, 9.0, 7.0]])
    torch.testing.assert_close(module(features, rois), roi_align(features, rois, 2, 0.5, 2, True))
    assert "aligned=True" in repr(module)


def test_reference_sanity() -> None:
    # The reference itself: a constant map gives the constant wherever all samples are inside.
    features = np.full((1, 1, 6, 6), 3.0)
    out = reference.roi_align(features, [[0, 1.0, 1.0, 4.0, 4.0]], (2, 2), 1.0, 2, False)
    assert np.allclose(out, 3.0)
