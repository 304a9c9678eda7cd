"""Box encoding/decoding against per-box float64 formulas. Tests that take ``device`` run on
every device of ``tests.helpers.DEVICES``."""

from __future__ import annotations

import math

import pytest
import torch

from maskrcnn.ops import BoxCoder

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 100
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 50 + 1
    return torch.cat([xy, xy + wh], dim=1)


def encode_one(g: list[float], r: list[float], w: tuple[float, ...]) -> list[float]:
    rw, rh = r[2] - r[0], r[3] - r[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    rcx, rcy = r[0] + rw / 2, r[1] + rh / 2
    gcx, gcy = g[0] + gw / 2, g[1] + gh / 2
    return [w[0] * (gcx - rcx) / rw, w[1] * (gcy - rcy) / rh, w[2] * math.log(gw / rw), w[3] * math.log(gh / rh)]


def decode_one(d: list[float], r: list[float], w: tuple[float, ...], clip: float) -> list[float]:
    rw, rh = r[2] - r[0], r[3] - r[1]
    rcx, rcy = r[0] + rw / 2, r[1] + rh / 2
    dx, dy = d[0] / w[0], d[1] / w[1]
    dw, dh = min(d[2] / w[2], clip), min(d[3] / w[3], clip)
    cx, cy = dx * rw + rcx, dy * rh + rcy
    pw, ph = math.exp(dw) * rw, math.exp(dh) * rh
    return [cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2]


def test_encode_matches_reference(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    gt, ref = random_boxes(20, g), random_boxes(20, g)
    codes = BoxCoder(WEIGHTS).encode(gt.to(device), ref.to(device)).cpu()
    expected = torch.tensor([encode_one(a.tolist(), b.tolist(), WEIGHTS) for a, b in zip(gt, ref)], dtype=torch.float64)
    torch.testing.assert_close(codes, expected, rtol=1e-12, atol=1e-12)


def test_encode_hand() -> None:
    codes = BoxCoder().encode(torch.tensor([[2.0, 2.0, 6.0, 10.0]]), torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    torch.testing.assert_close(codes, torch.tensor([[0.5, 1.0, 0.0, math.log(2.0)]]))


def test_decode_matches_reference_multiclass(device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    ref = random_boxes(15, g)
    codes = torch.randn(15, 3 * 4, generator=g, dtype=torch.float64) * 3  # some dw, dh above the clip
    coder = BoxCoder(WEIGHTS, clip=math.log(1000.0 / 16))
    boxes = coder.decode(codes.to(device), ref.to(device)).cpu()
    assert boxes.shape == (15, 3, 4)
    for i in range(15):
        for k in range(3):
            expected = decode_one(codes[i, 4 * k : 4 * k + 4].tolist(), ref[i].tolist(), WEIGHTS, coder.clip)
            torch.testing.assert_close(boxes[i, k], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-9)


def test_decode_clips_large_codes() -> None:
    coder = BoxCoder(clip=math.log(1000.0 / 16))
    boxes = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    torch.testing.assert_close(boxes[0, 0], torch.tensor([-492.0, -492.0, 508.0, 508.0]))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), WEIGHTS])
def test_roundtrip(weights: tuple[float, ...], device: torch.device) -> None:
    g = torch.Generator().manual_seed(2)
    gt, ref = random_boxes(30, g).to(device), random_boxes(30, g).to(device)
    coder = BoxCoder(weights)
    torch.testing.assert_close(coder.decode(coder.encode(gt, ref), ref)[:, 0], gt)


def test_decode_casts_reference_boxes_and_handles_empty() -> None:
    coder = BoxCoder(WEIGHTS)
    out = coder.decode(torch.zeros(3, 8, dtype=torch.float64), torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 3))
    assert out.dtype == torch.float64 and out.shape == (3, 2, 4)
    assert coder.decode(torch.zeros(0, 4 * 91), torch.zeros(0, 4)).shape == (0, 91, 4)
    assert coder.encode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
