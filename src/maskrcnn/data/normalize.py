"""Percentile intensity normalisation: 12- and 16-bit microscopy images stretched to 0..255.

A 12-bit camera image stored as 16 bits uses 0..4095 of 0..65535, and a dim fluorescence
channel far less, so ``data.images.to_rgb``'s fixed rule (divide by 257) gives the model an
almost black picture. Microscopy tools (Fiji's auto contrast, CSBDeep's ``normalize``,
Cellpose, StarDist) instead map each image's own low and high percentiles (1 and 99.8 are
the usual values) to black and white:

    out = clip((value - p_low) / (p_high - p_low), 0, 1) * 255, rounded to uint8

over all pixels and channels of the image together (one range, so colours keep their
balance). The percentiles are the model's (``TransformConfig.percentiles``, saved in every
checkpoint), so training and prediction read images the same way.

For images of more than ``MAX_SAMPLES`` pixels the percentiles are taken over every k-th row
and column (the smallest k that brings the count within it): the same pixels whichever way
the image is read (whole, tile by tile, or window by window from a GeoTIFF).

Shape shorthand: H x W image, C channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

# Pixels the percentiles are taken over, at most: 4 M (32 MB of float64) estimates a
# percentile to about 0.05 percentage points, and costs ~0.2 s a megapixel less than the whole.
MAX_SAMPLES = 1 << 22


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, float] | None:
    """``(low, high)`` with 0 <= low < high <= 100, None for ``()`` (the fixed rule); else a
    one-line ValueError."""
    values = tuple(float(p) for p in percentiles)
    if not values:
        return None
    if len(values) != 2 or not all(math.isfinite(p) for p in values) or not 0.0 <= values[0] < values[1] <= 100.0:
        raise ValueError(
            f"percentiles must be two numbers low < high in [0, 100] (e.g. [1, 99.8]) or [], got {list(percentiles)}"
        )
    return values[0], values[1]


def sample_step(height: int, width: int) -> int:
    """The smallest k such that every k-th row and column of an H x W image is at most ``MAX_SAMPLES`` pixels."""
    k = 1
    while math.ceil(height / k) * math.ceil(width / k) > MAX_SAMPLES:
        k += 1
    return k


def value_range(samples: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(p_low, p_high) of ``samples`` ((h, w) or (h, w, C), any numeric dtype); NaN and
    infinities count as 0, as ``to_rgb`` treats them."""
    values = np.nan_to_num(np.asarray(samples, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if not values.size:
        raise ValueError("image has no pixels")
    low, high = np.percentile(values, percentiles)
    return float(low), float(high)


def image_range(pixels: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(p_low, p_high) of an (H, W[, C]) image, over every ``sample_step``-th row and column."""
    k = sample_step(pixels.shape[0], pixels.shape[1])
    return value_range(pixels[::k, ::k], percentiles)


def stretch(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W[, C]) values -> uint8 of the same shape: ``low`` and below 0, ``high`` and above
    255, linear between. A flat image (high <= low) is all 0: it holds no contrast to show."""
    a = np.nan_to_num(np.asarray(pixels, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if high <= low:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - low) / (high - low) * 255.0).clip(0, 255).astype(np.uint8)


def strip_range(
    read_rows: Callable[[int, int], np.ndarray],
    height: int,
    width: int,
    percentiles: tuple[float, float],
    strip: int = 1024,
) -> tuple[float, float]:
    """``image_range`` of an image read a strip of rows at a time (a tiled run, a GeoTIFF):
    the same sampled pixels, never the whole image in memory.

    Args:
        read_rows: (y0, y1) -> the (y1 - y0, W[, C]) pixel values of rows y0 .. y1 - 1.
        strip: rows read at a time (rounded up to a multiple of the sample step).
    """
    k = sample_step(height, width)
    rows = -(-strip // k) * k  # a multiple of k: each strip's sample rows are the image's
    samples = [read_rows(y, min(y + rows, height))[::k, ::k] for y in range(0, height, rows)]
    return value_range(np.concatenate(samples), percentiles)
