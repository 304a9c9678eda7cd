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
every bin is a weighted sum of ``4 * grid_h * grid_w`` table rows (4 bilinear corners per
sample), which ``F.embedding_bag(mode="sum", per_sample_weights=...)`` computes in one fused,
multi-threaded call with gradients for the table. Indices and weights are built for all RoIs
of all images at once by broadcasting per-axis taps; with an adaptive sampling ratio, RoIs
are grouped by their grid size (no padding to the largest grid). Sample coordinates and
corner weights are computed with exactly the kernel's expressions in the input dtype, so
only the order of the final additions differs (a few ulp). Resampling through
``grid_sample`` instead would round the coordinates through normalised ``[-1, 1]`` values:
errors of ~1e-5 pixel, hence ~1e-5 in the outputs, and it was 3x slower here.

Shape shorthand: B images, C channels, H x W feature map, K RoIs, PH x PW output bins,
G = grid_h * grid_w samples per bin, E = 4 * G table rows per bin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["roi_align", "RoIAlign", "rois_from_boxes", "roi_inputs"]

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


def roi_inputs(
    input: Tensor, rois: Tensor | list[Tensor], output_size: int | tuple[int, int]
) -> tuple[tuple[int, int], Tensor, Tensor]:
    """Common preparation of the RoI ops: ``(PH, PW)``, ``rois`` as ``Tensor[K, 5]`` in the
    input's dtype (no gradient), and the maps as a channels-last table ``(B*H*W, C)``.

    The table is a contiguous copy on purpose: ``reshape`` alone can return a strided view,
    and gathering rows from that is ~10x slower than the copy.
    """
    if not isinstance(rois, Tensor):
        rois = rois_from_boxes(list(rois))
    b, c, h, w = input.shape
    table = input.permute(0, 2, 3, 1).contiguous().view(b * h * w, c)
    return _pair(output_size), rois.detach().to(input.dtype), table


def _axis_taps(start: Tensor, bin_size: Tensor, grid: int, pooled: int, size: int) -> tuple[Tensor, Tensor]:
    """Bilinear taps along one axis for RoIs that share a grid size.

    Args:
        start, bin_size: ``Tensor[K]`` RoI start and bin size in feature pixels.
        grid: samples per bin along this axis (``>= 1``).
        pooled: bins along this axis.
        size: feature map extent along this axis.

    Returns:
        ``index`` int64 and ``weight``, each ``Tensor[K, pooled, grid, 2]``: the lower and upper
        neighbour of every sample and their weights ``(1 - l, l)``; samples outside
        ``[-1, size]`` get weight 0.
    """
    dtype = start.dtype
    p = torch.arange(pooled, device=start.device, dtype=dtype)[None, :, None]  # (1, P, 1)
    i = torch.arange(grid, device=start.device, dtype=dtype)[None, None, :]  # (1, 1, G)
    start, bin_size = start[:, None, None], bin_size[:, None, None]  # (K, 1, 1)
    # The kernel's expression and evaluation order: start + p * bin + (i + .5) * bin / grid.
    coord = start + p * bin_size + (i + 0.5) * bin_size / grid  # (K, P, G)
    valid = (coord >= -1.0) & (coord <= size)
    coord = torch.where(valid, coord, 0.0).clamp(min=0)  # invalid (also inf/nan) samples: weight 0
    low = coord.to(torch.int64)  # truncation == floor for coord >= 0
    at_end = low >= size - 1
    low = torch.where(at_end, size - 1, low)
    high = torch.where(at_end, low, low + 1)
    coord = torch.where(at_end, low.to(dtype), coord)
    lw = coord - low.to(dtype)  # l
    hw = 1.0 - lw  # h = 1 - l
    valid = valid.to(dtype)  # multiplying by 1 or 0 leaves the kernel's weights exact
    return torch.stack((low, high), dim=-1), torch.stack((hw * valid, lw * valid), dim=-1)


def _roi_align_group(
    table: Tensor,
    rois: Tensor,
    hw: tuple[int, int],
    pooled: tuple[int, int],
    grid: tuple[int, int],
    spatial_scale: float,
    aligned: bool,
) -> Tensor:
    """Sums over the samples of each bin, for RoIs that share the grid ``(grid_h, grid_w)``.

    Args:
        table: ``Tensor[B*H*W, C]`` channels-last feature maps.
        rois: ``Tensor[K, 5]`` in the table's dtype.

    Returns:
        ``Tensor[K, PH, PW, C]`` (not yet divided by the sample count).
    """
    height, width = hw
    ph_n, pw_n = pooled
    grid_h, grid_w = grid
    k = rois.shape[0]
    if grid_h <= 0 or grid_w <= 0:  # no samples (aligned RoIs with x2 < x1): the kernel gives 0
        return table.new_zeros((k, ph_n, pw_n, table.shape[1]))
    start_w, start_h, roi_w, roi_h = _roi_geometry(rois, spatial_scale, aligned)
    y_index, y_weight = _axis_taps(start_h, roi_h / ph_n, grid_h, ph_n, height)  # (K, PH, GH, 2)
    x_index, x_weight = _axis_taps(start_w, roi_w / pw_n, grid_w, pw_n, width)  # (K, PW, GW, 2)
    row_offset = (rois[:, 0].to(torch.int64)[:, None, None, None] * height + y_index) * width  # (K, PH, GH, 2)
    # Every (bin, sample, corner) by one broadcast of the row taps (iy, y_low/y_high) against
    # the column taps (ix, x_low/x_high); the innermost dimension is 2 * GW long, which keeps the
    # broadcasts fast. Within a bin the entries are ordered (iy, a, ix, b) rather than the
    # kernel's (iy, ix, a, b): the same terms, summed in another order.
    y_index, y_weight = row_offset.reshape(k, ph_n, 1, 2 * grid_h, 1), y_weight.reshape(k, ph_n, 1, 2 * grid_h, 1)
    x_index, x_weight = x_index.reshape(k, 1, pw_n, 1, 2 * grid_w), x_weight.reshape(k, 1, pw_n, 1, 2 * grid_w)
    entries = 4 * grid_h * grid_w
    index = (y_index + x_index).reshape(-1, entries)  # (K * PH * PW, 4 * GH * GW), one bag per bin
    weight = (y_weight * x_weight).reshape(-1, entries)  # the kernel's hy * hx etc.
    out = F.embedding_bag(index, table, mode="sum", per_sample_weights=weight)  # (K * PH * PW, C)
    return out.reshape(k, ph_n, pw_n, -1)  # (K, PH, PW, C)


def _roi_geometry(rois: Tensor, spatial_scale: float, aligned: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``start_w, start_h, roi_w, roi_h`` of each RoI on the feature map, ``Tensor[K]`` each."""
    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * spatial_scale - offset
    start_h = rois[:, 2] * spatial_scale - offset
    roi_w = (rois[:, 3] * spatial_scale - offset) - start_w
    roi_h = (rois[:, 4] * spatial_scale - offset) - start_h
    if not aligned:  # malformed RoIs are forced to 1 x 1
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    return start_w, start_h, roi_w, roi_h


def _grid_groups(
    rois: Tensor, pooled: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool
) -> tuple[Tensor, list[tuple[Tensor | None, int, int]], Tensor | None]:
    """Group RoIs by their sampling grid, so that each group's samples are a dense broadcast.

    Returns:
        ``count``: ``Tensor[K]`` the kernel's divisor ``max(grid_h * grid_w, 1)``;
        ``groups``: ``(indices, grid_h, grid_w)`` per group, indices None meaning all RoIs;
        ``order``: the RoI permutation that concatenates the groups, or None if there is one.
    """
    k = rois.shape[0]
    with torch.no_grad():
        if sampling_ratio > 0:
            count = torch.full((k,), float(sampling_ratio * sampling_ratio), dtype=rois.dtype, device=rois.device)
            return count, [(None, sampling_ratio, sampling_ratio)], None
        _, _, roi_w, roi_h = _roi_geometry(rois, spatial_scale, aligned)
        # A negative grid (aligned, x2 < x1) samples nothing, like the kernel's empty loops.
        grid_h = torch.ceil(roi_h / pooled[0]).to(torch.int64).clamp(min=0)
        grid_w = torch.ceil(roi_w / pooled[1]).to(torch.int64).clamp(min=0)
        count = (grid_h * grid_w).clamp(min=1).to(rois.dtype)
        base = int(grid_w.max()) + 1
        key = grid_h * base + grid_w  # (K,) one value per distinct grid
        order = torch.sort(key, stable=True)[1]
        values, sizes = torch.unique_consecutive(key[order], return_counts=True)
    if values.numel() == 1:
        return count, [(None, int(values) // base, int(values) % base)], None
    groups, first = [], 0
    for value, size in zip(values.tolist(), sizes.tolist()):
        groups.append((order[first : first + size], value // base, value % base))
        first += size
    return count, groups, order


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
    if torch.onnx.is_in_onnx_export():
        return _roi_align_onnx(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


def _roi_align(
    input: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """:func:`roi_align` computed in PyTorch."""
    if input.dtype in (torch.float16, torch.bfloat16):
        # Coordinates and weights in bf16 would be off by pixels; compute in float32 as
        # torchvision's autocast does, and hand back the input's dtype.
        return _roi_align(input.float(), rois, output_size, spatial_scale, sampling_ratio, aligned).to(input.dtype)
    pooled, rois, table = roi_inputs(input, rois, output_size)
    if rois.shape[0] == 0:
        return input.new_zeros((0, input.shape[1]) + pooled)
    h, w = input.shape[-2:]

    count, groups, order = _grid_groups(rois, pooled, spatial_scale, sampling_ratio, aligned)
    parts = []
    for idx, gh, gw in groups:
        group = rois if idx is None else rois[idx]
        step = max(_MAX_ENTRIES_PER_CHUNK // (max(gh * gw, 1) * 4 * pooled[0] * pooled[1]), 1)  # RoIs per chunk
        for s in range(0, group.shape[0], step):
            parts.append(_roi_align_group(table, group[s : s + step], (h, w), pooled, (gh, gw), spatial_scale, aligned))
    sums = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # (K, PH, PW, C), grouped order
    if order is not None:
        sums = sums[torch.argsort(order)]  # back to input order
    # Sum, then divide, as the kernel does; in place on the contiguous copy saves a pass.
    return sums.permute(0, 3, 1, 2).contiguous().div_(count[:, None, None, None])  # (K, C, PH, PW)


class _RoiAlignOp(torch.autograd.Function):
    """ONNX ``RoiAlign`` (average mode): one graph node on export; :func:`roi_align` in PyTorch.

    The ONNX op computes what torchvision's CPU kernel does (tests/test_onnx.py compares them
    through whole models); from opset 16 it takes the half-pixel shift
    (``coordinate_transformation_mode``), so aligned RoIAlign (Detectron2) exports as aligned.
    Before opset 16 it has only the non-aligned form: ``maskrcnn.weights.export`` refuses aligned
    models there rather than export a different computation.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        boxes: Tensor,
        batch_index: Tensor,
        pooled: tuple[int, int],  # type: ignore[override]
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
    ) -> Tensor:
        rois = torch.cat((batch_index[:, None].to(boxes.dtype), boxes), 1)
        return _roi_align(input, rois, pooled, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def symbolic(g, input, boxes, batch_index, pooled, spatial_scale, sampling_ratio, aligned):  # type: ignore[no-untyped-def]
        mode = (
            {"coordinate_transformation_mode_s": "half_pixel" if aligned else "output_half_pixel"}
            if g.opset >= 16
            else {}
        )
        return g.op(
            "RoiAlign",
            input,
            boxes,
            batch_index,
            mode_s="avg",
            output_height_i=pooled[0],
            output_width_i=pooled[1],
            sampling_ratio_i=max(sampling_ratio, 0),
            spatial_scale_f=spatial_scale,
            **mode,
        )


def _roi_align_onnx(
    input: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """:func:`roi_align` as the ONNX ``RoiAlign`` operator, for ``torch.onnx.export``."""
    if not isinstance(rois, Tensor):
        rois = rois_from_boxes(list(rois))
    rois = rois.to(input.dtype)
    return _RoiAlignOp.apply(
        input,
        rois[:, 1:],
        rois[:, 0].to(torch.int64),
        _pair(output_size),
        float(spatial_scale),
        int(sampling_ratio),
        bool(aligned),
    )


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
