"""The memory layout the convolutions run in: channels-last, where oneDNN is faster with it.

Measured on a 2-core AMD EPYC (Zen 4), torch 2.13 (docs/benchmarks.md):
- inference: channels-last convolutions ~25% faster than NCHW, on the AVX-512 and the AVX2 kernels;
- training on the AVX-512 kernels: channels-last is as fast or faster for every part;
- training on the AVX2 kernels: channels-last is faster for the forward pass and for the input
  gradient, but the weight gradient of a 3x3 convolution is 1.6x (50x50 maps) to 5x (200x200)
  slower than in NCHW (2566 ms against 636 ms for 256 channels at 200x200, 2 images). In a whole
  R50-FPN step at 800 px that made channels-last 1.24x torchvision's time and NCHW 0.89x.
So every convolution runs channels-last, and on AVX2-only kernels ``conv2d`` computes the weight
gradient of a spatial convolution over large maps in NCHW (two copies, far cheaper); the step
then takes about 0.8x torchvision's. Below 32x32 output positions (the heads' 14x14 RoIs) the
two layouts' weight gradients cost the same, and the copies would not pay.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

_LARGE_MAP = 32 * 32  # output positions from which the NCHW weight gradient pays for its copies


@functools.cache
def _avx512_kernels() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")  # ATEN_CPU_CAPABILITY caps it


def conv_layout(x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) channels-last, the layout the convolutions run fastest in."""
    return x.contiguous(memory_format=torch.channels_last)


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    """``F.conv2d``, with the weight gradient in NCHW where that is the faster (module docstring)."""
    if (
        x.device.type == "cpu"
        and weight.requires_grad
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")  # the function saves its inputs as given
        and weight.shape[-2:].numel() > 1
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.shape[-2] * x.shape[-1] // (stride[0] * stride[1]) >= _LARGE_MAP
        and not _avx512_kernels()
    ):
        return _NchwWeightGradConv.apply(x, weight, bias, stride, padding, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class _NchwWeightGradConv(torch.autograd.Function):
    """A convolution whose backward takes the input gradient channels-last and the weight
    gradient from NCHW copies of the input and the output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x, weight)
        ctx.args = (stride, padding, dilation, groups, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.args
        want_x, want_w, want_b = ctx.needs_input_grad[:3]

        def backward(g: Tensor, inp: Tensor, w: Tensor, mask: list[bool]) -> tuple[Tensor | None, ...]:
            sizes = [w.shape[0]] if has_bias else None
            return torch.ops.aten.convolution_backward(
                g, inp, w, sizes, list(stride), list(padding), list(dilation), False, [0, 0], groups, mask
            )

        grad_x = backward(grad, x, weight, [True, False, False])[0] if want_x else None
        _, grad_w, grad_b = backward(
            grad.contiguous(), x.contiguous(), weight.contiguous(), [False, want_w, has_bias and want_b]
        )
        return grad_x, grad_w, grad_b, None, None, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) through ``conv2d``."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
