"""RoIAlign (seed paper section 3.4.2): bilinear sampling of a regular grid in each RoI bin.

Semantics and arithmetic are those of torchvision's (and Detectron2's) CPU kernel; for one RoI
``(x1, y1, x2, y2)`` on a feature map of size ``H x W``::

    offset = 0.5 if aligned else 0
    start_w = x1 * spatial_scale - offset        end_w = x2 * spatial_scale - offset
    roi_w = end_w - start_w                      (max(roi_w, 1) when not aligned)
    bin_w = roi_w / PW                           grid_w = sampling_ratio or ceil(roi_w / PW)
    x(pw, ix) = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w       for ix < grid_w

and the same for ``y``. A sample with ``y < -1``, ``y > H``, ``x < -1`` or ``x > W`` is zero;
otherwise it is clamped to ``>= 0``, and a coordinate at or past the last row/column reads
that row/column only. Each bin is the sum of its samples divided by
``max(grid_h * grid_w, 1)``.

Implementation: the feature maps are viewed as one channels-last table ``(B * H * W, C)``;
every bin is a weighted sum of at most ``4 * grid_h * grid_w`` table rows (4 bilinear corners
per sample), which ``F.embedding_bag(mode="sum", per_sample_weights=...)`` computes in one
fused, multi-threaded call with gradients for the table. Indices and weights are built for
all RoIs of all images at once, with each RoI's own adaptive grid (ragged, no padding to the
largest grid). The sample coordinates and corner weights are computed with exactly the
kernel's expressions in the input dtype, so only the order of the final additions differs
(relative differences of a few ulp).

Shape shorthand: B images, C channels, H x W feature map, K RoIs, PH x PW output bins,
G = grid_h * grid_w samples per bin, E = 4 * G table rows per bin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["roi_align", "RoIAlign", "rois_from_boxes"]

# Table rows gathered per chunk of RoIs; bounds the memory of the indices and weights.
_MAX_ENTRIES_PER_CHUNK = 1 << 22


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def rois_from_boxes(boxes: list[Tensor]) -> Tensor:
    """Concatenate per-image boxes into ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``.

    Args:
        boxes: one ``Tensor[Ki, 4]`` ``(x1, y1, x2, y2)`` per image, same dtype and device.

    Returns:
        ``Tensor[sum Ki, 5]`` in the boxes' dtype, image 0's boxes first.
    """
    concat = torch.cat(boxes, dim=0)
    ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
    return torch.cat([ids, concat], dim=1)


def _axis_samples(
    start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis for every (RoI, bin, sample), ragged over RoIs.

    Args:
        start, bin_size: ``Tensor[K]`` RoI start and bin size in feature pixels.
        grid: ``Tensor[K]`` int64 samples per bin along this axis (``>= 0``).
        pooled: bins along this axis.
        size: feature map extent along this axis.

    Returns:
        ``low, high, w_low, w_high, valid``, each ``Tensor[S]`` over all RoIs' ``pooled * grid``
        positions (RoI-major, then bin, then sample): the two integer neighbours, their
        interpolation weights (``h = 1 - l`` and ``l``), and whether the sample is inside
        ``[-1, size]`` (samples outside contribute 0).
    """
    counts = grid * pooled  # (K,)
    roi = torch.repeat_interleave(torch.arange(start.numel(), device=start.device), counts)  # (S,)
    first = torch.cumsum(counts, 0) - counts  # (K,) offset of each RoI's first position
    local = torch.arange(roi.numel(), device=start.device) - first[roi]  # (S,) index within the RoI
    g = grid[roi]
    p, i = local // g, local % g
    dtype = start.dtype
    b = bin_size[roi]
    # The kernel's expression and evaluation order: start + p * bin + (i + .5) * bin / grid.
    coord = start[roi] + p.to(dtype) * b + (i.to(dtype) + 0.5) * b / g.to(dtype)
    valid = (coord >= -1.0) & (coord <= size)
    coord = torch.where(valid, coord, 0.0).clamp(min=0)  # invalid (also inf/nan) samples get weight 0
    low = coord.to(torch.int64)  # truncation == floor for coord >= 0
    at_end = low >= size - 1
    low = torch.where(at_end, size - 1, low)
    high = torch.where(at_end, low, low + 1)
    coord = torch.where(at_end, low.to(dtype), coord)
    w_high = coord - low.to(dtype)  # l
    w_low = 1.0 - w_high  # h = 1 - l
    return low, high, w_low, w_high, valid


def _roi_align_rois(
    table: Tensor,
    rois: Tensor,
    hw: tuple[int, int],
    pooled: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[Tensor, Tensor]:
    """RoIAlign sums of a chunk of RoIs against the channels-last table.

    Returns:
        ``Tensor[K, PH, PW, C]`` sums over each bin's samples and ``Tensor[K]`` the kernel's
        divisor ``max(grid_h * grid_w, 1)``; the caller divides after its layout copy.
    """
    height, width = hw
    ph_n, pw_n = pooled
    k = rois.shape[0]
    dtype = table.dtype
    offset = 0.5 if aligned else 0.0
    batch = rois[:, 0].to(torch.int64)
    start_w = rois[:, 1] * spatial_scale - offset
    start_h = rois[:, 2] * spatial_scale - offset
    end_w = rois[:, 3] * spatial_scale - offset
    end_h = rois[:, 4] * spatial_scale - offset
    roi_w = end_w - start_w
    roi_h = end_h - start_h
    if not aligned:  # malformed RoIs are forced to 1 x 1
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / ph_n
    bin_w = roi_w / pw_n
    if sampling_ratio > 0:
        grid_h = torch.full((k,), sampling_ratio, dtype=torch.int64, device=rois.device)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(roi_h / ph_n).to(torch.int64)
        grid_w = torch.ceil(roi_w / pw_n).to(torch.int64)
    count = (grid_h * grid_w).clamp(min=1).to(dtype)  # (K,) the kernel's divisor
    # A negative grid (aligned, x2 < x1) samples nothing, like the kernel's empty loops.
    grid_h, grid_w = grid_h.clamp(min=0), grid_w.clamp(min=0)

    # Per-axis samples, ragged: RoI r has PH * grid_h[r] rows and PW * grid_w[r] columns.
    y_lo, y_hi, hy, ly, vy = _axis_samples(start_h, bin_h, grid_h, ph_n, height)
    x_lo, x_hi, hx, lx, vx = _axis_samples(start_w, bin_w, grid_w, pw_n, width)
    rows_per_roi = ph_n * grid_h  # (K,)
    cols_per_roi = pw_n * grid_w
    row_first = torch.cumsum(rows_per_roi, 0) - rows_per_roi
    col_first = torch.cumsum(cols_per_roi, 0) - cols_per_roi

    # Every (RoI, ph, pw, iy, ix) sample, ordered so that each bin's samples are contiguous.
    per_roi = rows_per_roi * cols_per_roi  # (K,) samples of one RoI
    roi = torch.repeat_interleave(torch.arange(k, device=rois.device), per_roi)  # (S,)
    local = torch.arange(roi.numel(), device=rois.device) - (torch.cumsum(per_roi, 0) - per_roi)[roi]
    gh, gw = grid_h[roi], grid_w[roi]
    ix = local % gw
    rest = local // gw
    iy = rest % gh
    rest = rest // gh
    pw = rest % pw_n
    ph = rest // pw_n
    row = row_first[roi] + ph * gh + iy  # (S,) index into the y-axis samples
    col = col_first[roi] + pw * gw + ix  # (S,) index into the x-axis samples

    valid = (vy[row] & vx[col]).to(dtype)
    yl, yh, xl, xh = y_lo[row], y_hi[row], x_lo[col], x_hi[col]
    wy_h, wy_l, wx_h, wx_l = hy[row], ly[row], hx[col], lx[col]
    base = batch[roi] * (height * width)
    index = torch.stack(
        (base + yl * width + xl, base + yl * width + xh, base + yh * width + xl, base + yh * width + xh), dim=1
    )  # (S, 4) corners in the kernel's order
    weight = torch.stack((wy_h * wx_h, wy_h * wx_l, wy_l * wx_h, wy_l * wx_l), dim=1) * valid[:, None]  # (S, 4)

    # One bag per (RoI, ph, pw), holding its 4 * grid_h * grid_w corner rows.
    bag_sizes = (4 * grid_h * grid_w).repeat_interleave(ph_n * pw_n)  # (K * PH * PW,)
    offsets = torch.cumsum(bag_sizes, 0) - bag_sizes
    out = F.embedding_bag(
        index.reshape(-1), table, offsets, mode="sum", per_sample_weights=weight.reshape(-1)
    )  # (K * PH * PW, C)
    out = out.reshape(k, ph_n, pw_n, -1)  # (K, PH, PW, C)
    return out, count


def roi_align(
    input: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Average of bilinearly interpolated samples in each bin of each RoI.

    Args:
        input: ``Tensor[B, C, H, W]`` feature maps, float.
        rois: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of B
            ``Tensor[Ki, 4]`` ``(x1, y1, x2, y2)`` (one per image, image order). Coordinates are
            in input-image pixels; ``spatial_scale`` maps them onto the feature map.
        output_size: ``PH`` or ``(PH, PW)`` bins.
        spatial_scale: feature pixels per image pixel (1/4 for a stride-4 map).
        sampling_ratio: samples per bin along each axis; ``<= 0`` uses
            ``ceil(roi_size / bins)`` per RoI.
        aligned: shift coordinates by -0.5 feature pixel so that pixel centres line up
            (Detectron2); False reproduces the original RoIAlign (torchvision's default).

    Returns:
        ``Tensor[K, C, PH, PW]`` in ``input``'s dtype, contiguous; ``(0, C, PH, PW)`` when
        ``K = 0``. Differentiable with respect to ``input`` (not ``rois``).
    """
    pooled = _pair(output_size)
    if not isinstance(rois, Tensor):
        rois = rois_from_boxes(list(rois))
    rois = rois.detach().to(input.dtype)
    b, c, h, w = input.shape
    k = rois.shape[0]
    if k == 0:
        return input.new_zeros((0, c) + pooled)
    # (B*H*W, C) channels last. Contiguous on purpose: reshape alone can return a strided view,
    # and gathering rows from that is ~10x slower than this copy.
    table = input.permute(0, 2, 3, 1).contiguous().view(b * h * w, c)

    # Chunk RoIs so that the gathered corner rows stay bounded (matters for large adaptive grids).
    with torch.no_grad():
        if sampling_ratio > 0:
            grid = torch.full((k,), sampling_ratio * sampling_ratio, dtype=torch.int64, device=rois.device)
        else:  # an upper bound of each RoI's grid_h * grid_w
            rw = ((rois[:, 3] - rois[:, 1]) * spatial_scale).abs().clamp(min=1.0)
            rh = ((rois[:, 4] - rois[:, 2]) * spatial_scale).abs().clamp(min=1.0)
            grid = (torch.ceil(rh / pooled[0]) * torch.ceil(rw / pooled[1])).to(torch.int64)
        entries = 4 * pooled[0] * pooled[1] * grid  # (K,) table rows gathered per RoI
        chunk = (torch.cumsum(entries, 0) - entries) // _MAX_ENTRIES_PER_CHUNK  # (K,) non-decreasing
        sizes = torch.unique_consecutive(chunk, return_counts=True)[1].tolist()
    parts = [
        _roi_align_rois(table, part, (h, w), pooled, spatial_scale, sampling_ratio, aligned)
        for part in torch.split(rois, sizes)
    ]
    sums = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=0)  # (K, PH, PW, C)
    count = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], dim=0)  # (K,)
    # Sum, then divide, as the kernel does; in place on the contiguous copy saves a pass.
    return sums.permute(0, 3, 1, 2).contiguous().div_(count[:, None, None, None])  # (K, C, PH, PW)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` with fixed geometry."""

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )
