"""Feature Pyramid Network (seed section 2.2.3): C2..C5 -> P2..P6, all with the same width.

Top-down pathway: each level's 1x1 lateral projection plus the nearest-neighbour upsampled
coarser level, then a 3x3 output conv. P6 is a stride-2 subsampling of P5, used only by the
RPN for the largest anchors (as in the FPN paper and torchvision).

Shape shorthand: B batch, F = out_channels; P2..P6 have strides 4, 8, 16, 32, 64.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """Args:
    in_channels: channels of C2..C5 (e.g. 256, 512, 1024, 2048 for ResNet-50).
    out_channels: F, the channels of every output level.
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256) -> None:
        super().__init__()
        # Names as in torchvision's 2019 checkpoints: inner = lateral 1x1, layer = output 3x3.
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.layer_blocks = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)
        self.out_channels = out_channels

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """[C2..C5] -> [P2, P3, P4, P5, P6], each (B, F, H_l, W_l)."""
        inner = self.inner_blocks[-1](feats[-1])
        outs = [self.layer_blocks[-1](inner)]
        for lateral, output, feat in zip(
            reversed(self.inner_blocks[:-1]), reversed(self.layer_blocks[:-1]), reversed(feats[:-1])
        ):
            lat = lateral(feat)
            top_down = F.interpolate(inner, size=lat.shape[-2:], mode="nearest")
            inner = lat + top_down
            outs.insert(0, output(inner))
        # P6: kernel 1, stride 2 max pool = plain subsampling of P5.
        outs.append(F.max_pool2d(outs[-1], 1, 2, 0))
        return outs
