"""Training schedules: what each stage trains and sums, the learning-rate curve, and an
alternating run end to end."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import maskrcnn
from maskrcnn.config import ModelConfig, from_dict
from maskrcnn.structures import Targets
from maskrcnn.train.schedules import (
    ALL_LOSSES,
    FRONTEND_LOSSES,
    RPN_LOSSES,
    LRSchedule,
    ProposalNet,
    alternating_schedule,
    apply_stage,
    build_schedule,
    forward_with_proposals,
    joint_schedule,
    set_train_mode,
    stage_at,
    stage_loss,
)
from maskrcnn.train.trainer import train
from maskrcnn.weights.checkpoint import read_file

from .helpers import TINY_MODEL, tiny_train_config

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def _model(trainable_layers: int = 3) -> maskrcnn.MaskRCNN:
    backbone = {**TINY_MODEL["backbone"], "trainable_layers": trainable_layers}
    return maskrcnn.build_model(from_dict(ModelConfig, {**TINY_MODEL, "backbone": backbone, "num_classes": 2}))


def _batch() -> tuple[list[torch.Tensor], list[Targets]]:
    masks = torch.zeros((2, 80, 96), dtype=torch.uint8)
    masks[0, 10:60, 10:50] = 1
    masks[1, 20:70, 50:90] = 1
    targets = Targets(
        boxes=torch.tensor([[10.0, 10, 50, 60], [50, 20, 90, 70]]), labels=torch.tensor([1, 2]), masks=masks
    )
    return [torch.rand(3, 80, 96)], [targets]


def test_schedules_as_data():
    (joint,) = joint_schedule(12)
    assert joint.epochs == 12 and joint.losses == ALL_LOSSES and joint.trainable == ("",)
    stages = alternating_schedule((2, 3, 1, 1))
    assert [s.name for s in stages] == ["rpn", "frontend", "rpn_finetune", "frontend_finetune"]
    assert [s.epochs for s in stages] == [2, 3, 1, 1]
    assert [s.losses for s in stages] == [RPN_LOSSES, FRONTEND_LOSSES, RPN_LOSSES, FRONTEND_LOSSES]
    assert [s.separate_proposals for s in stages] == [False, True, False, False]
    assert build_schedule("alternating", 12, (2, 3, 1, 1)) == stages
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule("staged", 12, (1, 1, 1, 1))
    assert [stage_at(stages, e) for e in range(8)] == [(0, 0), (0, 0), (1, 2), (1, 2), (1, 2), (2, 5), (3, 6), (4, 7)]


@pytest.mark.parametrize(
    "index, must_train, must_not_train",
    [
        (0, ("backbone.body.layer4.", "backbone.fpn.", "rpn.head."), ("roi_heads.",)),
        (1, ("backbone.body.layer4.", "backbone.fpn.", "roi_heads.box_head.", "roi_heads.mask_head."), ("rpn.",)),
        (2, ("rpn.head.",), ("backbone.", "roi_heads.")),
        (3, ("roi_heads.box_head.", "roi_heads.box_predictor.", "roi_heads.mask_predictor."), ("backbone.", "rpn.")),
    ],
)
def test_alternating_stages_freeze_what_they_claim(index, must_train, must_not_train):
    torch.manual_seed(0)
    model = _model(trainable_layers=3)
    base = {n for n, p in model.named_parameters() if p.requires_grad}
    stage = alternating_schedule((1, 1, 1, 1))[index]
    params = apply_stage(model, stage, base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in trainable}
    for prefix in must_train:
        assert any(n.startswith(prefix) for n in trainable), prefix
    assert not any(n.startswith(must_not_train) for n in trainable)
    assert not any(
        n.startswith(("backbone.body.conv1", "backbone.body.layer1.")) for n in trainable
    )  # trainable_layers 3
    assert trainable == {n for n in base if n.startswith(stage.trainable)}

    # one step: gradients reach exactly the stage's parameters, from the stage's losses only
    set_train_mode(model)
    images, targets = _batch()
    proposal_net = ProposalNet(model) if stage.separate_proposals else None
    out = forward_with_proposals(model, proposal_net, images, targets) if proposal_net else model(images, targets)
    loss = stage_loss(stage, out.losses)
    assert torch.allclose(loss, sum(out.losses[k] for k in stage.losses))
    if proposal_net is None:
        assert loss < out.total_loss  # the other stage's terms are left out
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert (
        with_grad == trainable
    )  # every parameter that trains is in the graph, as DDP without find_unused_parameters needs
    assert any(n.startswith(must_train[0]) for n in with_grad)
    if proposal_net is not None:
        assert set(out.losses) == set(FRONTEND_LOSSES)
        assert all(p.grad is None and not p.requires_grad for p in proposal_net.parameters())
        assert any(n.startswith("backbone.") for n in with_grad)  # the frontend's own backbone trains


def test_stage_loss_sums_only_its_terms():
    losses = {k: torch.tensor(float(i + 1)) for i, k in enumerate(ALL_LOSSES)}  # 1, 2, 3, 4, 5
    rpn, frontend = alternating_schedule((1, 1, 1, 1))[:2]
    assert stage_loss(rpn, losses).item() == 3.0
    assert stage_loss(frontend, losses).item() == 12.0
    assert stage_loss(joint_schedule(1)[0], losses).item() == 15.0
    no_mask = {k: v for k, v in losses.items() if k != "loss_mask"}  # box-only model
    assert stage_loss(frontend, no_mask).item() == 7.0
    with pytest.raises(ValueError, match="sums"):
        stage_loss(rpn, {"loss_mask": torch.tensor(1.0)})


def test_frozen_batchnorm_stays_in_eval_mode():
    model = _model(trainable_layers=5)
    apply_stage(model, alternating_schedule((1, 1, 1, 1))[2], {n for n, _ in model.named_parameters()})  # RPN head only
    set_train_mode(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.rpn.training and model.training


def test_lr_schedule():
    step = LRSchedule(
        iters_per_epoch=10, epochs=12, kind="step", milestones=(8, 11), gamma=0.1, warmup_iters=5, warmup_factor=0.001
    )
    assert step(0) == pytest.approx(0.001)
    assert step(5) == 1.0 and step(79) == 1.0
    assert step(80) == pytest.approx(0.1) and step(110) == pytest.approx(0.01)
    assert [step(i) for i in range(6)] == sorted(step(i) for i in range(6))  # linear rise
    assert step(2) == pytest.approx(0.001 + (1 - 0.001) * 2 / 5)
    cosine = LRSchedule(iters_per_epoch=10, epochs=2, kind="cosine")
    assert cosine(0) == 1.0 and cosine(10) == pytest.approx(0.5) and cosine(20) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        LRSchedule(10, 1, kind="poly")(0)


def test_alternating_training_runs_every_stage_and_resumes_inside_stage_2(shapes, tmp_path):  # noqa: F811
    sections = {
        "schedule": {"kind": "alternating", "stage_epochs": [1, 1, 1, 1]},
        "data": {"max_train_images": 4},
        "eval": {"every": 1, "num_visualize": 0},
    }  # 2 iterations per epoch
    result = train(tiny_train_config(shapes, tmp_path / "full", **sections))
    assert result["stopped"] == "completed" and result["epochs"] == 4 and result["iterations"] == 8
    assert [h["stage"] for h in result["history"]] == ["rpn", "frontend", "rpn_finetune", "frontend_finetune"]
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in result["history"])

    # stop in the middle of stage 2: the frozen proposal network must come back with the optimizer
    cut = tiny_train_config(shapes, tmp_path / "cut", checkpoint_every_iters=1, solver={"max_iters": 3}, **sections)
    train(cut)
    state = read_file(tmp_path / "cut" / "last.pth")["train_state"]
    assert (state["stage"], state["epoch"], state["batch"]) == (1, 1, 1) and state["proposal_net"] is not None
    resumed = train(dataclasses.replace(cut, solver=dataclasses.replace(cut.solver, max_iters=0)), resume=True)
    assert resumed["iterations"] == 8
    a, b = read_file(tmp_path / "full" / "last.pth")["model"], read_file(tmp_path / "cut" / "last.pth")["model"]
    for key, value in a.items():
        assert torch.allclose(value.float(), b[key].float(), rtol=1e-4, atol=1e-6), key
