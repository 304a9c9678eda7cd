"""The memory layout of the convolutions' inputs: channels-last where oneDNN is faster with it.

Measured on a 2-core AMD EPYC (Zen 4), torch 2.13, R50-FPN (docs/benchmarks.md):
- inference: channels-last convolutions ~25% faster than NCHW, on the AVX-512 and the AVX2 kernels;
- a training step (forward and backward, 2 images at 512 px) on the AVX2 kernels: the
  convolutions' backward took 3.41 s channels-last against torchvision's 2.30 s in NCHW, and the
  whole step at 800 px 1.28x torchvision's; on the AVX-512 kernels channels-last is the faster
  there too (0.83x torchvision's step).
So with autograd on, on a CPU whose kernels stop at AVX2, the tensors stay NCHW.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.cache
def _avx512_kernels() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")  # ATEN_CPU_CAPABILITY caps it


def conv_layout(x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) in the layout its convolutions run fastest in (see the module docstring)."""
    if x.device.type == "cpu" and torch.is_grad_enabled() and not _avx512_kernels():
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last)
