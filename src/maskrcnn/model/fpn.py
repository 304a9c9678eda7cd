"""Feature Pyramid Network (seed section 2.2.3): C2..C5 -> P2..P6, all with the same width.

Top-down pathway: each level's 1x1 lateral projection plus the nearest-neighbour upsampled
coarser level, then a 3x3 output conv. P6 is a stride-2 subsampling of P5, used only by the
RPN for the largest anchors (as in the FPN paper and torchvision).

Shape shorthand: B batch, F = out_channels; P2..P6 have strides 4, 8, 16, 32, 64.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .layout import Conv2d


class FPN(nn.Module):
    """Args:
    in_channels: channels of C2..C5 (e.g. 256, 512, 1024, 2048 for ResNet-50).
    out_channels: F, the channels of every output level.
    batchnorm: a BatchNorm after every conv, whose bias it replaces (torchvision v2); the
        norms are ``inner_norms`` / ``layer_norms`` beside the convs they follow.
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256, batchnorm: bool = False) -> None:
        super().__init__()
        # Names as in torchvision's 2019 checkpoints: inner = lateral 1x1, layer = output 3x3.
        bias = not batchnorm
        self.inner_blocks = nn.ModuleList(Conv2d(c, out_channels, 1, bias=bias) for c in in_channels)
        self.layer_blocks = nn.ModuleList(
            Conv2d(out_channels, out_channels, 3, padding=1, bias=bias, winograd=True) for _ in in_channels
        )
        self.inner_norms = self.layer_norms = None
        if batchnorm:
            self.inner_norms = nn.ModuleList(nn.BatchNorm2d(out_channels) for _ in in_channels)
            self.layer_norms = nn.ModuleList(nn.BatchNorm2d(out_channels) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.out_channels = out_channels

    def _lateral(self, level: int, x: Tensor) -> Tensor:
        x = self.inner_blocks[level](x)
        return x if self.inner_norms is None else self.inner_norms[level](x)

    def _output(self, level: int, x: Tensor) -> Tensor:
        x = self.layer_blocks[level](x)
        return x if self.layer_norms is None else self.layer_norms[level](x)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """[C2..C5] -> [P2, P3, P4, P5, P6], each (B, F, H_l, W_l)."""
        top = len(feats) - 1
        inner = self._lateral(top, feats[top])
        outs = [self._output(top, inner)]
        for level in range(top - 1, -1, -1):
            lat = self._lateral(level, feats[level])
            top_down = F.interpolate(inner, size=lat.shape[-2:], mode="nearest")
            inner = lat + top_down
            outs.insert(0, self._output(level, inner))
        # P6: kernel 1, stride 2 max pool = plain subsampling of P5.
        outs.append(F.max_pool2d(outs[-1], 1, 2, 0))
        return outs
