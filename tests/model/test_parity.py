"""Stage-by-stage parity with torchvision's Mask R-CNN (v1, ``maskrcnn_resnet50_fpn``) on the
shared fixture.

The fixture holds what torchvision 0.28 computed for a checkpoint in its published COCO
layout; tolerances are the ones its README gives (the checks live in ``tests.model.parity``).
Each stage is fed our own previous stage, except the box head, which is also checked on
torchvision's proposals.

Every test runs once per device of ``tests.helpers.DEVICES`` against the same fixture and
tolerances. On CUDA, TF32 is switched off for the run: PyTorch lets cuDNN convolutions use
TF32 by default (10-bit mantissa products), which is a different computation from the float32
one the fixture records.
"""

from __future__ import annotations

import pytest
import torch

import maskrcnn

from ..helpers import DEVICES, TV_PARITY, need
from .parity import (
    CASES,
    check_box_head_on_torchvision_proposals,
    check_detections,
    check_fpn_features,
    check_pasting_torchvision_masks,
    check_preprocessing,
    check_proposals,
    float32_math,
    run_cases,
)


@pytest.fixture(scope="module", params=DEVICES)
def model(request, tv_checkpoint):
    torch.set_grad_enabled(False)
    with float32_math():
        yield maskrcnn.load(tv_checkpoint, device=request.param)
    torch.set_grad_enabled(True)


@pytest.fixture(scope="module")
def runs(model):
    """Run every case once on the model's device, keeping each stage's output (on the CPU)."""
    need(TV_PARITY / "cases.json")
    return run_cases(model, TV_PARITY)


@pytest.mark.parametrize("case", CASES)
def test_preprocessing(runs, case):
    check_preprocessing(runs[case])


@pytest.mark.parametrize("case", CASES)
def test_fpn_features(runs, case):
    check_fpn_features(runs[case])


@pytest.mark.parametrize("case", CASES)
def test_proposals(runs, case):
    check_proposals(runs[case])


@pytest.mark.parametrize("case", ["single_a", "single_b"])
def test_box_head_on_torchvision_proposals(runs, case):
    check_box_head_on_torchvision_proposals(runs[case])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stage", ["dets", "final"])
def test_detections(runs, case, stage):
    check_detections(runs[case], stage)


@pytest.mark.parametrize("case", ["single_a", "single_b"])
def test_pasting_torchvision_masks_at_its_boxes_gives_its_rles(case):
    need(TV_PARITY / f"{case}.npz")
    check_pasting_torchvision_masks(TV_PARITY, case)
