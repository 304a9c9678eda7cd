"""Mask branch of the frontend (seed section 3.5.2): a small FCN on 14x14 RoI features that
predicts one 28x28 sigmoid mask per class, decoupled from classification.

Shape shorthand: R RoIs, F feature channels, K+1 class slots (0 = background), M = 28.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import Conv2d, conv_layout


class MaskHead(nn.Module):
    """Stack of 3x3 conv (+ optional BatchNorm) + ReLU layers (four of 256 channels in the paper).

    Attribute names ``mask_fcn1..`` follow torchvision's 2019 checkpoints; with ``batchnorm``
    (torchvision v2) each conv loses its bias and is followed by ``mask_norm1..``.
    """

    def __init__(
        self,
        in_channels: int,
        layers: tuple[int, ...] = (256, 256, 256, 256),
        dilation: int = 1,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = len(layers)
        self.batchnorm = batchnorm
        for i, out in enumerate(layers, 1):
            conv = Conv2d(in_channels, out, 3, padding=dilation, dilation=dilation, bias=not batchnorm, winograd=True)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            self.add_module(f"mask_fcn{i}", conv)
            if batchnorm:
                self.add_module(f"mask_norm{i}", nn.BatchNorm2d(out))
            in_channels = out
        self.out_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        """(R, F, 14, 14) -> (R, F', 14, 14)."""
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"mask_fcn{i}")(x)
            if self.batchnorm:
                x = getattr(self, f"mask_norm{i}")(x)
            x = F.relu_(x)  # in place: the conv's output is not needed again
        return x


class MaskPredictor(nn.Module):
    """2x transposed conv + ReLU, then a 1x1 conv with one mask logit map per class slot."""

    def __init__(self, in_channels: int, hidden: int, num_slots: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, hidden, 2, 2, 0)
        self.mask_fcn_logits = Conv2d(hidden, num_slots, 1)
        for layer in (self.conv5_mask, self.mask_fcn_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(R, F', 14, 14) -> (R, K+1, 28, 28) logits; with ``labels`` (R,) only each RoI's own
        class, (R, 28, 28): the 1x1 conv for one output channel per RoI, 1/(K+1) of its work
        (one vector product per RoI instead of 91 for COCO)."""
        x = F.relu_(self.conv5_mask(conv_layout(x)))  # (R, F', 28, 28); channels-last: 2x faster
        if labels is None:
            return self.mask_fcn_logits(x)
        r, f, m, _ = x.shape
        weight = self.mask_fcn_logits.weight[labels].view(r, f, 1)  # (R, F', 1)
        pixels = x.permute(0, 2, 3, 1).reshape(r, m * m, f)  # (R, M*M, F'), a view when channels-last
        logits = torch.baddbmm(self.mask_fcn_logits.bias[labels].view(r, 1, 1), pixels, weight)
        return logits.view(r, m, m)


def select_class_masks(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Per-class sigmoid masks: pick each RoI's own class channel.

    Args:
        mask_logits: (R, K+1, M, M) logits.
        labels: (R,) int64 class of each RoI.
    Returns:
        (R, M, M) logits of the RoI's class.
    """
    return mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
