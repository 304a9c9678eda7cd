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

Inference in the heads: the 3x3 convolutions of the FPN outputs, the RPN and the mask head
(``Conv2d(..., winograd=True)``) run NNPACK's Winograd convolution, which ships inside torch's
CPU build (AVX2 and up). For 256 channels it is 1.8x to 2.8x as fast as oneDNN's direct
convolution: 128 ms against 306 ms at 200x272 (the P2 level of an 800 px image; 116 against
325 ms on the AVX2 kernels), 54 against 96 ms for 100 RoIs of 14x14, on a 2-core Zen 4. Its
rounding is larger, about 1e-5 of a layer's output scale against 3e-7: harmless in the heads,
one to four convolutions deep, but compounded through the 50-layer ResNet body it moved mask
logits 0.015 from torchvision's (past the parity fixture's 1e-2), so the body stays on oneDNN.
NNPACK takes NCHW and returns it; ``conv_layout(x, winograd=True)`` gives the heads that layout.

NNPACK makes its thread pool once, at its first convolution, with ``torch.get_num_threads()``
threads: a later ``torch.set_num_threads(1)`` would still get 2 threads, and a process forked
afterwards inherits the pool without its threads (measured: one thread, half the speed). So a
convolution runs NNPACK only in the process and at the thread count of that first call, and
oneDNN otherwise. Forward-mode AD, autocast, other dtypes and a graph being traced or compiled
always run oneDNN.

In a training step on the AVX2 kernels the heads' 3x3 convolutions run their forward pass and
their input gradient on NNPACK as well (NCHW copies in and out: forward 332 against 448 ms for
two 200x200 maps, 96 against 137 ms for 128 RoIs; input gradient 294 against 458 ms); the
weight gradients are oneDNN's. The R50-FPN step at 800 px went from 0.78-0.81 to 0.70 of
torchvision's. On AVX-512 it gained little (0.74 to 0.72, and nothing measurable at 384 px)
for 11% more memory and NNPACK's rounding in the gradients (worst parameter 2.4e-3 from float64
against 6.8e-4), so there the step stays oneDNN's. A second derivative (``create_graph``) takes oneDNN's backward.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

_LARGE_MAP = 32 * 32  # output positions from which the NCHW weight gradient pays for its copies
_SMALL_MAP = 16 * 16  # positions up to which NNPACK's batch algorithm is the faster for RoI stacks


@functools.cache
def _avx512_kernels() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")  # ATEN_CPU_CAPABILITY caps it


@functools.cache
def _nnpack() -> bool:
    return torch.backends.nnpack.is_available()  # initialises NNPACK; False on CPUs without AVX2


_nnpack_pool: tuple[int, int] | None = None  # (process id, threads) NNPACK's thread pool was made for


def _nnpack_pool_fits() -> bool:
    """True in the process and at the thread count NNPACK made its pool for (module docstring)."""
    global _nnpack_pool
    here = (os.getpid(), torch.get_num_threads())
    if _nnpack_pool is None:
        _nnpack_pool = here  # the convolution about to run makes the pool
    return _nnpack_pool == here


def _cpu_float32(x: Tensor, weight: Tensor) -> bool:
    """A float32 convolution on the CPU, without autocast or a graph being traced."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0  # NNPACK fails on an empty batch
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()  # ONNX export: the graph takes the standard Conv
        and not torch.compiler.is_compiling()
        and forward_ad.unpack_dual(x).tangent is None  # forward-mode AD (torch.func.jvp): neither
        and forward_ad.unpack_dual(weight).tangent is None  # fast path has a forward derivative
    )


def _needs_grad(x: Tensor, weight: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def _cpu_inference(x: Tensor, weight: Tensor) -> bool:
    """A float32 convolution on the CPU, without autograd, autocast or a graph being traced."""
    return _cpu_float32(x, weight) and not _needs_grad(x, weight)


def winograd_applies(x: Tensor, weight: Tensor) -> bool:
    """True when a 3x3, stride 1, undilated, ungrouped convolution of ``x`` runs NNPACK at inference."""
    return _cpu_inference(x, weight) and _nnpack() and _nnpack_pool_fits()


def _winograd_trains(x: Tensor, weight: Tensor) -> bool:
    """True when such a convolution in a training step runs its forward pass on NNPACK."""
    return (
        not _avx512_kernels()  # measured to pay on the AVX2 kernels only (module docstring)
        and _cpu_float32(x, weight)
        and _needs_grad(x, weight)
        and not torch._C._are_functorch_transforms_active()  # torch.func cannot see into _TrainConv
        and _nnpack()
        and _nnpack_pool_fits()
    )


def conv_layout(x: Tensor, winograd: bool = False) -> Tensor:
    """``x`` (N, C, H, W) in the layout its next convolutions run fastest in: channels-last for
    oneDNN, NCHW where ``winograd`` convolutions will run NNPACK."""
    if winograd and winograd_applies(x, x):  # x stands in for the weight: the same dtype checks
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last)


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    winograd: bool = False,
) -> Tensor:
    """``F.conv2d``; at inference a 3x3 ``winograd`` convolution runs NNPACK's Winograd algorithm
    and a 1x1 one on an NCHW map a matrix product; in training the weight gradient is taken in
    NCHW where that is faster (module docstring)."""
    if (
        winograd
        and weight.shape[-2:] == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and groups == 1
    ):
        if winograd_applies(x, weight):
            return _winograd(x.contiguous(), weight.contiguous(), bias, list(padding))
        if _winograd_trains(x, weight) and max(padding) <= 2:  # the input gradient's padding is 2 - p
            nchw_grad = x.shape[-2] * x.shape[-1] >= _LARGE_MAP
            return _TrainConv.apply(x, weight, bias, stride, padding, dilation, groups, True, nchw_grad)
    if (
        weight.shape[-2:] == (1, 1)
        and tuple(stride) == (1, 1)
        and tuple(padding) == (0, 0)
        and groups == 1
        and x.is_contiguous()
        and not x.is_contiguous(memory_format=torch.channels_last)
        and _cpu_inference(x, weight)
    ):
        return _pointwise_nchw(x, weight, bias)
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
        return _TrainConv.apply(x, weight, bias, stride, padding, dilation, groups, False, True)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _winograd(x: Tensor, weight: Tensor, bias: Tensor | None, padding: list[int]) -> Tensor:
    """NNPACK's convolution, (N, C, H, W) -> (N, O, H', W') NCHW, image by image unless ``x`` is
    a stack of many small RoIs. For more than one image NNPACK takes its batch algorithm,
    which is slower for every map but RoI stacks: 996 against 278 ms image by image for two
    200x272 maps, 18 against 7 ms for two of 13x17; 67 against 330 ms for 100 RoIs of 14x14,
    18 against 26 ms for 8 of them."""
    n, _, h, w = x.shape
    if n == 1 or (n > 4 and h * w <= _SMALL_MAP):
        return torch._nnpack_spatial_convolution(x, weight, bias, padding)
    return torch.cat([torch._nnpack_spatial_convolution(x[i : i + 1], weight, bias, padding) for i in range(n)])


def _pointwise_nchw(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution of an NCHW input as one matrix product per image, (O, C) @ (C, H*W):
    3x as fast as oneDNN's, which first reorders the whole map (the RPN's logits on an NNPACK
    output: 9 against 29 ms at 200x272)."""
    n, c, h, w = x.shape
    o = weight.shape[0]
    out = x.new_empty((n, o, h * w))
    for i in range(n):
        if bias is None:
            torch.mm(weight.view(o, c), x[i].view(c, h * w), out=out[i])
        else:
            torch.addmm(bias[:, None], weight.view(o, c), x[i].view(c, h * w), out=out[i])
    return out.view(n, o, h, w)


class _TrainConv(torch.autograd.Function):
    """A convolution in a training step. ``winograd`` (a head's 3x3): the forward pass and the
    input gradient on NNPACK, each returned in the input's layout; otherwise the input gradient
    is oneDNN's, channels-last. ``nchw_weight_grad`` (AVX2): the weight gradient from NCHW
    copies of the input and the output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, winograd, nchw_weight_grad):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x, weight)
        ctx.args = (stride, padding, dilation, groups, bias is not None, nchw_weight_grad, winograd)
        if not winograd:
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        y = _winograd(x.contiguous(), weight.contiguous(), bias, list(padding))  # NCHW
        return y.contiguous(memory_format=torch.channels_last) if _channels_last(x) else y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias, nchw_weight_grad, winograd = ctx.args
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        want_b = has_bias and want_b
        nchw_weight_grad = nchw_weight_grad and want_w
        # The input gradient of a 3x3, stride 1 convolution is the convolution of the output
        # gradient with the flipped, transposed kernel: NNPACK again, from the NCHW copy that
        # the AVX2 weight gradient shares (294 against 458 ms for two 200x200 maps, AVX2).
        nnpack_x = winograd and want_x and _nnpack_pool_fits()

        def backward(g: Tensor, inp: Tensor, w: Tensor, mask: list[bool]) -> tuple[Tensor | None, ...]:
            sizes = [w.shape[0]] if has_bias else None
            return torch.ops.aten.convolution_backward(
                g, inp, w, sizes, list(stride), list(padding), list(dilation), False, [0, 0], groups, mask
            )

        # create_graph (grad mode on here) takes oneDNN's backward, which is differentiable.
        if torch.is_grad_enabled() or not (nnpack_x or nchw_weight_grad):
            grad_x, grad_w, grad_b = backward(grad, x, weight, [want_x, want_w, want_b])
            return grad_x, grad_w, grad_b, None, None, None, None, None, None
        grad_nchw = grad.contiguous()
        grad_x = None
        if nnpack_x:
            flipped = weight.flip(2, 3).transpose(0, 1).contiguous()
            grad_x = _winograd(grad_nchw, flipped, None, [2 - p for p in padding])
            grad_x = grad_x.contiguous(memory_format=torch.channels_last) if _channels_last(x) else grad_x
        elif want_x:
            grad_x = backward(grad, x, weight, [True, False, False])[0]
        grad_w = grad_b = None
        if want_w or want_b:
            w_in = (grad_nchw, x.contiguous(), weight.contiguous()) if nchw_weight_grad else (grad, x, weight)
            _, grad_w, grad_b = backward(*w_in, [False, want_w, want_b])
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) through ``conv2d``; ``winograd``: a
    head's 3x3 convolution, which may run NNPACK at inference (module docstring)."""

    def __init__(self, *args: Any, winograd: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.winograd = winograd

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups, self.winograd)
