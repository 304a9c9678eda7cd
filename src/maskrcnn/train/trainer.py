"""Training: ``maskrcnn train CONFIG.yaml key=value ... [--resume]`` or ``train(TrainConfig)``.

One epoch = the training images once, in aspect-ratio grouped batches, each image flipped with
probability ``data.hflip``. Per step: forward with targets, the stage's loss terms summed
(``schedules.Stage``), backward, gradient clipping, SGD with momentum. The learning rate warms
up linearly, then follows a step or cosine curve, set every iteration. After every epoch (or
every ``eval.every``) the validation set gives the validation losses and COCO AP
(``validate.py``), which pick ``best.pth`` and drive early stopping. What the run writes and
shows is ``run_output.py``'s; what a checkpoint carries to resume is ``state.py``'s.

A run stops at the end of its schedule, at early stopping, at ``solver.max_iters`` or
``solver.max_minutes`` (the last weights are then validated and saved; ``--resume`` finishes
the epoch), or at Ctrl-C: the step under way completes, ``last.pth`` is written at that
iteration and ``TrainingInterrupted`` is raised (the command line prints the ``--resume``
command and exits with 130). Checkpoints are written only from finite weights; a non-finite
loss stops the run with ``NonFiniteLossError`` and leaves the last good ``last.pth`` in place.

Under ``torchrun`` (``distributed.py``) every process runs this loop on its own share of each
step's images (``data.batch_size`` each; ``DistributedGroupedBatchSampler``), the gradients are
averaged by DDP, validation is sharded, and only process 0 writes or shows (``RunOutput``);
stops, the time-budget fit and the best checkpoint are decided alike in all of them.

``resume=True`` continues from ``last.pth``: weights, optimizer, iteration, position in the
epoch (the epoch's batch order is regenerated from ``seed + epoch`` and the batches already
done are skipped), RNG states, best metric and metrics.jsonl (truncated to the checkpoint). On
the CPU a resumed run ends with the same weights as an uninterrupted one, whatever
``data.workers``: flips draw from per-image seeds, and validation restores the RNG states it
consumed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shlex
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import precision
from ..weights.checkpoint import init_from_checkpoint, load_backbone_weights, load_state, with_layout_of
from ..config import ConfigError, to_dict
from ..data import DistributedGroupedBatchSampler, FlipAugmented, aspect_ratio_groups, collate
from ..data.coco import CocoDataset
from ..model.build import build_model
from . import distributed
from .datasets import build_datasets
from .pretrain import pretrain_body
from .run_output import RunOutput, plain
from .schedules import FRONTEND_LOSSES, LRSchedule, ProposalNet, apply_stage, build_schedule, fitted_lengths, forward_with_proposals, set_train_mode, stage_loss
from .state import Progress, read_train_state, rng_state, seed_everything, set_rng_state
from .config import TrainConfig, check, load_training_config
from .validate import validate

log = logging.getLogger(__name__)

# Fitting the schedule to solver.max_minutes: first from the pace of iterations FIT_FROM..FIT_AT
# of a run (the first ones pay one-time costs), then again every REFIT_EVERY iterations; until
# a validation has been timed, a validation batch is taken to cost VAL_COST training steps
# (the demo's: forward with losses, detection and pasting, no backward).
FIT_FROM, FIT_AT, REFIT_EVERY, VAL_COST = 5, 25, 25, 0.5


class NonFiniteLossError(RuntimeError):
    """The loss, the gradient or the weights became NaN or infinite; training stopped."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; ``last.pth`` holds the state at ``iteration``."""

    def __init__(self, iteration: int, last: Path) -> None:
        super().__init__(f"training interrupted at iteration {iteration}; {last} holds that state")
        self.iteration, self.last = iteration, last


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum; without ``decay_norm_and_bias`` the 1-D tensors get no weight decay."""
    s = cfg.solver
    if s.decay_norm_and_bias:
        groups = [{"params": params, "weight_decay": s.weight_decay}]
    else:  # biases and norm weights are 1-D
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": s.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum)


class Trainer:
    """One training run: ``Trainer(cfg, resume, device).run()``; see the module docstring."""

    def __init__(self, cfg: TrainConfig, resume: bool, device: torch.device) -> None:
        self.started = time.monotonic()
        self.device = device
        cfg = _with_precision(cfg, self.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.model.backbone.sync_bn and distributed.launched() and device.type != "cuda":
            raise ConfigError("model.backbone.sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU implementation)")
        saved = read_train_state(Path(cfg.out_dir), resume, cfg.exist_ok)
        self.out = RunOutput(cfg.out_dir, active=distributed.rank() == 0, progress=cfg.progress, log_every=cfg.log_every)
        seed_everything(cfg.seed)

        # Data first: its categories size the class heads.
        with distributed.first_rank_first():  # a generated dataset is written once
            train_full, self.train_set, self.val_set = build_datasets(cfg)
        self.cfg = cfg = _with_classes(cfg, train_full)
        if cfg.init.weights:  # its layers decide the layout (e.g. torchvision v2's BatchNorm heads)
            self.cfg = cfg = dataclasses.replace(cfg, model=with_layout_of(cfg.model, cfg.init.weights))
        self.model = build_model(cfg.model)
        if distributed.world_size() > 1:  # the same initial weights, then each process samples from its own streams
            seed_everything(cfg.seed + distributed.rank())
        self.base_trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if saved is not None:
            load_state(self.model, saved["model"], str(self.out.last))
        else:
            if cfg.model.backbone.weights:
                load_backbone_weights(self.model.backbone.body, cfg.model.backbone.weights)
            if cfg.init.weights:
                init_from_checkpoint(self.model, cfg.init.weights, cfg.model.backbone.bn_eps)
        self.model.to(self.device)
        self.state = saved["train_state"] if saved is not None else None  # consumed when its stage starts
        self.out.start(cfg, self.state["metrics_bytes"] if self.state else None)  # after the checkpoint fitted
        if self.val_set is None:
            log.warning("no validation data (data.val_ann): no AP, no best.pth, no early stopping")

        self.stages = build_schedule(cfg.schedule.kind, cfg.solver.epochs, cfg.schedule.stage_epochs)
        self.num_epochs = sum(s.epochs for s in self.stages)
        self.sampler = DistributedGroupedBatchSampler(aspect_ratio_groups(self.train_set), cfg.data.batch_size, cfg.seed,
                                                      distributed.rank(), distributed.world_size())
        self.iters_per_epoch = self.sampler.batches_per_epoch
        self.augmented = FlipAugmented(self.train_set, cfg.data.hflip, cfg.seed)
        self.progress = Progress()
        self.first_iteration, self.loop_started = 0, self.started  # where and when this process's loop began
        self.stop = ""  # what ends the run early: max_iters, max_minutes, interrupted, early_stopping
        self.interrupt_requested = False  # Ctrl-C seen; acted on at the end of the step
        self.pace: dict[str, float] = {}  # where the last look at the time budget was: done, time, val
        self.val_seconds = self.last_val_seconds = 0.0  # validation time in all, and of the last one

        # The current stage (run_stage sets them).
        self.stage_index, self.stage, self.stage_start = -1, self.stages[0], 0
        self.stage_over = False  # early stopping or the fitted length ended the stage
        self.params: list[nn.Parameter] = []
        self.net: nn.Module = self.model  # what the step runs: the model, or DDP around it
        self.optimizer: torch.optim.SGD | None = None
        self.scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling
        self.proposal_net: ProposalNet | None = None  # the alternating schedule's frozen proposer
        self.lr_at = LRSchedule(self.iters_per_epoch, self.stage.epochs)

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Pretrain the body (a fresh run that asks for it), restore a resumed run, then the
        stages; returns ``train``'s summary."""
        cfg, state = self.cfg, self.state
        if state is None and cfg.pretrain.epochs > 0:
            t = cfg.model.transform
            pretrain_body(self.model.backbone.body, cfg.model.backbone.name, cfg.model.backbone.bn_eps, self.train_set,
                          cfg.model.num_classes, cfg.pretrain, t.image_mean, t.image_std, self.device, cfg.seed,
                          self.out.progress, self.out.log)
            self.out.save_pretrained(self.model)
        if state is not None:
            self.restore(state)
        self.out.info("training %s: %d stage(s), %d epochs of %d iterations, device %s", self.out.out, len(self.stages),
                      self.num_epochs, self.iters_per_epoch, self.device)
        self.first_iteration, self.loop_started = self.progress.iteration, time.monotonic()
        with logging_redirect_tqdm(), _sigint_sets(self._on_sigint):
            try:
                for index in range(len(self.stages)):
                    if self.stop:
                        break
                    if self.progress.epoch < self.stage_end(index):
                        self.run_stage(index)
            except KeyboardInterrupt:  # raised rather than signalled (the handler turns Ctrl-C into a flag)
                if distributed.world_size() > 1:
                    raise  # one process alone cannot save: the others are inside a step
                self.stop = "interrupted"
        if self.stop == "interrupted":
            if self.optimizer is not None:  # else no step was taken: nothing new to save
                self.save_last()
            raise TrainingInterrupted(self.progress.iteration, self.out.last)
        if self.stop in ("max_iters", "max_minutes"):
            self.out.info("stopped (%s) at iteration %d; --resume continues from %s", self.stop, self.progress.iteration, self.out.last)
        return self.summary()

    def run_stage(self, index: int) -> None:
        """Train stage ``index`` from ``progress.epoch`` to its end, early stopping or a stop."""
        self.start_stage(index)
        while self.progress.epoch < self.stage_end(index) and not self.stage_over and not self.stop:
            self.train_epoch()
            if self.stop != "interrupted":
                self.end_epoch()

    def train_epoch(self) -> None:
        """The rest of epoch ``progress.epoch`` from batch ``progress.batch``; ends early at the
        stage's fitted length or at a stop."""
        cfg, progress, epoch = self.cfg, self.progress, self.progress.epoch
        self.sampler.set_epoch(epoch, start=progress.batch)
        self.augmented.epoch = epoch
        loader = DataLoader(self.augmented, batch_sampler=self.sampler, collate_fn=collate,
                            num_workers=cfg.data.workers, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                            pin_memory=self.device.type == "cuda", worker_init_fn=_ignore_sigint)
        self.out.open_bar(self.iters_per_epoch, progress.batch, f"epoch {epoch + 1}/{self.num_epochs} {self.stage.name}")
        set_train_mode(self.model)
        for images, targets, _ in loader:
            it = self.stage_iteration()
            lr = cfg.solver.lr * self.lr_at(it)
            values = self.step(images, targets, lr)
            progress.advance(values["loss"])
            self.fit_to_budget()
            self.out.after_step(progress.iteration, epoch, self.stage.name, lr, values, self.seconds_left(it + 1))
            if cfg.checkpoint_every_iters and progress.iteration % cfg.checkpoint_every_iters == 0 and progress.batch < self.iters_per_epoch:
                self.save_last()
            self.stop = self.limit_reached()
            self.stage_over = it + 1 >= self.stage_lengths()[self.stage_index]
            if self.stop or self.stage_over:
                break
        self.out.close_bar()

    def step(self, images: list[Tensor], targets: list[Any], lr: float) -> dict[str, float]:
        """One optimizer step; returns the loss values and gradient norm. Raises on NaN/inf."""
        cfg, stage, progress = self.cfg, self.stage, self.progress
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [t.to(self.device) for t in targets]
        with precision.autocast(self.device, cfg.solver.amp):
            if self.proposal_net is not None:
                output = forward_with_proposals(self.net, self.proposal_net, images, targets)
            else:
                output = self.net(images, targets)
        losses = {k: v.float() for k, v in output.losses.items() if k in stage.losses}
        loss = stage_loss(stage, losses)
        where = f"iteration {progress.iteration + 1} (epoch {progress.epoch + 1}, batch {progress.batch + 1}, stage '{stage.name}')"
        finite = bool(torch.isfinite(loss))
        (anywhere,) = distributed.any_rank(not finite)
        if anywhere:  # decided in every process before any backward, so that none waits for the others' gradients
            raise self.nonfinite_loss(where, None if finite else _loss_report(losses))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.solver.grad_clip or math.inf))
        if self.scaler is not None:  # skips the step itself when the fp16 gradients overflowed
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"non-finite gradient norm at {where} (losses: {_loss_report(losses)}); no step taken, "
                                     f"{self.out.last} left as it was. Set solver.grad_clip or lower solver.lr")
        else:
            self.optimizer.step()
        values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}
        values["grad_norm"] = grad_norm if math.isfinite(grad_norm) else 0.0
        return values

    def end_epoch(self) -> None:
        """Validate, keep the best, log, advance, checkpoint, draw.

        Also called when a limit stopped the epoch early: the last weights are validated too,
        so that ``best.pth`` and the summary count them. Such a partial epoch is not advanced
        past: ``--resume`` finishes it.
        """
        cfg, progress, epoch = self.cfg, self.progress, self.progress.epoch
        stage_end = self.stage_start + self.stage.epochs
        partial = progress.batch < self.iters_per_epoch and not self.stage_over
        summary: dict[str, Any] = {"epoch": epoch + 1, "iter": progress.iteration, "stage": self.stage.name,
                                   "train_loss": distributed.mean(progress.epoch_loss) / max(progress.epoch_steps, 1)}
        if partial:
            summary["partial"] = True
        pictures = []
        early_stop = False
        if self.val_set is not None and ((epoch + 1) % cfg.eval.every == 0 or epoch + 1 == stage_end or self.stage_over or self.stop):
            distributed.sync_buffers(self.model)
            val_start = time.monotonic()
            values, pictures = validate(self.model, self.stage, self.val_set, cfg, self.device)
            self.last_val_seconds = time.monotonic() - val_start
            self.val_seconds += self.last_val_seconds
            summary.update(values)
            value = values.get(cfg.eval.metric, math.nan)
            # Only a stage that trains the heads yields a detector worth keeping; an RPN stage's
            # AP is ~0 and its val_loss sums other terms, so it neither selects nor stops.
            if any(name in FRONTEND_LOSSES for name in self.stage.losses):
                if _improved(value, progress.best_metric, cfg.eval.metric):
                    progress.best_metric, progress.best_epoch, progress.bad_evals = value, epoch + 1, 0
                    self.out.save_best(self.model, {"epoch": epoch + 1, "iteration": progress.iteration, "metrics": summary})
                else:
                    progress.bad_evals += 1
                    early_stop = 0 < cfg.eval.patience <= progress.bad_evals
        summary["time"] = time.monotonic() - self.started
        progress.history.append({k: plain(v) for k, v in summary.items()})
        self.out.epoch(summary, self.num_epochs)
        if early_stop:
            self.out.info("early stopping: %s did not improve for %d validations (best %.4f at epoch %d)",
                          cfg.eval.metric, progress.bad_evals, progress.best_metric, progress.best_epoch)
            self.stage_over = True
            if self.stage_index == len(self.stages) - 1:
                self.stop = self.stop or "early_stopping"
        if not partial:  # early stopping and a fitted length end the stage
            progress.epoch, progress.batch = (stage_end if self.stage_over else epoch + 1), 0
            progress.epoch_loss, progress.epoch_steps = 0.0, 0
        self.save_last()
        self.out.draw(pictures)
        (interrupted,) = distributed.any_rank(self.interrupt_requested)
        if interrupted:  # Ctrl-C during validation: stop here, saved
            self.stop = "interrupted"

    # ---- a stage, a resumed run -------------------------------------------------------------

    def start_stage(self, index: int) -> None:
        """What trains in stage ``index``, its optimizer (a resumed one's state), learning-rate curve."""
        cfg, state, progress, stage = self.cfg, self.state, self.progress, self.stages[index]
        self.stage_index, self.stage, self.stage_start = index, stage, self.stage_end(index) - stage.epochs
        self.params = apply_stage(self.model, stage, self.base_trainable)
        self.net = distributed.wrap(self.model, self.device)  # after apply_stage: DDP takes the trainable parameters
        self.optimizer = make_optimizer(self.params, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.solver.amp == "fp16" else None
        self.proposal_net = ProposalNet(self.model) if stage.separate_proposals else None
        if state is not None and state["stage"] == index:  # resuming inside this stage
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
            if self.proposal_net is not None and state["proposal_net"] is not None:
                self.proposal_net.load_state_dict(state["proposal_net"])
        else:
            progress.bad_evals = 0
        self.state = None
        if len(self.stages) > 1:
            self.out.info("stage %d/%d '%s': %d epochs, %d trainable tensors, losses %s", index + 1, len(self.stages),
                          stage.name, stage.epochs, len(self.params), ", ".join(stage.losses))
        s = cfg.solver
        self.lr_at = LRSchedule(self.iters_per_epoch, stage.epochs, s.schedule, s.milestones, s.gamma, s.warmup_iters, s.warmup_factor)
        if progress.stage_iters:  # fitted to the time budget (also on resume)
            at = progress.fit_anchor
            self.lr_at = dataclasses.replace(self.lr_at, total=progress.stage_iters[index],
                                             anchor=(at[1], at[2]) if at and at[0] == index else (0, 0.0))
        self.stage_over = False

    def restore(self, state: dict[str, Any]) -> None:
        """Where the checkpoint's run stood, and every process's random streams."""
        self.progress = Progress.from_state(state)
        streams = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per process
        if len(streams) == distributed.world_size():
            set_rng_state(streams[distributed.rank()])
        else:
            log.warning("the checkpoint holds the random streams of %d process(es), this run has %d: sampling "
                        "starts new streams", len(streams), distributed.world_size())
            seed_everything(self.cfg.seed + distributed.rank() + self.progress.iteration)
        if state["iters_per_epoch"] != self.iters_per_epoch:
            log.warning("an epoch had %d iterations at the checkpoint and has %d now (data, batch size or processes "
                        "changed): the position within the epoch is approximate", state["iters_per_epoch"], self.iters_per_epoch)
        self.out.info("resuming %s at epoch %d, batch %d (iteration %d)", self.out.out, self.progress.epoch + 1,
                      self.progress.batch, self.progress.iteration)

    # ---- limits and the time budget ---------------------------------------------------------

    def limit_reached(self) -> str:
        """Why the run stops after this step, or ""."""
        s = self.cfg.solver
        out_of_time = bool(s.max_minutes) and time.monotonic() - self.started >= 60 * s.max_minutes
        interrupted, out_of_time = distributed.any_rank(self.interrupt_requested, out_of_time)  # one decision for all
        if interrupted:
            return "interrupted"
        if s.max_iters and self.progress.iteration >= s.max_iters:
            return "max_iters"
        return "max_minutes" if out_of_time else ""

    def fit_to_budget(self) -> None:
        """Fit the rest of the schedule to ``solver.max_minutes``; called after every step.

        Acts at iteration ``FIT_AT`` of this process's loop and every ``REFIT_EVERY`` after: the
        pace of the training steps since the last look (validations excluded; the first steps
        pay one-time costs, so the first look starts at ``FIT_FROM``) and the validations still
        to come (timed once one has run, else ``VAL_COST`` training steps per batch) give the
        iterations that fit. Every stage's remaining planned iterations are scaled by the same
        factor (``schedules.fitted_lengths``, never beyond the plan) and the learning-rate curve
        of the current stage is re-fitted from here on (``LRSchedule.fitted``), so it stays
        continuous and still decays to its end instead of being cut off at a high rate. Steps
        that slow down as the model learns (more proposals survive) are caught by the refits.
        """
        done = self.progress.iteration - self.first_iteration
        if not self.cfg.solver.max_minutes or (done != FIT_FROM and (done < FIT_AT or (done - FIT_AT) % REFIT_EVERY)):
            return
        now = time.monotonic()
        if done == FIT_FROM or not self.pace:
            self.pace = {"done": done, "time": now, "val": self.val_seconds}
            return
        cfg, progress, index = self.cfg, self.progress, self.stage_index
        window = now - self.pace["time"] - (self.val_seconds - self.pace["val"])
        pace = window / (done - self.pace["done"])
        self.pace = {"done": done, "time": now, "val": self.val_seconds}
        # Process 0's clock decides for all, so that every process fits the same lengths.
        sec_per_iter, elapsed, val_s = distributed.from_first((pace, now - self.started, self.last_val_seconds))
        planned = [s.epochs * self.iters_per_epoch for s in self.stages]
        it = self.stage_iteration()
        remaining = planned[index] - it + sum(planned[index + 1:])
        if self.val_set is not None and not val_s:  # no validation timed yet: estimate it
            val_share = math.ceil(len(self.val_set) / distributed.world_size())  # sharded
            val_s = math.ceil(val_share / cfg.data.batch_size) * VAL_COST * sec_per_iter
        left = 60 * cfg.solver.max_minutes - elapsed - self.validations_left(it) * val_s
        fits = max(0, int(left / sec_per_iter))
        lengths = fitted_lengths(planned, index, it, min(1.0, fits / max(remaining, 1)))
        if lengths == self.stage_lengths():
            return
        before = sum(self.stage_lengths()[index:])
        progress.stage_iters = lengths
        self.lr_at = self.lr_at.fitted(it, lengths[index])
        progress.fit_anchor = [index, *self.lr_at.anchor]
        if done > FIT_AT and abs(sum(lengths[index:]) - before) < 0.05 * before:  # a small correction
            log.debug("time budget: refitted to %d iterations at %.2f s each", progress.iteration - it + sum(lengths[index:]), sec_per_iter)
            return
        self.out.info("time budget: solver.max_minutes=%g at %.2f s per iteration fits %d of the %d planned iterations "
                      "left; the learning-rate schedule is fitted to end at iteration %d instead of %d",
                      cfg.solver.max_minutes, sec_per_iter, fits, remaining,
                      progress.iteration - it + sum(lengths[index:]), progress.iteration + remaining)

    def validations_left(self, it: int) -> int:
        """Validations still to come after iteration ``it`` of the current stage: every
        ``eval.every`` epochs and at the end of each stage, with the current lengths."""
        if self.val_set is None:
            return 0
        every, ipe, count = self.cfg.eval.every, self.iters_per_epoch, 0
        for k, length in enumerate(self.stage_lengths()[self.stage_index:]):
            start = it if k == 0 else 0
            ends = range(start // ipe + 1, (length - 1) // ipe + 1)  # epochs ending before the stage's last iteration
            count += sum(1 for e in ends if e % every == 0) + 1
        return count

    # ---- where the run stands, checkpoints --------------------------------------------------

    def stage_end(self, index: int) -> int:
        """The epoch after stage ``index``."""
        return sum(s.epochs for s in self.stages[: index + 1])

    def stage_iteration(self) -> int:
        """Iterations done in the current stage."""
        return (self.progress.epoch - self.stage_start) * self.iters_per_epoch + self.progress.batch

    def seconds_left(self, it: int) -> float:
        """Time left in the run at this process's pace so far, ``it`` iterations into the stage."""
        left = sum(self.stage_lengths()[self.stage_index:]) - it  # in this and later stages
        return (time.monotonic() - self.loop_started) / (self.progress.iteration - self.first_iteration) * left

    def stage_lengths(self) -> list[int]:
        """Iterations of each stage: as planned, or as fitted to the time budget."""
        return self.progress.stage_iters or [s.epochs * self.iters_per_epoch for s in self.stages]

    def _on_sigint(self) -> None:
        self.interrupt_requested = True

    def nonfinite_loss(self, where: str, report: str | None) -> NonFiniteLossError:
        """The error for a non-finite loss in this process (``report``: its loss terms) or another."""
        reports = distributed.all_gather(report)
        if len(reports) > 1:
            reports = [f"rank {r}: {text}" for r, text in enumerate(reports) if text is not None]
        kept = f"{self.out.last} holds the last good checkpoint" if self.out.last.exists() else "no checkpoint was written yet"
        return NonFiniteLossError(f"non-finite loss at {where}: {'; '.join(reports)}. Training stopped; {kept}. "
                                  "Lower solver.lr, lengthen solver.warmup_iters or set solver.grad_clip")

    def save_last(self) -> None:
        """Write last.pth with the training state, only from finite weights."""
        assert self.optimizer is not None, "save_last before the first stage started"
        if not _finite_weights(self.model):  # the same weights, so the same answer, in every process
            raise NonFiniteLossError(f"the weights are no longer finite after iteration {self.progress.iteration}; "
                                     f"{self.out.last} was not overwritten. Lower solver.lr or set solver.grad_clip")
        # Every process keeps the mean loss of the epoch so far, so that the epoch a resumed run
        # finishes reports the mean over the processes (end_epoch) of all of its batches.
        self.progress.epoch_loss = distributed.mean(self.progress.epoch_loss)
        rng = distributed.all_gather(rng_state())
        self.out.save_last(self.model, {
            **dataclasses.asdict(self.progress),
            "stage": self.stage_index,
            "iters_per_epoch": self.iters_per_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "proposal_net": self.proposal_net.state_dict() if self.proposal_net is not None else None,
            "rng": rng,  # one entry per process
            "config": to_dict(self.cfg),
        })

    def summary(self) -> dict[str, Any]:
        p = self.progress
        return {
            "out_dir": str(self.out.out),
            "last": str(self.out.last),
            "best": str(self.out.best) if self.out.best.exists() else None,
            "metric": self.cfg.eval.metric,
            "best_metric": p.best_metric,
            "best_epoch": p.best_epoch,
            "epochs": len(p.history),
            "iterations": p.iteration,
            "stopped": self.stop or "completed",
            "history": p.history,
        }


def _with_precision(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``solver.amp`` resolved for ``device`` ("auto" becomes what the hardware does natively)."""
    try:
        amp = precision.resolve(cfg.solver.amp, device)
    except ValueError as e:
        raise ConfigError(f"solver.amp: {e}") from None
    if amp != cfg.solver.amp:
        log.info("solver.amp=%s -> %s on %s", cfg.solver.amp or '""', amp, precision.describe(device))
    return dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, amp=amp))  # config.yaml keeps the choice


def _with_classes(cfg: TrainConfig, data: CocoDataset) -> TrainConfig:
    """The model's class count, names and category ids, from the training data."""
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, num_classes=data.num_classes, class_names=tuple(data.class_names), category_ids=tuple(data.category_ids)))


@contextlib.contextmanager
def _sigint_sets(flag: Callable[[], None]) -> Iterator[None]:
    """Ctrl-C (SIGINT) calls ``flag`` instead of raising ``KeyboardInterrupt``, so that the loop
    stops where the state is whole (after a step), never between the weights' update and the
    progress counters'. Only the main thread receives signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers outlive Ctrl-C, so that the step under way can finish and the loader
    close them; the training process decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _finite_weights(model: nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())  # one sync


def _loss_report(losses: dict[str, Tensor]) -> str:
    return ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())


def _improved(value: float, best: float | None, metric: str) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value < best if metric == "val_loss" else value > best)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train a Mask R-CNN as ``cfg`` says; see the module docstring.

    Args:
        cfg: the training configuration.
        resume: continue the run in ``cfg.out_dir`` from its ``last.pth``.

    Returns:
        ``{"out_dir", "last", "best" (path or None), "metric", "best_metric", "best_epoch",
        "epochs" (completed), "iterations", "stopped" ("completed" | "early_stopping" |
        "max_iters" | "max_minutes"), "history" (epoch summaries)}``.

    Raises:
        TrainingInterrupted: Ctrl-C; last.pth holds the state at the interruption.
        NonFiniteLossError: the loss, gradient or weights became NaN/inf (last.pth is left as
            it was).
        ConfigError, DatasetError, CheckpointError: bad configuration, data or checkpoint.
    """
    cfg = check(cfg)
    device = distributed.resolve_device(cfg.device)
    with distributed.process_group(device, cfg.dist_timeout_minutes):
        return Trainer(cfg, resume, device).run()


def resume_command(config_path: str, overrides: list[str]) -> str:
    """The command line that continues this run (under torchrun: with its process counts; a
    run on several nodes repeats its own rendezvous flags on each)."""
    args = ["maskrcnn", "train", config_path, *overrides, "--resume"]
    if not distributed.launched():
        return shlex.join(args)
    per_node, world = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), distributed.world_size()
    if per_node == world:
        launch = ["torchrun", "--standalone", f"--nproc_per_node={per_node}"]
    else:  # on each node, with the run's rendezvous endpoint
        launch = ["torchrun", f"--nnodes={world // per_node}", f"--nproc_per_node={per_node}", "--rdzv-backend=c10d",
                  "--rdzv-endpoint=HOST:PORT"]
    return shlex.join([*launch, "-m", *args])


def main(config_path: str, overrides: list[str], resume: bool = False) -> int:
    """``maskrcnn train CONFIG.yaml key=value ... [--resume]``; returns the exit code (3 on
    divergence, 130 on Ctrl-C). Under torchrun only process 0 prints and logs below warnings."""
    first = distributed.rank() == 0
    if not first:
        logging.getLogger("maskrcnn").setLevel(logging.WARNING)
    cfg = load_training_config(config_path, overrides)
    try:
        result = train(cfg, resume=resume)
    except NonFiniteLossError as e:  # raised in every process alike
        if first:
            log.error("%s", e)
        return 3
    except TrainingInterrupted as e:
        if first:
            print(f"interrupted at iteration {e.iteration}; {e.last} holds it. Continue with:\n  "
                  f"{resume_command(config_path, overrides)}")
        return 130
    if first:
        best = (f"{result['metric']} {result['best_metric']:.4f} at epoch {result['best_epoch']}"
                if result["best_metric"] is not None else "no validation")
        print(f"training {result['stopped']} after {result['iterations']} iterations; best {best}; "
              f"checkpoints in {result['out_dir']}/ (last.pth{', best.pth' if result['best'] else ''})")
    return 0
