"""Slow references for the ops, written from the rules in the ops' docstrings.

Plain Python loops over float64 (Python floats) or numpy, sharing no code with
``maskrcnn.ops``. Each takes and returns plain lists / numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np


def iou(a: list[float], b: list[float]) -> float:
    """IoU of two boxes in the C++ NMS kernel's order of operations (Python floats)."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / (area_a + area_b - inter)


def iou_float32(a: list[float], b: list[float]) -> float:
    """The same IoU evaluated step by step in IEEE single precision."""
    f = np.float32
    a, b = [f(v) for v in a], [f(v) for v in b]
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    w = max(f(0), min(a[2], b[2]) - max(a[0], b[0]))
    h = max(f(0), min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return float(inter / (area_a + area_b - inter))


def greedy_nms(boxes: list[list[float]], scores: list[float], thresh: float, float32: bool = False) -> list[int]:
    """One box at a time: visit by decreasing score (ties: lower index first), keep unless a
    kept box overlaps it with IoU > thresh."""
    overlap = iou_float32 if float32 else iou
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        if all(overlap(boxes[j], boxes[i]) <= thresh for j in kept):
            kept.append(i)
    return kept


def batched_greedy_nms(boxes, scores, groups, thresh, float32: bool = False) -> list[int]:
    """Greedy NMS per group; all kept indices by decreasing score (ties: lower index first)."""
    kept: list[int] = []
    for g in sorted(set(groups)):
        members = [i for i in range(len(groups)) if groups[i] == g]
        sub = greedy_nms([boxes[i] for i in members], [scores[i] for i in members], thresh, float32)
        kept += [members[i] for i in sub]
    return sorted(kept, key=lambda i: (-scores[i], i))


def _bilinear(fmap: np.ndarray, y, x, f=float) -> np.ndarray | None:
    """RoIAlign's bilinear read of ``fmap[C, H, W]`` at (y, x); None for an ignored sample.

    ``f`` is the scalar type the weights are computed in (``float`` or ``np.float32``).
    """
    _, height, width = fmap.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return None
    y, x = max(y, f(0.0)), max(x, f(0.0))
    y_low, x_low = int(math.floor(y)), int(math.floor(x))
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = f(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = f(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - f(y_low), x - f(x_low)
    hy, hx = f(1.0) - ly, f(1.0) - lx
    return (
        float(hy * hx) * fmap[:, y_low, x_low]
        + float(hy * lx) * fmap[:, y_low, x_high]
        + float(ly * hx) * fmap[:, y_high, x_low]
        + float(ly * lx) * fmap[:, y_high, x_high]
    )


def roi_align(
    features: np.ndarray,
    rois: list[list[float]],
    pooled: tuple[int, int],
    scale: float,
    sampling_ratio: int,
    aligned: bool,
    f=float,
) -> np.ndarray:
    """RoIAlign of ``features[B, C, H, W]`` for rows ``(batch, x1, y1, x2, y2)`` -> ``[K, C, PH, PW]``.

    Coordinates and bilinear weights are computed with scalar type ``f``: ``float`` (double) or
    ``np.float32`` to follow a float32 kernel step by step; the sums are always float64.
    """
    ph_n, pw_n = pooled
    c = features.shape[1]
    out = np.zeros((len(rois), c, ph_n, pw_n))
    scale, one = f(scale), f(1.0)
    for n, (b, x1, y1, x2, y2) in enumerate(rois):
        fmap = features[int(b)]
        offset = f(0.5) if aligned else f(0.0)
        x1, y1, x2, y2 = f(x1), f(y1), f(x2), f(y2)
        start_w, start_h = x1 * scale - offset, y1 * scale - offset
        roi_w, roi_h = (x2 * scale - offset) - start_w, (y2 * scale - offset) - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, one), max(roi_h, one)
        bin_h, bin_w = roi_h / f(ph_n), roi_w / f(pw_n)
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / f(ph_n))
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / f(pw_n))
        count = max(grid_h * grid_w, 1)
        for ph in range(ph_n):
            for pw in range(pw_n):
                total = np.zeros(c)
                for iy in range(grid_h):
                    y = start_h + f(ph) * bin_h + f(iy + 0.5) * bin_h / f(grid_h)
                    for ix in range(grid_w):
                        x = start_w + f(pw) * bin_w + f(ix + 0.5) * bin_w / f(grid_w)
                        v = _bilinear(fmap, y, x, f)
                        if v is not None:
                            total += v
                out[n, :, ph, pw] = total / count
    return out


def c_round(v: float) -> int:
    """C ``round``: halves away from zero."""
    return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))


def roi_pool(features: np.ndarray, rois: list[list[float]], pooled: tuple[int, int], scale: float) -> np.ndarray:
    """Quantised RoI max pooling of ``features[B, C, H, W]`` -> ``[K, C, PH, PW]``."""
    ph_n, pw_n = pooled
    _, c, height, width = features.shape
    out = np.zeros((len(rois), c, ph_n, pw_n))
    for n, (b, x1, y1, x2, y2) in enumerate(rois):
        start_w, start_h = c_round(x1 * scale), c_round(y1 * scale)
        end_w, end_h = c_round(x2 * scale), c_round(y2 * scale)
        bin_h = max(end_h - start_h + 1, 1) / ph_n
        bin_w = max(end_w - start_w + 1, 1) / pw_n
        for ph in range(ph_n):
            h0 = min(max(math.floor(ph * bin_h) + start_h, 0), height)
            h1 = min(max(math.ceil((ph + 1) * bin_h) + start_h, 0), height)
            for pw in range(pw_n):
                w0 = min(max(math.floor(pw * bin_w) + start_w, 0), width)
                w1 = min(max(math.ceil((pw + 1) * bin_w) + start_w, 0), width)
                if h1 > h0 and w1 > w0:
                    out[n, :, ph, pw] = features[int(b), :, h0:h1, w0:w1].reshape(c, -1).max(axis=1)
    return out


def resize_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (``align_corners=False``), clamped at the edges."""
    in_h, in_w = img.shape

    def taps(out_size: int, in_size: int) -> list[tuple[int, int, float]]:
        result = []
        for d in range(out_size):
            src = max((d + 0.5) * in_size / out_size - 0.5, 0.0)
            i0 = int(math.floor(src))
            i1 = min(i0 + 1, in_size - 1)
            result.append((i0, i1, src - i0))
        return result

    out = np.zeros((out_h, out_w))
    for r, (r0, r1, ly) in enumerate(taps(out_h, in_h)):
        for c, (c0, c1, lx) in enumerate(taps(out_w, in_w)):
            out[r, c] = (1 - ly) * ((1 - lx) * img[r0, c0] + lx * img[r0, c1]) + ly * (
                (1 - lx) * img[r1, c0] + lx * img[r1, c1]
            )
    return out


def paste_mask(mask: np.ndarray, box: list[float], image_hw: tuple[int, int], padding: int = 1) -> np.ndarray:
    """Paste one ``M x M`` mask into a zero image following the torchvision recipe."""
    m = mask.shape[0]
    padded = np.pad(mask, padding)
    scale = (m + 2 * padding) / m
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hw, hh = (x2 - x1) / 2 * scale, (y2 - y1) / 2 * scale
    x1, y1, x2, y2 = (int(v) for v in (cx - hw, cy - hh, cx + hw, cy + hh))  # int() truncates toward 0
    w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    resized = resize_bilinear(padded, h, w)
    out = np.zeros(image_hw)
    for r in range(max(y1, 0), min(y2 + 1, image_hw[0])):
        for c in range(max(x1, 0), min(x2 + 1, image_hw[1])):
            out[r, c] = resized[r - y1, c - x1]
    return out
