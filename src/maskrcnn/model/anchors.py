"""Anchor boxes (seed section 3.3.3, figure 13): a fixed set of shapes at every feature-map cell.

Each FPN level gets one anchor size and several aspect ratios. Anchor coordinates are in the
padded input frame; the same anchors serve every image of a batch.

Where the cells sit differs between the two reference libraries: torchvision steps by
``padded size // grid size`` on each level, Detectron2 by the level's nominal stride (4 .. 64).
They agree wherever the padded side divides evenly, but not on P6 when padded side / 32 is odd
(an 800-px side: 800 // 13 = 61 against 64), which moves every large proposal of such an image.

Shape shorthand: A anchors per cell, H_l x W_l cells on level l.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def cell_anchors(size: float, aspect_ratios: tuple[float, ...], round_corners: bool = True) -> Tensor:
    """Anchors centred on (0, 0) for one size and several ratios h/w, rounded to integers
    unless ``round_corners`` is False.

    Returns (A, 4) float32 x1 y1 x2 y2; area ~ size^2, h / w = ratio.
    """
    if not round_corners:
        # Detectron2's exact anchors, computed as it does in double precision:
        # w = sqrt(size^2 / ratio), h = ratio * w (a 0.5 ratio at size 32 is 45.25 x 22.63).
        rows = []
        for r in aspect_ratios:
            w = math.sqrt(size * size / r)
            h = r * w
            rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(rows, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = w_ratios * size
    hs = h_ratios * size
    # Rounding keeps the torchvision/Detectron anchor set (and so its trained weights) exact.
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Args:
    sizes: anchor size (sqrt of area, input pixels) of each level.
    aspect_ratios: h / w ratios used on every level.
    round_cells: round the cell anchors' corners to integers (torchvision) or not (Detectron2).
    strides: the step between cells of each level in input pixels (Detectron2), or () to derive
        it per image as padded size // grid size (torchvision).
    """

    def __init__(
        self,
        sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        round_cells: bool = True,
        strides: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if strides and len(strides) != len(sizes):
            raise ValueError(f"anchors: {len(strides)} strides for {len(sizes)} levels")
        self.cells = [cell_anchors(s, aspect_ratios, round_cells) for s in sizes]
        self.strides = tuple(strides)
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def num_anchors_per_cell(self) -> int:
        return self.cells[0].shape[0]

    def forward(
        self, padded_hw: tuple[int, int], feature_hws: list[tuple[int, int]], device: torch.device
    ) -> list[Tensor]:
        """Anchors of every level for a padded input of size ``padded_hw``.

        Returns: one (H_l * W_l * A, 4) float32 tensor per level, ordered by row, column, then
        anchor shape, which is the order the RPN head's outputs are flattened in.
        """
        key = (tuple(padded_hw), tuple(map(tuple, feature_hws)), str(device))
        if key not in self._cache:
            self._cache[key] = [
                self._grid(self._stride(padded_hw, hw, level), hw, cell.to(device))
                for level, (hw, cell) in enumerate(zip(feature_hws, self.cells))
            ]
            if len(self._cache) > 32:  # multi-scale training sees many sizes; keep memory bounded
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]

    def _stride(self, padded_hw: tuple[int, int], hw: tuple[int, int], level: int) -> tuple[int, int]:
        """(stride_y, stride_x) of one level's cells in input pixels."""
        if self.strides:
            return self.strides[level], self.strides[level]
        return padded_hw[0] // hw[0], padded_hw[1] // hw[1]

    @staticmethod
    def _grid(stride: tuple[int, int], hw: tuple[int, int], cell: Tensor) -> Tensor:
        stride_y, stride_x = stride
        ys = torch.arange(hw[0], device=cell.device, dtype=torch.float32) * stride_y
        xs = torch.arange(hw[1], device=cell.device, dtype=torch.float32) * stride_x
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
        return (shifts + cell[None]).reshape(-1, 4)  # (H*W*A, 4)
