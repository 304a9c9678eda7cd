"""Stage-by-stage parity with torchvision's ``maskrcnn_resnet50_fpn_v2`` on the committed fixture
``tests/fixtures/tv2_parity`` (README there), with the v1 test's tolerances and checks
(``tests.model.parity``).

The fixture holds what torchvision 0.28 computed for a checkpoint laid out exactly like the
published ``maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth`` (current key names, BatchNorm step
counters) with calibrated random weights; ``conftest.tv2_checkpoint`` rebuilds the file from
the fixture's recipe. The model is loaded with ``maskrcnn.load`` and no hint: the v2 layout is
read from the file's keys. Runs once per device of ``tests.helpers.DEVICES``, TF32 off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import maskrcnn

from ..helpers import DEVICES, TV2_PARITY
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
def model(request, tv2_checkpoint):
    torch.set_grad_enabled(False)
    with float32_math():
        yield maskrcnn.load(tv2_checkpoint, device=request.param)
    torch.set_grad_enabled(True)


@pytest.fixture(scope="module")
def runs(model):
    """Run every case once on the model's device, keeping each stage's output (on the CPU)."""
    return run_cases(model, TV2_PARITY)


def test_the_v2_layout_is_read_from_the_file(tv2_checkpoint):
    """What torchvision's v2 builder sets, found from the keys alone."""
    state = torch.load(tv2_checkpoint, weights_only=True)
    assert "rpn.head.conv.1.0.weight" in state and "backbone.fpn.inner_blocks.0.1.num_batches_tracked" in state
    cfg = maskrcnn.load(tv2_checkpoint).config
    assert (cfg.backbone.fpn_norm, cfg.rpn.conv_depth, cfg.roi_heads.box_head) == ("batchnorm", 2, "4conv1fc")
    assert (cfg.roi_heads.box_head_norm, cfg.roi_heads.mask_head_norm) == ("batchnorm", "batchnorm")
    assert not cfg.backbone.frozen_bn and cfg.backbone.bn_eps == 1e-5  # nn.BatchNorm2d's default, as torchvision
    assert cfg.num_classes == 90 and cfg.class_names[0] == "person"


def test_every_batchnorm_is_in_eval_mode_and_holds_the_file_statistics(model, tv2_checkpoint):
    state = torch.load(tv2_checkpoint, weights_only=True)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 53 + 8 + 4 + 4  # ResNet-50 body, FPN, box head, mask head
    assert not any(m.training for m in norms)
    ours = model.state_dict()
    assert torch.equal(
        ours["backbone.fpn.layer_norms.3.running_var"].cpu(), state["backbone.fpn.layer_blocks.3.1.running_var"]
    )
    assert torch.equal(
        ours["roi_heads.box_head.norm4.running_mean"].cpu(), state["roi_heads.box_head.3.1.running_mean"]
    )
    assert torch.equal(ours["roi_heads.mask_head.mask_norm1.weight"].cpu(), state["roi_heads.mask_head.0.1.weight"])


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
    check_pasting_torchvision_masks(TV2_PARITY, case)
