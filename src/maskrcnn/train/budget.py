"""The time budget ``solver.max_minutes``, all of it: fitting the schedule to the time left and
the hard stop.

At iteration ``FIT_AT`` of this process's loop and every ``REFIT_EVERY`` after, the pace of the
training steps since the last look (validations excluded; the first steps pay one-time costs,
so the first look starts at ``FIT_FROM``) and the validations still to come (timed once one has
run, else ``VAL_COST`` training steps per batch) give the iterations that fit. Every stage's
remaining planned iterations are scaled by the same factor (``schedules.fitted_lengths``, never
beyond the plan) and the trainer re-fits the current stage's learning-rate curve from there on
(``Trainer.fit_stages``), so it stays continuous and still decays to its end instead of being cut
off at a high rate. Steps that slow down as the model learns (more proposals survive) are caught
by the refits. When the budget is spent anyway, the run stops (``StopReason.MAX_MINUTES``): the
epoch's end validates and saves the last weights, and ``--resume`` finishes the epoch.

The budget counts from the start of the command (``trainer.started``): a resumed run gets a
new one. The fitted lengths are where the run stands, so they live in the trainer's
``Progress`` and are saved with it; the pace is measured afresh in each command, so this hook
saves no state of its own.
"""

from __future__ import annotations

import logging
import math

from . import distributed
from .hooks import HookBase, StopReason, Trainer
from .schedules import fitted_lengths

log = logging.getLogger(__name__)

# Fitting the schedule to solver.max_minutes: first from the pace of iterations FIT_FROM..FIT_AT
# of a run (the first ones pay one-time costs), then again every REFIT_EVERY iterations; until
# a validation has been timed, a validation batch is taken to cost VAL_COST training steps
# (the demo's: forward with losses, detection and pasting, no backward).
FIT_FROM, FIT_AT, REFIT_EVERY, VAL_COST = 5, 25, 25, 0.5


class TimeBudget(HookBase):
    """Fit the schedule to ``max_minutes`` (0 = no budget) and stop when it is spent."""

    def __init__(self, max_minutes: float) -> None:
        self.max_minutes = max_minutes
        self.first = 0  # the iteration this process's loop began at
        self.pace: dict[str, float] = {}  # where the last look was: done, time, val
        self.val_seconds = self.last_val_seconds = 0.0  # validation time in all, and of the last one
        self.val_started = 0.0

    def before_train(self, trainer: Trainer) -> None:
        self.first = trainer.iteration

    def after_step(self, trainer: Trainer, losses: dict[str, float]) -> None:
        if not self.max_minutes:
            return
        self.fit(trainer)
        (out_of_time,) = distributed.any_rank(
            trainer.clock() - trainer.started >= 60 * self.max_minutes
        )  # one decision for all
        if out_of_time:
            trainer.stop = StopReason.MAX_MINUTES

    # Validations are timed from this hook's after_epoch, which runs just before Validation's.
    def after_epoch(self, trainer: Trainer) -> None:
        self.val_started = trainer.clock()

    def after_validation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.last_val_seconds = trainer.clock() - self.val_started
        self.val_seconds += self.last_val_seconds

    def fit(self, trainer: Trainer) -> None:
        """Re-fit the stage lengths when this step is one to look at (see the module docstring)."""
        done = trainer.iteration - self.first
        if done != FIT_FROM and (done < FIT_AT or (done - FIT_AT) % REFIT_EVERY):
            return
        now = trainer.clock()
        if done == FIT_FROM or not self.pace:
            self.pace = {"done": done, "time": now, "val": self.val_seconds}
            return
        window = now - self.pace["time"] - (self.val_seconds - self.pace["val"])
        pace = window / (done - self.pace["done"])
        self.pace = {"done": done, "time": now, "val": self.val_seconds}
        # Process 0's clock decides for all, so that every process fits the same lengths.
        sec_per_iter, elapsed, val_s = distributed.from_first((pace, now - trainer.started, self.last_val_seconds))
        index, it, cfg = trainer.current.index, trainer.stage_iteration(), trainer.cfg
        planned = [s.epochs * trainer.iters_per_epoch for s in trainer.stages]
        remaining = planned[index] - it + sum(planned[index + 1 :])
        if trainer.val_data is not None and not val_s:  # no validation timed yet: estimate it
            val_share = math.ceil(len(trainer.val_data) / distributed.world_size())  # sharded
            val_s = math.ceil(val_share / cfg.data.batch_size) * VAL_COST * sec_per_iter
        left = 60 * self.max_minutes - elapsed - self.validations_left(trainer, it) * val_s
        fits = max(0, int(left / sec_per_iter))
        lengths = fitted_lengths(planned, index, it, min(1.0, fits / max(remaining, 1)))
        if lengths == trainer.stage_lengths():
            return
        before = sum(trainer.stage_lengths()[index:])
        trainer.fit_stages(lengths)
        end = trainer.iteration - it + sum(lengths[index:])
        if done > FIT_AT and abs(sum(lengths[index:]) - before) < 0.05 * before:  # a small correction
            log.debug("time budget: refitted to %d iterations at %.2f s each", end, sec_per_iter)
            return
        trainer.info(
            "time budget: solver.max_minutes=%g at %.2f s per iteration fits %d of the %d planned iterations "
            "left; the learning-rate schedule is fitted to end at iteration %d instead of %d",
            self.max_minutes,
            sec_per_iter,
            fits,
            remaining,
            end,
            trainer.iteration + remaining,
        )

    @staticmethod
    def validations_left(trainer: Trainer, it: int) -> int:
        """Validations still to come after iteration ``it`` of the current stage: every
        ``eval.every`` epochs and at the end of each stage, with the current lengths."""
        if trainer.val_data is None:
            return 0
        every, ipe, count = trainer.cfg.eval.every, trainer.iters_per_epoch, 0
        for k, length in enumerate(trainer.stage_lengths()[trainer.current.index :]):
            start = it if k == 0 else 0
            ends = range(start // ipe + 1, (length - 1) // ipe + 1)  # epochs ending before the stage's last iteration
            count += sum(1 for e in ends if e % every == 0) + 1
        return count
