"""Box regression parametrisation (seed paper section 3.3.4).

A ground-truth box ``g`` is encoded relative to a reference box ``r`` (an anchor or a
proposal) as ``(dx, dy, dw, dh)``::

    dx = wx * (g_cx - r_cx) / r_w      dw = ww * log(g_w / r_w)
    dy = wy * (g_cy - r_cy) / r_h      dh = wh * log(g_h / r_h)

with widths ``x2 - x1`` (no ``+ 1``) and centres ``x1 + 0.5 * w``. The evaluation order of
every expression follows torchvision's ``BoxCoder`` so that decoded boxes agree bit for bit.

Shape shorthand: N boxes, K classes (sets of 4 codes per box).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BoxCoder"]


class BoxCoder:
    """Encode boxes as regression targets and decode predicted codes into boxes.

    Args:
        weights: ``(wx, wy, ww, wh)`` scales of the four codes: ``(1, 1, 1, 1)`` for the RPN,
            ``(10, 10, 5, 5)`` for the box head (torchvision/Detectron defaults).
        clip: upper bound applied to ``dw``/``dh`` before ``exp`` when decoding, so a wild
            prediction cannot make a box more than ``1000 / 16`` times its reference.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        clip: float = math.log(1000.0 / 16),
    ) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.clip = float(clip)

    def encode(self, gt_boxes: Tensor, ref_boxes: Tensor) -> Tensor:
        """Regression targets that turn each reference box into its ground-truth box.

        Args:
            gt_boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)`` targets, float.
            ref_boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)`` anchors or proposals, same frame;
                row ``i`` pairs with ``gt_boxes[i]``. Must have positive width and height.

        Returns:
            ``Tensor[N, 4]`` codes ``(dx, dy, dw, dh)`` in ``gt_boxes``' dtype.
        """
        # A 0-dim tensor per weight, as torchvision does, so the arithmetic is in the boxes' dtype.
        weights = torch.as_tensor(self.weights, dtype=gt_boxes.dtype, device=gt_boxes.device)
        wx, wy, ww, wh = weights[0], weights[1], weights[2], weights[3]

        ex_widths = ref_boxes[:, 2] - ref_boxes[:, 0]
        ex_heights = ref_boxes[:, 3] - ref_boxes[:, 1]
        ex_ctr_x = ref_boxes[:, 0] + 0.5 * ex_widths
        ex_ctr_y = ref_boxes[:, 1] + 0.5 * ex_heights

        gt_widths = gt_boxes[:, 2] - gt_boxes[:, 0]
        gt_heights = gt_boxes[:, 3] - gt_boxes[:, 1]
        gt_ctr_x = gt_boxes[:, 0] + 0.5 * gt_widths
        gt_ctr_y = gt_boxes[:, 1] + 0.5 * gt_heights

        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * torch.log(gt_widths / ex_widths)
        dh = wh * torch.log(gt_heights / ex_heights)
        return torch.stack((dx, dy, dw, dh), dim=1)  # (N, 4)

    def decode(self, codes: Tensor, ref_boxes: Tensor) -> Tensor:
        """Apply regression codes to reference boxes.

        Args:
            codes: ``Tensor[N, K * 4]`` ``(dx, dy, dw, dh)`` per box and class (K = 1 for the RPN).
            ref_boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)`` the codes are relative to; cast to
                ``codes``' dtype.

        Returns:
            ``Tensor[N, K, 4]`` ``(x1, y1, x2, y2)`` boxes in the frame of ``ref_boxes``, not
            clipped to any image. ``N = 0`` gives ``(0, K, 4)``.
        """
        ref_boxes = ref_boxes.to(codes.dtype)
        widths = ref_boxes[:, 2] - ref_boxes[:, 0]
        heights = ref_boxes[:, 3] - ref_boxes[:, 1]
        ctr_x = ref_boxes[:, 0] + 0.5 * widths
        ctr_y = ref_boxes[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = codes[:, 0::4] / wx  # (N, K)
        dy = codes[:, 1::4] / wy
        dw = codes[:, 2::4] / ww
        dh = codes[:, 3::4] / wh
        dw = torch.clamp(dw, max=self.clip)
        dh = torch.clamp(dh, max=self.clip)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]

        # Half extents as a tensor product, exactly as torchvision computes them.
        half = torch.tensor(0.5, dtype=codes.dtype, device=codes.device)
        half_w = half * pred_w
        half_h = half * pred_h
        return torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2
        )  # (N, K, 4)
