"""ResNet and ResNeXt bodies (seed section 2.2), returning the C2..C5 feature maps.

Layer names follow the ImageNet classifiers torchvision publishes (``conv1``, ``bn1``,
``layer1``..``layer4``, ``downsample.0/1``), so their weights load without renaming.

Shape shorthand: B batch, H x W input; C2..C5 have strides 4, 8, 16, 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layout import Conv2d


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters: y = x * scale + shift.

    Detection batches (1-2 images per GPU in the paper, 2 on a CPU here) are too small for
    BatchNorm statistics, so the ImageNet ones are kept. ``eps`` matters for parity:
    torchvision's 2019 COCO weights were trained with eps = 0.

    ``inplace`` writes the result into ``x`` when no autograd graph needs ``x`` (inference, frozen
    stages): the same two roundings, but no fresh map. A fresh 56 MB map at C2 costs page faults
    that made the out-of-place form 10x slower than the arithmetic (35 against 3 ms, Zen 4).
    A forward hook that keeps the preceding conv's output must keep a copy (as with in-place ReLU).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.inplace = inplace
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Checkpoints of a trainable BatchNorm carry a counter we have no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        scale, shift = scale[None, :, None, None], shift[None, :, None, None]
        if (
            self.inplace
            and not (torch.is_grad_enabled() and x.requires_grad)
            and torch.result_type(x, scale) == x.dtype  # a bf16 map under autocast is promoted instead
            and not torch.jit.is_tracing()
        ):
            return x.mul_(scale).add_(shift)  # not addcmul: its fused multiply-add rounds once
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", inplace=True" if self.inplace else "")


def _add_residual(out: Tensor, identity: Tensor) -> Tensor:
    """``out + identity``, into ``out`` (this block's own map, as torchvision sums) unless the sum
    would promote: under autocast a bf16 ``out`` plus a float32 shortcut is float32."""
    if torch.result_type(out, identity) == out.dtype:
        return out.add_(identity)
    return out + identity


def _norm(frozen: bool, eps: float):  # type: ignore[no-untyped-def]
    # Every norm of the body follows a convolution whose output nothing else reads.
    return (lambda c: FrozenBatchNorm2d(c, eps, inplace=True)) if frozen else (lambda c: nn.BatchNorm2d(c, eps=eps))


def _shortcut(in_ch: int, out_ch: int, stride: int, norm) -> nn.Sequential | None:  # type: ignore[no-untyped-def]
    """1x1 projection of the residual when the block changes shape; identity (None) otherwise."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(Conv2d(in_ch, out_ch, 1, stride, bias=False), norm(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, norm, groups: int = 1, base_width: int = 64) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(_add_residual(out, identity))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand.

    The stride sits in the 3x3 as in torchvision v1.5, or in the first 1x1 with
    ``stride_in_1x1`` as in the original MSRA ResNets whose weights Detectron2's R50/R101
    models start from (the same tensors, a different network).
    """

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int,
        norm,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
    ) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        out_ch = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_ch, width, 1, stride_1x1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = Conv2d(width, width, 3, stride_3x3, 1, groups=groups, bias=False)
        self.bn2 = norm(width)
        self.conv3 = Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = norm(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(_add_residual(out, identity))


@dataclass(frozen=True)
class ResNetSpec:
    block: type
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64


RESNETS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": ResNetSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet101": ResNetSpec(Bottleneck, (3, 4, 23, 3)),
    "resnext50_32x4d": ResNetSpec(Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": ResNetSpec(Bottleneck, (3, 4, 23, 3), groups=32, width_per_group=8),
}


class ResNetBody(nn.Module):
    """ResNet/ResNeXt without its classifier: image -> [C2, C3, C4, C5].

    Args:
        name: a key of ``RESNETS``.
        frozen_bn: use ``FrozenBatchNorm2d`` instead of trainable BatchNorm.
        bn_eps: BatchNorm epsilon.
        trainable_layers: how many stages, counted from the top (layer4, layer3, ...,
            layer1, conv1), keep ``requires_grad``; the rest are frozen. 5 trains all.
        stride_in_1x1: bottlenecks downsample in their first 1x1 conv (MSRA ResNets).
    """

    def __init__(
        self,
        name: str = "resnet50",
        frozen_bn: bool = True,
        bn_eps: float = 1e-5,
        trainable_layers: int = 3,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(RESNETS)}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
        spec = RESNETS[name]
        if stride_in_1x1 and spec.block is not Bottleneck:
            raise ValueError(f"stride_in_1x1 applies to bottleneck ResNets only, not {name}")
        extra = {"stride_in_1x1": True} if stride_in_1x1 else {}
        norm = _norm(frozen_bn, bn_eps)
        self.conv1 = Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        self.out_channels: list[int] = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), spec.layers)):
            stage = []
            for b in range(blocks):
                stride = 2 if (b == 0 and i > 0) else 1
                stage.append(spec.block(in_ch, planes, stride, norm, spec.groups, spec.width_per_group, **extra))
                in_ch = planes * spec.block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            self.out_channels.append(in_ch)
        self.freeze(trainable_layers)

    def freeze(self, trainable_layers: int) -> None:
        """Freeze all but the top ``trainable_layers`` stages (torchvision's convention)."""
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            trainable.append("bn1")
        for name, p in self.named_parameters():
            p.requires_grad_(any(name.startswith(t) for t in trainable))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        c2 = self.layer1(x)  # (B, 256, H/4, W/4) for bottleneck nets
        c3 = self.layer2(c2)  # (B, 512, H/8, W/8)
        c4 = self.layer3(c3)  # (B, 1024, H/16, W/16)
        c5 = self.layer4(c4)  # (B, 2048, H/32, W/32)
        return [c2, c3, c4, c5]
