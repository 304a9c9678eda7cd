"""Training policies as hooks around the loop (``trainer.py``), in the manner of Detectron2's
``HookBase``: the loop trains; validation, the best checkpoint, early stopping, the time budget
(``budget.py``), periodic checkpoints and the run output (``run_output.py``) watch it and steer
it through a few attributes of the trainer.

What a hook may read: ``trainer.cfg`` (the ``TrainConfig``), ``trainer.model``,
``trainer.iteration`` (optimizer steps done), ``trainer.lr`` (the rate of the last step),
``trainer.out`` (the run folder), ``trainer.val_data`` (None without validation),
``trainer.current`` (the stage being trained), ``trainer.progress`` and, in ``after_epoch``,
``trainer.record`` (the epoch's line of metrics.jsonl, which hooks may add to). What it may set:
``trainer.stop = StopReason.X`` ends the run after the step or epoch under way;
``trainer.current.over = True`` ends the stage. ``trainer.call(event, ...)`` calls every hook.

Hooks run in the order they are given; the trainer's own come first (``default_hooks``), in an
order that matters: the time budget times the validation that follows it, the run output writes
the epoch's line once validation filled it in, early stopping ends the stage before the epoch's
checkpoint records where the run stands. Each hook's ``state_dict`` is saved in ``last.pth``
under its class name (so one hook per class) and given back to ``load_state_dict`` on resume.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from ..inference.results import Result
from ..weights.checkpoint import save_checkpoint
from . import distributed
from .validate import validate

# The trainer as hooks see it: ``trainer.Trainer``, not imported here, so that the policies never
# import the loop they watch (the loop imports them). What a hook may read and set: module docstring.
Trainer = Any


class StopReason(enum.Enum):
    """Why a run ended before its schedule did; the value is what ``train`` returns as
    ``"stopped"`` and what the console shows."""

    MAX_ITERS = "max_iters"  # solver.max_iters reached
    MAX_MINUTES = "max_minutes"  # solver.max_minutes spent
    EARLY_STOPPING = "early_stopping"  # eval.patience validations without improvement in the last stage
    INTERRUPTED = "interrupted"  # Ctrl-C


@dataclass
class EpochRecord:
    """The epoch that just ended, as the ``after_epoch`` hooks fill it in."""

    # its metrics.jsonl line: epoch (1-based), iter, stage, train_loss, [partial]; then val_*, *_AP and time
    values: dict[str, Any]
    pictures: list[Result] = field(default_factory=list)  # detections on the first validation images, when validated


class HookBase:
    """A training policy: every method does nothing unless overridden.

    Order of the calls: ``before_train``; per step ``before_step``, the step, ``after_step``;
    at each epoch's end (also one a stop cut short) ``after_epoch``, within which a validation
    calls ``after_validation``; ``after_train`` at the end, whatever ended the run.
    """

    def before_train(self, trainer: Trainer) -> None:
        """Once, after a resumed run's states were restored, before any pretraining or step."""

    def before_step(self, trainer: Trainer) -> None:
        """Before each optimizer step; ``trainer.lr`` is the rate it will use."""

    def after_step(self, trainer: Trainer, losses: dict[str, float]) -> None:
        """After each step: ``losses`` has "loss" (the stage's sum), each term and "grad_norm"."""

    def after_epoch(self, trainer: Trainer) -> None:
        """At the end of each epoch, before ``last.pth`` is written; ``trainer.record`` is it."""

    def after_validation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After a validation: ``metrics`` has val_loss, val_loss_<term> and the COCO APs."""

    def after_train(self, trainer: Trainer) -> None:
        """Once at the end, also when an error or Ctrl-C ended the run."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue as this one would have: plain values and
        tensors only (``last.pth`` is read with ``weights_only=True``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s value ({} for a checkpoint that has none)."""


def improved(value: float, best: float | None, metric: str) -> bool:
    """``value`` of ``metric`` beats ``best`` (lower for val_loss, else higher; NaN never does)."""
    if math.isnan(value):
        return False
    return best is None or (value < best if metric == "val_loss" else value > best)


class Validation(HookBase):
    """Validate after every ``every``-th epoch, the last epoch of each stage, and an epoch that
    early stopping, a fitted length or a stop ended; keep the best weights in ``best.pth``.

    Only a stage that trains the heads yields a detector worth keeping: an RPN stage's AP is ~0
    and its val_loss sums other terms, so its validations never select.
    """

    def __init__(self, every: int, metric: str) -> None:
        self.every, self.metric = every, metric
        self.best_metric: float | None = None  # best value of metric so far
        self.best_epoch = 0  # 1-based epoch of best_metric

    def after_epoch(self, trainer: Trainer) -> None:
        record, current = trainer.record, trainer.current
        epoch = record.values["epoch"]
        due = epoch % self.every == 0 or epoch == current.end_epoch or current.over or trainer.stop is not None
        if trainer.val_data is None or not due:
            return
        distributed.sync_buffers(trainer.model)
        metrics, record.pictures = validate(trainer.model, current.stage, trainer.val_data, trainer.cfg, trainer.device)
        record.values.update(metrics)
        trainer.call("after_validation", metrics)

    def after_validation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric, math.nan)
        if not trainer.current.stage.trains_heads or not improved(value, self.best_metric, self.metric):
            return
        self.best_metric, self.best_epoch = value, trainer.record.values["epoch"]
        if distributed.rank() == 0:
            info = {"epoch": self.best_epoch, "iteration": trainer.iteration, "metrics": dict(trainer.record.values)}
            save_checkpoint(trainer.checkpoint("best"), trainer.model, info)

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric, self.best_epoch = state.get("best_metric"), state.get("best_epoch", 0)


class EarlyStopping(HookBase):
    """End a stage after ``patience`` validations in a row without improvement of ``metric``
    (0 = never); ending the last stage ends the run. Counts only in stages that train the heads,
    from 0 in each, against the best of the whole run (as ``Validation`` judges it)."""

    def __init__(self, metric: str, patience: int) -> None:
        self.metric, self.patience = metric, patience
        self.best: float | None = None  # best value of metric so far, and its 1-based epoch
        self.best_epoch = 0
        self.bad_evals = 0  # validations since the last improvement, in stage `stage`
        self.stage = -1
        self.triggered = False  # decided by this epoch's validation, acted on at its end

    def after_validation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        current = trainer.current
        if not current.stage.trains_heads:
            return
        if current.index != self.stage:  # a new stage counts afresh
            self.stage, self.bad_evals = current.index, 0
        value = metrics.get(self.metric, math.nan)
        if improved(value, self.best, self.metric):
            self.best, self.best_epoch, self.bad_evals = value, trainer.record.values["epoch"], 0
        else:
            self.bad_evals += 1
            self.triggered = 0 < self.patience <= self.bad_evals

    def after_epoch(self, trainer: Trainer) -> None:
        if not self.triggered:
            return
        self.triggered = False
        trainer.info(
            "early stopping: %s did not improve for %d validations (best %.4f at epoch %d)",
            self.metric,
            self.bad_evals,
            self.best,
            self.best_epoch,
        )
        trainer.current.over = True
        if trainer.current.index == len(trainer.stages) - 1:
            trainer.stop = trainer.stop or StopReason.EARLY_STOPPING

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_evals": self.bad_evals, "stage": self.stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch", 0)
        self.bad_evals, self.stage = state.get("bad_evals", 0), state.get("stage", -1)


class PeriodicCheckpoint(HookBase):
    """``last.pth`` every ``every_iters`` iterations (0 = off) inside an epoch; the trainer writes
    it at every epoch's end and at Ctrl-C anyway."""

    def __init__(self, every_iters: int) -> None:
        self.every_iters = every_iters

    def after_step(self, trainer: Trainer, losses: dict[str, float]) -> None:
        if (
            self.every_iters
            and trainer.iteration % self.every_iters == 0
            and trainer.progress.batch < trainer.iters_per_epoch
        ):  # an epoch's last step: its end writes it
            trainer.save_last()
