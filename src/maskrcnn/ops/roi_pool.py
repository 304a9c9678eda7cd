"""RoIPool (seed paper section 3.4.1): max pooling over quantised RoI bins.

Semantics are those of torchvision's CPU kernel; for one RoI ``(x1, y1, x2, y2)`` on an
``H x W`` feature map::

    start_w = round(x1 * spatial_scale)          end_w = round(x2 * spatial_scale)
    roi_w = max(end_w - start_w + 1, 1)          bin_w = roi_w / PW
    wstart = clamp(floor(pw * bin_w) + start_w, 0, W)
    wend = clamp(ceil((pw + 1) * bin_w) + start_w, 0, W)

(``round`` is C's, half away from zero; the same for ``h``). A bin is the maximum of the
feature map over ``[hstart, hend) x [wstart, wend)``, or 0 when that window is empty. The
gradient goes to the first maximum in raster order, as the kernel's argmax does.

Implementation: every bin is a bag of the cells of its window, in raster order, over a
channels-last view of the maps, reduced by ``F.embedding_bag(mode="max")`` (fused, and its
gradient goes to the first maximum). RoIs are processed in groups of equal largest window
shape, windows padded to it by repeating their last row/column (duplicates change neither
the maximum nor which cell comes first), in chunks that bound memory. The work is about
``sum of RoI areas x C`` reads, like the C++ kernel's; within an FPN it is ~4x RoIAlign's
time, and large RoIs on a fine map are slow (seconds for 1000 RoIs of ~50 x 50 cells, C = 256).

Shape shorthand: B images, C channels, H x W feature map, K RoIs, PH x PW output bins,
WH x WW the largest bin window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .roi_align import roi_inputs

__all__ = ["roi_pool"]

# Window cells (entries of the int64 index tensor) per chunk of RoIs.
_MAX_CELLS_PER_CHUNK = 1 << 22


def _round_half_away(v: Tensor) -> Tensor:
    """C ``round``: halves away from zero (``torch.round`` rounds them to even)."""
    t = torch.trunc(v)
    return t + torch.sign(v) * ((v - t).abs() >= 0.5).to(v.dtype)


def _bin_edges(rois: Tensor, pooled: tuple[int, int], hw: tuple[int, int], scale: float) -> tuple[Tensor, ...]:
    """Integer ``[lo, hi)`` window of every bin, clamped to the map.

    Returns:
        ``h_lo, h_hi`` as ``Tensor[K, PH]`` and ``w_lo, w_hi`` as ``Tensor[K, PW]``, int64.
    """
    edges = []
    for axis, (n_bins, size) in enumerate(zip(pooled, hw)):  # axis 0: y (rows), 1: x (columns)
        start = _round_half_away(rois[:, 2 - axis] * scale)  # (K,) integral values, float dtype
        end = _round_half_away(rois[:, 4 - axis] * scale)
        length = (end - start + 1).clamp(min=1)
        bin_size = length / n_bins  # the kernel's float(int length) / bins, in the input dtype
        p = torch.arange(n_bins, device=rois.device, dtype=rois.dtype)
        lo = torch.floor(p * bin_size[:, None]).to(torch.int64) + start[:, None].to(torch.int64)
        hi = torch.ceil((p + 1) * bin_size[:, None]).to(torch.int64) + start[:, None].to(torch.int64)
        edges += [lo.clamp(0, size), hi.clamp(0, size)]
    return tuple(edges)


def _roi_pool_rois(table: Tensor, batch: Tensor, edges: tuple[Tensor, ...], hw: tuple[int, int]) -> Tensor:
    """Max over the bin windows of a chunk of RoIs; returns ``Tensor[K, PH, PW, C]``.

    Args:
        table: ``Tensor[B*H*W, C]`` channels-last feature maps.
        batch: ``Tensor[K]`` int64 image of each RoI.
        edges: :func:`_bin_edges` of these RoIs.
        hw: ``(H, W)``.
    """
    height, width = hw
    h_lo, h_hi, w_lo, w_hi = edges
    k, ph_n = h_lo.shape
    pw_n = w_lo.shape[1]
    win_h = max(int((h_hi - h_lo).max()), 1)
    win_w = max(int((w_hi - w_lo).max()), 1)
    # Cells past a bin's end repeat the bin's last row / column: duplicates change neither the
    # maximum nor which cell is first in raster order, and need no masking pass.
    rows = torch.minimum(h_lo[:, :, None] + torch.arange(win_h, device=batch.device), (h_hi - 1)[:, :, None])
    cols = torch.minimum(w_lo[:, :, None] + torch.arange(win_w, device=batch.device), (w_hi - 1)[:, :, None])
    rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)  # (K, PH, WH), (K, PW, WW); for empty bins
    # Window cells in raster order (row-major), so the first maximum is the kernel's argmax.
    index = (
        batch[:, None, None, None, None] * (height * width)
        + rows[:, :, None, :, None] * width
        + cols[:, None, :, None, :]
    )  # (K, PH, PW, WH, WW)
    # embedding_bag's max keeps the first of equal maxima and sends the gradient to it.
    out = F.embedding_bag(index.reshape(k * ph_n * pw_n, win_h * win_w), table, mode="max")  # (K*PH*PW, C)
    out = out.reshape(k, ph_n, pw_n, -1)  # (K, PH, PW, C)
    empty = (h_hi <= h_lo)[:, :, None] | (w_hi <= w_lo)[:, None, :]  # (K, PH, PW)
    return out.masked_fill(empty[..., None], 0.0)


def roi_pool(
    input: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """Max over each quantised bin of each RoI.

    Args:
        input: ``Tensor[B, C, H, W]`` feature maps, float.
        rois: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of B
            ``Tensor[Ki, 4]`` ``(x1, y1, x2, y2)`` (one per image). Input-image pixels.
        output_size: ``PH`` or ``(PH, PW)`` bins.
        spatial_scale: feature pixels per image pixel.

    Returns:
        ``Tensor[K, C, PH, PW]`` in ``input``'s dtype, contiguous; 0 in bins whose window is
        empty (e.g. outside the feature map); ``(0, C, PH, PW)`` when ``K = 0``.
        Differentiable with respect to ``input``: a bin's gradient goes to its first maximum.
    """
    if input.dtype in (torch.float16, torch.bfloat16):
        # Coordinates and weights in bf16 would be off by pixels; compute in float32 as
        # torchvision's autocast does, and hand back the input's dtype.
        return roi_pool(input.float(), rois, output_size, spatial_scale).to(input.dtype)
    pooled, rois, table = roi_inputs(input, rois, output_size)  # table: (B*H*W, C)
    if rois.shape[0] == 0:
        return input.new_zeros((0, input.shape[1]) + pooled)
    h, w = input.shape[-2:]
    batch = rois[:, 0].to(torch.int64)
    edges = _bin_edges(rois, pooled, (h, w), spatial_scale)

    # Every RoI of a chunk is padded to the chunk's largest bin window, so RoIs are grouped by
    # their window shape (tall and wide windows padded to each other's size would multiply the
    # work), and groups are split into chunks of at most _MAX_CELLS_PER_CHUNK window cells.
    win_h = (edges[1] - edges[0]).amax(1).clamp(min=1)  # (K,)
    win_w = (edges[3] - edges[2]).amax(1).clamp(min=1)
    per_roi = pooled[0] * pooled[1]
    key = win_h * (w + 1) + win_w
    order = torch.sort(key, stable=True)[1]
    runs = torch.unique_consecutive(key[order], return_counts=True)[1].tolist()
    cells = (win_h * win_w)[order].tolist()
    outs, start = [], 0
    for run in runs:
        step = max(_MAX_CELLS_PER_CHUNK // (cells[start] * per_roi), 1)  # RoIs per chunk
        for s in range(start, start + run, step):
            idx = order[s : min(s + step, start + run)]
            outs.append(_roi_pool_rois(table, batch[idx], tuple(e[idx] for e in edges), (h, w)))
        start += run
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # (K, PH, PW, C), sorted by key
    out = out[torch.argsort(order)]  # input order
    return out.permute(0, 3, 1, 2).contiguous()  # (K, C, PH, PW)
