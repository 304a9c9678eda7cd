"""Shared test fixtures: the torchvision-format parity checkpoints (v1 from ../shared, v2 from
tests/fixtures), the devices that device-parametrised tests run on, and a saved tiny model.
Plain helpers and paths are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maskrcnn.data import generate_shapes
from maskrcnn.weights.checkpoint import save_checkpoint

from .helpers import DEVICES, TV2_PARITY, TV_PARITY, build_checkpoint, tiny_model


@pytest.fixture(scope="session")
def tv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The v1 parity checkpoint (torchvision's 2019 COCO layout), from ../shared's recipe."""
    return build_checkpoint(TV_PARITY, "tv_parity_r50")


@pytest.fixture(scope="session")
def tv2_checkpoint() -> Path:
    """The v2 parity checkpoint (``maskrcnn_resnet50_fpn_v2``'s layout), from the repo's recipe."""
    return build_checkpoint(TV2_PARITY, "tv2_parity_r50")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Run the test once per entry of ``DEVICES``; inputs go to this device, results come back
    to the CPU for comparison with the same references."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_model()`` saved in our checkpoint format, once per test module."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, tiny_model())
    return path


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """6 training and 2 validation images of 64..96 px with 1-2 large shapes each (read only:
    a test that breaks a split works on a copy)."""
    root = tmp_path_factory.mktemp("shapes")
    return generate_shapes(
        root, num_train=6, num_val=2, image_size=(64, 96), objects_per_image=(1, 2), object_size=(24, 40), seed=0
    )
