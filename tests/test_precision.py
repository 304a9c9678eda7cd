"""Precision chosen by the hardware: the capability probe mocked for each kind of machine."""

from __future__ import annotations

import logging

import pytest
import torch

from maskrcnn import precision


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch):
    """Set what the probes see: cpu(avx512_bf16=..., amx=..., capability=..., isa=..., speedup=...)."""

    def set_cpu(
        avx512_bf16: bool = False,
        amx: bool = False,
        capability: str = "AVX512",
        isa: str | None = None,
        speedup: float = 2.0,
    ) -> None:
        flags = {"avx512_bf16": avx512_bf16, "amx_tile": amx}
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
        monkeypatch.setattr(precision, "_cpu_flag", lambda name: flags.get(name, False))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        if isa is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        monkeypatch.setattr(precision, "_warned", set())

    return set_cpu


@pytest.mark.parametrize(
    "machine, expected",
    [
        ({"avx512_bf16": True}, "bf16"),  # Zen 4, Cooper Lake, Sapphire Rapids
        ({"amx": True}, "bf16"),  # AMX tiles compute bf16 too
        ({"capability": "AVX2"}, "fp32"),  # Zen 3, most laptops
        ({"avx512_bf16": True, "capability": "AVX2"}, "fp32"),  # ATEN_CPU_CAPABILITY=avx2 on a Zen 4
        ({"avx512_bf16": True, "isa": "AVX2"}, "fp32"),  # ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's convs run AVX2
        ({"avx512_bf16": True, "isa": "avx512_core"}, "fp32"),  # AVX-512 without its bf16 extension
        ({"avx512_bf16": True, "isa": "AVX512_CORE_BF16"}, "bf16"),
        ({"avx512_bf16": True, "isa": "ALL"}, "bf16"),
        ({"avx512_bf16": True, "speedup": 0.66}, "fp32"),  # native but slower: an Intel Xeon without AMX
        ({"avx512_bf16": True, "speedup": 1.05}, "fp32"),  # within the probe's margin
    ],
)
def test_auto_on_the_cpu(cpu, machine, expected):
    cpu(**machine)
    assert precision.resolve("auto", "cpu") == expected


def test_auto_on_cuda(monkeypatch):
    monkeypatch.setattr(precision, "cuda_has_bf16", lambda device: True)
    assert precision.resolve("auto", "cuda") == "bf16"
    monkeypatch.setattr(precision, "cuda_has_bf16", lambda device: False)  # Volta, Turing
    assert precision.resolve("auto", "cuda:0") == "fp16"


def test_explicit_choices_and_errors(cpu):
    cpu(capability="AVX2")
    assert precision.resolve("", "cpu") == "fp32" and precision.resolve("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(ValueError, match="not one of"):
        precision.resolve("fp8", "cpu")
    assert precision.dtype_of("bf16") is torch.bfloat16 and precision.dtype_of("fp32") is None


def test_explicit_bf16_without_native_support_warns_once(cpu, caplog):
    cpu(capability="AVX2")
    with caplog.at_level(logging.WARNING, logger="maskrcnn.precision"):
        assert precision.resolve("bf16", "cpu") == "bf16"
        assert precision.resolve("bf16", "cpu") == "bf16"
    warnings = [r for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warnings) == 1 and "19x" in warnings[0].getMessage()
    caplog.clear()
    cpu(avx512_bf16=True)
    with caplog.at_level(logging.WARNING, logger="maskrcnn.precision"):
        precision.resolve("bf16", "cpu")
    assert not caplog.records


def test_autocast_follows_the_resolved_precision():
    x = torch.randn(4, 4)
    with precision.autocast("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with precision.autocast("cpu", "fp32"):
        assert (x @ x).dtype == torch.float32


def test_the_speed_probe_runs_only_where_bf16_is_native(cpu, monkeypatch):
    cpu(capability="AVX2")
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("probed an AVX2 CPU"))
    assert precision.resolve("auto", "cpu") == "fp32"


def test_the_speed_probe_measures_both_precisions():
    """The real probe, under no_grad as predict may call it: a positive finite ratio."""
    precision.cpu_bf16_speedup.cache_clear()
    with torch.no_grad():
        speedup = precision.cpu_bf16_speedup()
    assert 0.01 < speedup < 100
