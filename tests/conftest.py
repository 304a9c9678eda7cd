"""Shared test fixtures: the ../shared folder, the torchvision-format parity checkpoint, and the
devices that device-parametrised tests run on."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASKRCNN_SHARED", REPO.parent / "shared"))
TV_PARITY = SHARED / "fixtures" / "tv_parity"
KUDZU = SHARED / "data" / "kudzu_bug"

# The CPU always; CUDA only where a GPU is present, so a CPU-only machine runs exactly the CPU
# tests and reports no skips. Select one device with ``-k cuda`` / ``-k cpu``.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def need(path: Path) -> Path:
    """Skip the calling test with a clear reason when a shared file or folder is absent."""
    if not path.exists():
        pytest.skip(f"shared material not found: {path} (expected ../shared beside the repo, or set MASKRCNN_SHARED)")
    return path


@pytest.fixture(scope="session")
def tv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parity checkpoint, built once per machine from the fixture's recipe (digest-checked)."""
    need(TV_PARITY / "weights_rule.py")
    cache = Path(os.environ.get("MASKRCNN_TEST_CACHE", Path.home() / ".cache" / "maskrcnn-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "tv_parity_r50.pth"
    if not path.exists():
        spec = importlib.util.spec_from_file_location("weights_rule", TV_PARITY / "weights_rule.py")
        rule = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rule)  # type: ignore[union-attr]
        tmp = path.with_suffix(".tmp")
        rule.write_checkpoint(str(tmp), TV_PARITY)  # raises if the digest differs
        tmp.replace(path)
    return path


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Run the test once per entry of ``DEVICES``; inputs go to this device, results come back
    to the CPU for comparison with the same references."""
    return torch.device(request.param)


D2_PARITY = REPO / "tests" / "fixtures" / "d2_parity"


def d2_checkpoint(family: str) -> Path:
    """A Detectron2-layout parity checkpoint (``model_final``-style .pkl), built once per machine
    from ``tests/fixtures/d2_parity/FAMILY``'s recipe (digest-checked)."""
    import json

    folder = D2_PARITY / family
    digest = json.loads((folder / "spec.json").read_text())["sha256"]
    cache = Path(os.environ.get("MASKRCNN_TEST_CACHE", Path.home() / ".cache" / "maskrcnn-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"d2_parity_{family}_{digest[:12]}.pkl"
    if not path.exists():
        spec = importlib.util.spec_from_file_location("d2_weights_rule", D2_PARITY / "weights_rule.py")
        rule = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rule)  # type: ignore[union-attr]
        tmp = path.with_suffix(".tmp")
        rule.write_checkpoint(str(tmp), folder)  # raises if the digest differs
        tmp.replace(path)
    return path
