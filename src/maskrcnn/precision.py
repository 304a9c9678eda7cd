"""Numeric precision chosen by the hardware: float32, bf16 or fp16 autocast.

One rule for training (``solver.amp``) and inference (``predict(precision=...)``):

* ``auto``: bf16 where the hardware computes it natively and it pays (a CUDA GPU with bf16; a
  CPU with AVX512-BF16 or AMX on which a short probe finds bf16 convolutions faster), fp16 on
  older CUDA GPUs (training adds loss scaling), float32 otherwise.
* ``fp32`` (or ``""``): no autocast.
* ``bf16`` / ``fp16``: as asked. bf16 on a CPU without native support works but is emulated:
  measured on a 2-core AMD Zen 3 (AVX2 only), a training step was 19x slower than float32, so
  that choice warns once.

Why not bf16 everywhere: CPUs without AVX512-BF16 (most laptops, AMD before Zen 4, Intel
before Cooper Lake) emulate it. And native is not always faster: a training step of R50-FPN
(``benchmarks/bench_train_step.py``) took 2.50 s in bf16 against 4.86 s in float32 on an AMD
Zen 4, but 4.75 s against 3.12 s on an Intel Xeon with AVX512-BF16 and no AMX (oneDNN's bf16
kernels plus the reorders around them), so on the CPU ``auto`` measures before it picks. The probe honours ``ATEN_CPU_CAPABILITY`` and
``ONEDNN_MAX_CPU_ISA``, which restrict PyTorch's kernels (``avx2`` / ``AVX2`` run an AVX-512
machine as an AVX2 one), so what it reports is what the kernels will use.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# oneDNN ISA names at or above the first one with bf16 instructions (``ONEDNN_MAX_CPU_ISA``).
_ONEDNN_BF16_ISAS = (
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
    "ALL",
    "DEFAULT",
)
_warned: set[str] = set()


def _cpu_flag(name: str) -> bool:
    """A ``torch.cpu._is_*_supported`` probe, False where this torch lacks it."""
    probe = getattr(torch.cpu, f"_is_{name}_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # a probe that cannot run means "no"
        return False


def cpu_has_native_bf16() -> bool:
    """True when PyTorch's CPU kernels will compute bf16 in hardware (AVX512-BF16 or AMX)."""
    if not (_cpu_flag("avx512_bf16") or _cpu_flag("amx_tile")):
        return False
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):  # ATEN_CPU_CAPABILITY
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return not isa or isa in _ONEDNN_BF16_ISAS


# The probe: a 3x3 and a 1x1 convolution, forward and backward, as a detector's backbone and
# heads spend most of their time; bf16 must beat float32 by this factor to be picked.
PROBE_SHAPE = (2, 64, 96, 96)
PROBE_MARGIN = 1.1


def _probe_seconds(dtype: torch.dtype | None, reps: int = 3) -> float:
    """Median time of the probe's forward + backward in float32 (None) or under autocast."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_SHAPE, generator=g).contiguous(memory_format=torch.channels_last)
    convs = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 128, 1))
    convs = convs.to(memory_format=torch.channels_last)
    times = []
    for _ in range(reps + 1):  # the first run pays for kernel selection
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = convs(x)
        out.float().sum().backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """How many times faster the probe runs in bf16 than in float32 on this CPU (measured once
    per process, about half a second)."""
    with torch.inference_mode(False), torch.enable_grad():  # also when called under no_grad
        return _probe_seconds(None) / _probe_seconds(torch.bfloat16)


def cpu_bf16_pays() -> bool:
    """Native bf16 that is also faster than float32 here (``cpu_bf16_speedup``); logged once."""
    if not cpu_has_native_bf16():
        return False
    speedup = cpu_bf16_speedup()
    pays = speedup >= PROBE_MARGIN
    if "probe" not in _warned:
        _warned.add("probe")
        log.info(
            "precision auto: this CPU computes bf16 natively, and a probe ran %.2fx %s in bf16: %s",
            speedup if speedup >= 1 else 1 / speedup,
            "faster" if speedup >= 1 else "slower",
            "bf16" if pays else "float32",
        )
    return pays


def cuda_has_bf16(device: torch.device) -> bool:
    """Ampere (compute capability 8.0) and later compute bf16 natively."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve(precision: str, device: torch.device | str) -> str:
    """The precision to run: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Args:
        precision: one of ``PRECISIONS``, or ``""`` (same as ``"fp32"``).
        device: where the model runs. fp16 is refused on a CPU, for training (no loss
            scaling there) and inference (PyTorch's CPU fp16 autocast is slow and partial).
    Raises:
        ValueError: an unknown name, or fp16 on a CPU.
    """
    device = torch.device(device)
    name = precision or "fp32"
    if name not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_bf16(device) else "fp16"
        return "bf16" if device.type == "cpu" and cpu_bf16_pays() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError(f"fp16 needs a CUDA device (this run is on {device.type}); use bf16 or fp32")
    if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16() and "bf16-cpu" not in _warned:
        _warned.add("bf16-cpu")
        log.warning(
            "bf16 on a CPU without AVX512-BF16 or AMX is emulated and slow (a training step "
            "measured 19x slower than float32 on an AVX2-only CPU); precision auto picks float32 here"
        )
    return name


def dtype_of(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for float32)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for a resolved precision; a no-op for float32."""
    dtype = dtype_of(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def describe(device: torch.device | str) -> str:
    """A few words on the device's precision support, for logs."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({'bf16' if cuda_has_bf16(device) else 'no bf16'})"
    if device.type == "cpu":
        return f"CPU {torch.backends.cpu.get_cpu_capability()} ({'native bf16' if cpu_has_native_bf16() else 'no native bf16'})"
    return device.type
