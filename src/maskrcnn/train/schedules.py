"""Training schedules (seed section 4): which parameters train and which losses count, per stage;
and the learning-rate curve within a stage.

A schedule is a list of ``Stage``s run one after the other. A stage names the parameters that
train (by name prefix, intersected with what the model config leaves trainable, e.g.
``backbone.trainable_layers``) and the loss terms summed into the training loss:

* ``joint`` (default): one stage, everything end to end, all five losses (as torchvision and
  Detectron2 train Mask R-CNN).
* ``alternating`` (seed 4.3, the 4-step training of Faster R-CNN, Ren et al. 2015 §3.2):

  1. ``rpn``: backbone + RPN, RPN losses only.
  2. ``frontend``: RPN fixed, backbone *not shared*: proposals come from a frozen snapshot of
     the stage-1 backbone + RPN, while the model's own backbone trains with the RoI heads on
     the frontend losses. Deviation: the frontend's backbone starts from the stage-1 weights,
     not from the pre-training weights as in Ren et al. (with no ImageNet weights at hand, the
     stage-1 weights are the only trained ones); it is untied from the proposal network all
     the same. Validation in this stage uses the model's own RPN, which has not seen the new
     backbone yet, so its AP is low until stage 3.
  3. ``rpn_finetune``: shared backbone fixed, only the RPN head trains, RPN losses.
  4. ``frontend_finetune``: shared backbone (and RPN) fixed, only the RoI heads train,
     frontend losses.

Each stage gets a fresh optimizer and its own learning-rate curve (warm-up, then step or cosine
decay over the stage's epochs).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..model.mask_rcnn import MaskRCNN
from ..structures import ImageBatch, ModelOutput, Targets

RPN_LOSSES = ("loss_objectness", "loss_rpn_box_reg")
FRONTEND_LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask")
ALL_LOSSES = RPN_LOSSES + FRONTEND_LOSSES


@dataclass(frozen=True)
class Stage:
    """One stage of a training schedule.

    Attributes:
        name: shown in logs and metrics.jsonl.
        epochs: epochs the stage runs.
        trainable: parameter-name prefixes that train ("" = every parameter); parameters the
            model config freezes stay frozen.
        losses: loss terms summed into the training (and validation) loss.
        separate_proposals: proposals come from a frozen copy of the backbone and RPN taken
            at the start of the stage ("backbone not shared"), not from the model itself.
    """

    name: str
    epochs: int
    trainable: tuple[str, ...]
    losses: tuple[str, ...]
    separate_proposals: bool = False

    @property
    def trains_heads(self) -> bool:
        """Its loss has a frontend term: it yields a detector worth validating for the best checkpoint."""
        return any(name in FRONTEND_LOSSES for name in self.losses)


def joint_schedule(epochs: int) -> list[Stage]:
    """End-to-end training of every trainable parameter on all losses."""
    return [Stage("joint", epochs, ("",), ALL_LOSSES)]


def alternating_schedule(stage_epochs: tuple[int, int, int, int]) -> list[Stage]:
    """The seed's alternating RPN / frontend training (see the module docstring)."""
    rpn, frontend, rpn_ft, frontend_ft = stage_epochs
    return [
        Stage("rpn", rpn, ("backbone.", "rpn."), RPN_LOSSES),
        Stage("frontend", frontend, ("backbone.", "roi_heads."), FRONTEND_LOSSES, separate_proposals=True),
        Stage("rpn_finetune", rpn_ft, ("rpn.",), RPN_LOSSES),
        Stage("frontend_finetune", frontend_ft, ("roi_heads.",), FRONTEND_LOSSES),
    ]


def build_schedule(kind: str, epochs: int, stage_epochs: tuple[int, int, int, int]) -> list[Stage]:
    """``kind`` is "joint" or "alternating"."""
    if kind == "joint":
        return joint_schedule(epochs)
    if kind == "alternating":
        return alternating_schedule(stage_epochs)
    raise ValueError(f"unknown schedule {kind!r}; expected 'joint' or 'alternating'")


def stage_at(stages: list[Stage], epoch: int) -> tuple[int, int]:
    """(stage index, first epoch of that stage) for a 0-based global epoch; len(stages) past the end."""
    start = 0
    for i, stage in enumerate(stages):
        if epoch < start + stage.epochs:
            return i, start
        start += stage.epochs
    return len(stages), start


def fitted_lengths(planned: list[int], stage: int, it_in_stage: int, factor: float) -> list[int]:
    """Iterations of each stage when the rest of the run is scaled by ``factor`` (< 1) to fit a
    time budget: stages before ``stage`` as they were, the rest of ``stage`` (from iteration
    ``it_in_stage``, at least one more) and every later stage (at least one) scaled."""
    return [
        n
        if k < stage
        else max(it_in_stage + 1, it_in_stage + round(factor * (n - it_in_stage)))
        if k == stage
        else max(1, round(factor * n))
        for k, n in enumerate(planned)
    ]


def apply_stage(model: nn.Module, stage: Stage, base_trainable: set[str]) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``stage``; returns the parameters that train, in model order.

    Args:
        base_trainable: names of the parameters the model config leaves trainable (taken once,
            right after building the model).
    """
    params = []
    for name, p in model.named_parameters():
        train = name in base_trainable and any(name.startswith(prefix) for prefix in stage.trainable)
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, but BatchNorm layers with no trainable parameter stay in eval mode, so
    a backbone the stage holds fixed does not drift through its running statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def stage_loss(stage: Stage, losses: dict[str, Tensor]) -> Tensor:
    """Sum of the loss terms of ``stage`` present in ``losses`` (a box-only model has no loss_mask)."""
    terms = [losses[k] for k in stage.losses if k in losses]
    if not terms:
        raise ValueError(f"stage {stage.name!r} sums {stage.losses} but the model returned {sorted(losses)}")
    return sum(terms[1:], terms[0])


class ProposalNet(nn.Module):
    """A frozen copy of a model's backbone and RPN that proposes boxes for another backbone.

    Its backbone always runs in eval mode; its RPN follows the training flag it is given (the
    train and test proposal counts differ).
    """

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(model.backbone)
        self.rpn = copy.deepcopy(model.rpn)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def propose(self, batch: ImageBatch, training: bool) -> list[Tensor]:
        """One (P_i, 4) proposal tensor per image of ``batch`` (resized frame)."""
        self.rpn.train(training)
        proposals, _ = self.rpn(batch, self.backbone(batch.tensors))
        return proposals


def forward_with_proposals(
    model: MaskRCNN, proposal_net: ProposalNet, images: list[Tensor], targets: list[Targets] | None
) -> ModelOutput:
    """``model(images, targets)`` with the RPN replaced by ``proposal_net``: frontend losses only
    (and detections in eval mode)."""
    return model(images, targets, propose=lambda batch: proposal_net.propose(batch, model.training))


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate multiplier at iteration ``it`` of a stage: linear warm-up, then decay.

    The decay runs over the stage's length, ``iters_per_epoch * epochs`` unless ``fitted`` gave
    it another (a time budget, ``solver.max_minutes``): then, from the iteration of the fit on,
    the curve's remaining part is stretched or squeezed to end at the new length, so the rate
    is continuous and still decays to its end value (cosine to 0, step through every milestone).

    Attributes:
        iters_per_epoch: training steps per epoch.
        epochs: epochs of the stage.
        kind: "step" (x ``gamma`` after each milestone epoch) or "cosine" (half cosine to 0).
        milestones: epochs (within the stage) after which the rate drops, for "step".
        gamma: drop factor for "step".
        warmup_iters: the multiplier rises linearly from ``warmup_factor`` to 1 over these.
        warmup_factor: the multiplier at iteration 0.
        total: the fitted length in iterations (0 = ``iters_per_epoch * epochs``).
        anchor: (iteration, position in epochs) where the fitted part of the curve starts.
    """

    iters_per_epoch: int
    epochs: int
    kind: str = "step"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    total: int = 0
    anchor: tuple[int, float] = (0, 0.0)

    @property
    def length(self) -> int:
        """Iterations of the stage."""
        return self.total or max(1, self.iters_per_epoch * self.epochs)

    def position(self, it: int) -> float:
        """Where iteration ``it`` lies on the curve, in epochs of the planned stage (0..epochs)."""
        if not self.total:
            return it / max(1, self.iters_per_epoch)  # exact at whole epochs, so milestones fall on them
        start, pos = self.anchor
        slope = (self.epochs - pos) / max(1, self.total - start)
        return min(float(self.epochs), pos + (it - start) * slope)

    def fitted(self, it: int, total: int) -> LRSchedule:
        """The same curve from iteration ``it`` on, reaching its end at iteration ``total``."""
        return dataclasses.replace(self, total=max(total, it + 1), anchor=(it, self.position(it)))

    def __call__(self, it: int) -> float:
        if self.kind == "step":
            pos = self.position(it)
            decay = self.gamma ** sum(pos >= m for m in self.milestones)
        elif self.kind == "cosine":
            if self.total:
                frac = self.position(it) / max(1, self.epochs)
            else:
                total = max(1, self.iters_per_epoch * self.epochs)
                frac = min(it, total) / total
            decay = 0.5 * (1.0 + math.cos(math.pi * frac))
        else:
            raise ValueError(f"unknown learning-rate schedule {self.kind!r}; expected 'step' or 'cosine'")
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            decay *= self.warmup_factor * (1.0 - alpha) + alpha
        return decay
