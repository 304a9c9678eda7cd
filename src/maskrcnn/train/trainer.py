"""Training: ``maskrcnn train CONFIG.yaml key=value ... [--resume]`` or ``train(TrainConfig)``.

One epoch = the training images once, in aspect-ratio grouped batches, each image flipped with
probability ``data.hflip``. Per step: forward with targets, the stage's loss terms summed
(``schedules.Stage``), backward, gradient clipping, SGD with momentum. The learning rate warms
up linearly, then follows a step or cosine curve, set every iteration. ``last.pth`` is written
at every epoch's end; what it carries to resume is ``state.py``'s.

The policies around the loop are hooks (``hooks.py``), called before and after each step, at
each epoch's end and around the run: validation and ``best.pth`` (``hooks.Validation``), early
stopping, the time budget (``budget.py``), checkpoints every ``checkpoint_every_iters`` and
what the run writes and shows (``run_output.py``). ``train(cfg, hooks=[...])`` adds others.

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
done are skipped), RNG states and each hook's state (best metric, early-stopping count, the size
metrics.jsonl is truncated to). On
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
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import precision
from ..config import ConfigError, to_dict
from ..data import DistributedGroupedBatchSampler, FlipAugmented, aspect_ratio_groups, collate
from ..data.augment import Augmented
from ..data.coco import CocoDataset
from ..model.build import build_model
from ..model.fuse import fold_batchnorm
from ..weights.checkpoint import (
    init_from_checkpoint,
    load_backbone_weights,
    load_state,
    save_checkpoint,
    with_layout_of,
)
from ..weights.safetensors_io import checkpoint_suffix
from . import distributed, run_output
from .budget import FIT_AT, VAL_COST, TimeBudget  # noqa: F401 - FIT_AT, VAL_COST: still importable from here
from .config import TrainConfig, check, load_training_config
from .datasets import build_datasets
from .hooks import EarlyStopping, EpochRecord, HookBase, PeriodicCheckpoint, StopReason, Validation
from .pretrain import pretrain_body
from .run_output import RunOutput, plain
from .schedules import (
    LRSchedule,
    ProposalNet,
    Stage,
    apply_stage,
    build_schedule,
    forward_with_proposals,
    set_train_mode,
    stage_loss,
)
from .state import Progress, hook_states, read_train_state, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)


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


@dataclasses.dataclass
class StageRun:
    """The stage being trained and what trains in it; built anew when a stage starts."""

    index: int  # in the schedule
    stage: Stage
    first_epoch: int  # the run's epoch (0-based) it starts at
    params: list[nn.Parameter]  # what trains in it
    net: nn.Module  # what the step runs: the model, or DDP around it
    optimizer: torch.optim.SGD
    scaler: torch.amp.GradScaler | None  # fp16 loss scaling
    proposal_net: ProposalNet | None  # the alternating schedule's frozen proposer
    lr_at: LRSchedule  # learning-rate factor at an iteration of the stage
    over: bool = False  # early stopping or the fitted length ended it

    @property
    def end_epoch(self) -> int:
        """The run's epoch after the stage."""
        return self.first_epoch + self.stage.epochs


class Trainer:
    """One training run: ``Trainer(cfg, resume, device, hooks).run()``; see the module docstring.

    ``hooks`` run after the trainer's own (``default_hooks``); see ``hooks.py`` for what they see.
    """

    def __init__(self, cfg: TrainConfig, resume: bool, device: torch.device, hooks: Sequence[HookBase] = ()) -> None:
        self.clock = time.monotonic  # the run's one clock: the budget, validation times, ETA and epoch times agree
        self.started = self.clock()  # solver.max_minutes counts from here
        self.device = device
        cfg = _with_precision(cfg, self.device)
        self.hooks = [*default_hooks(cfg), *hooks]
        names = [type(h).__name__ for h in self.hooks]
        if len(set(names)) < len(names):
            raise ValueError(f"one hook per class, as last.pth keeps their states by class name: {names}")
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.model.backbone.sync_bn and distributed.launched() and device.type != "cuda":
            raise ConfigError(
                "model.backbone.sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU implementation)"
            )
        self.out = Path(cfg.out_dir)
        self.suffix = checkpoint_suffix(cfg.checkpoint_format)  # .pth or .safetensors
        saved = read_train_state(self.out, resume, cfg.exist_ok, self.suffix)
        seed_everything(cfg.seed)

        # Data first: its categories size the class heads.
        with distributed.first_rank_first():  # a generated dataset is written once
            train_full, self.train_data, self.val_data = build_datasets(cfg)
        self.cfg = cfg = _with_classes(cfg, train_full)
        if cfg.init.weights:  # its layers decide the layout (e.g. torchvision v2's BatchNorm heads)
            self.cfg = cfg = dataclasses.replace(cfg, model=with_layout_of(cfg.model, cfg.init.weights))
        self.model = build_model(cfg.model)
        # Frozen BatchNorms run inside their convolutions' weights (model/fuse.py): the same
        # gradients up to rounding, two feature-map passes fewer per norm and step.
        fold_batchnorm(self.model)
        if distributed.world_size() > 1:  # the same initial weights, then each process samples from its own streams
            seed_everything(cfg.seed + distributed.rank())
        self.base_trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if saved is not None:
            load_state(self.model, saved["model"], str(self.checkpoint("last")))
        else:
            if cfg.model.backbone.weights:
                load_backbone_weights(self.model.backbone.body, cfg.model.backbone.weights)
            if cfg.init.weights:
                init_from_checkpoint(self.model, cfg.init.weights, cfg.model.backbone.bn_eps)
        self.model.to(self.device)
        self.resumed = (
            saved["train_state"] if saved is not None else None
        )  # its optimizer is consumed when its stage starts
        if self.val_data is None:
            log.warning("no validation data (data.val_ann): no AP, no best.pth, no early stopping")

        self.stages = build_schedule(cfg.schedule.kind, cfg.solver.epochs, cfg.schedule.stage_epochs)
        self.sampler = DistributedGroupedBatchSampler(
            aspect_ratio_groups(self.train_data),
            cfg.data.batch_size,
            cfg.seed,
            distributed.rank(),
            distributed.world_size(),
        )
        self.iters_per_epoch = self.sampler.batches_per_epoch
        self.augmented = (
            Augmented(self.train_data, cfg.augment, cfg.data.hflip, cfg.seed)
            if cfg.augment.enabled
            else FlipAugmented(self.train_data, cfg.data.hflip, cfg.seed)
        )
        self.progress = Progress()
        self.current: StageRun | None = None  # run_stage sets it
        self.lr = 0.0  # the learning rate of the step under way (or the last one)
        self.record: EpochRecord | None = None  # the epoch that just ended, while its after_epoch hooks run
        self.stop: StopReason | None = None  # what ends the run early; hooks set it
        self.interrupt_requested = False  # Ctrl-C seen; acted on at the end of the step

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Restore a resumed run, pretrain the body (a fresh run that asks for it), then the
        stages; returns ``train``'s summary."""
        if self.resumed is not None:
            self.restore(self.resumed)
        self.call("before_train")
        try:
            if self.resumed is None and self.cfg.pretrain.epochs > 0:
                self.pretrain()
            self.info(
                "training %s: %d stage(s), %d epochs of %d iterations, device %s",
                self.out,
                len(self.stages),
                self.num_epochs,
                self.iters_per_epoch,
                self.device,
            )
            with logging_redirect_tqdm(), _sigint_sets(self._on_sigint):
                try:
                    for index in range(len(self.stages)):
                        if self.stop is None and self.progress.epoch < self.stage_end(index):
                            self.run_stage(index)
                except KeyboardInterrupt:  # raised rather than signalled (the handler turns Ctrl-C into a flag)
                    if distributed.world_size() > 1:
                        raise  # one process alone cannot save: the others are inside a step
                    self.stop = StopReason.INTERRUPTED
            if self.stop is StopReason.INTERRUPTED:
                if self.current is not None:  # else no step was taken: nothing new to save
                    self.save_last()
                raise TrainingInterrupted(self.iteration, self.checkpoint("last"))
        finally:
            self.call("after_train")
        return self.summary()

    def run_stage(self, index: int) -> None:
        """Train stage ``index`` from ``progress.epoch`` to its end, early stopping or a stop."""
        self.start_stage(index)
        while self.progress.epoch < self.current.end_epoch and not self.current.over and self.stop is None:
            self.train_epoch()
            if self.stop is not StopReason.INTERRUPTED:
                self.end_epoch()

    def train_epoch(self) -> None:
        """The rest of epoch ``progress.epoch`` from batch ``progress.batch``; ends early at the
        stage's fitted length or at a stop."""
        cfg, progress, current, epoch = self.cfg, self.progress, self.current, self.progress.epoch
        self.sampler.set_epoch(epoch, start=progress.batch)
        self.augmented.epoch = epoch
        loader = DataLoader(
            self.augmented,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=cfg.data.workers,
            generator=torch.Generator().manual_seed(cfg.seed + epoch),
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_sigint,
        )
        set_train_mode(self.model)
        for images, targets, _ in loader:
            it = self.stage_iteration()
            self.lr = cfg.solver.lr * current.lr_at(it)
            self.call("before_step")
            losses = self.step(images, targets)
            progress.advance(losses["loss"])
            self.call("after_step", losses)  # the time budget may stop the run
            (interrupted,) = distributed.any_rank(self.interrupt_requested)  # one decision for all
            if interrupted:
                self.stop = StopReason.INTERRUPTED
            elif cfg.solver.max_iters and progress.iteration >= cfg.solver.max_iters:
                self.stop = StopReason.MAX_ITERS
            current.over = it + 1 >= self.stage_lengths()[current.index]
            if self.stop is not None or current.over:
                break

    def end_epoch(self) -> None:
        """The epoch's record, the ``after_epoch`` hooks (validation, best checkpoint, early
        stopping, output), then on to the next epoch, saved in ``last.pth``.

        Also called when a stop ended the epoch early: the last weights are validated too, so
        that ``best.pth`` and the summary count them. Such a partial epoch is not advanced past:
        ``--resume`` finishes it.
        """
        progress, current = self.progress, self.current
        partial = progress.batch < self.iters_per_epoch and not current.over
        self.record = EpochRecord(
            {
                "epoch": progress.epoch + 1,
                "iter": progress.iteration,
                "stage": current.stage.name,
                "train_loss": distributed.mean(progress.epoch_loss) / max(progress.epoch_steps, 1),
            }
        )
        if partial:
            self.record.values["partial"] = True
        self.call("after_epoch")
        progress.history.append({k: plain(v) for k, v in self.record.values.items()})
        self.record = None
        if not partial:  # early stopping and a fitted length end the stage
            progress.epoch, progress.batch = (current.end_epoch if current.over else progress.epoch + 1), 0
            progress.epoch_loss, progress.epoch_steps = 0.0, 0
        self.save_last()
        (interrupted,) = distributed.any_rank(self.interrupt_requested)
        if interrupted:  # Ctrl-C during validation: stop here, saved
            self.stop = StopReason.INTERRUPTED

    def checkpoint(self, name: str) -> Path:
        """The run folder's checkpoint ``name`` (last, best, pretrain_body) in ``checkpoint_format``."""
        return self.out / f"{name}{self.suffix}"

    def call(self, event: str, *args: Any) -> None:
        """Every hook's method ``event`` (a ``HookBase`` method name), in order."""
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def step(self, images: list[Tensor], targets: list[Any]) -> dict[str, float]:
        """One optimizer step at ``self.lr``; returns the loss values and gradient norm. Raises on NaN/inf."""
        cfg, current, progress = self.cfg, self.current, self.progress
        stage, optimizer, scaler = current.stage, current.optimizer, current.scaler
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [t.to(self.device) for t in targets]
        with precision.autocast(self.device, cfg.solver.amp):
            if current.proposal_net is not None:
                output = forward_with_proposals(current.net, current.proposal_net, images, targets)
            else:
                output = current.net(images, targets)
        losses = {k: v.float() for k, v in output.losses.items() if k in stage.losses}
        loss = stage_loss(stage, losses)
        where = f"iteration {progress.iteration + 1} (epoch {progress.epoch + 1}, batch {progress.batch + 1}, stage '{stage.name}')"
        finite = bool(torch.isfinite(loss))
        (anywhere,) = distributed.any_rank(not finite)
        if anywhere:  # decided in every process before any backward, so that none waits for the others' gradients
            raise self.nonfinite_loss(where, None if finite else _loss_report(losses))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(current.params, cfg.solver.grad_clip or math.inf))
        if scaler is not None:  # skips the step itself when the fp16 gradients overflowed
            scaler.step(optimizer)
            scaler.update()
        elif not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm at {where} (losses: {_loss_report(losses)}); no step taken, "
                f"{self.checkpoint('last')} left as it was. Set solver.grad_clip or lower solver.lr"
            )
        else:
            optimizer.step()
        values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}
        values["grad_norm"] = grad_norm if math.isfinite(grad_norm) else 0.0
        return values

    # ---- a stage, a resumed run, pretraining ------------------------------------------------

    def start_stage(self, index: int) -> None:
        """What trains in stage ``index``, its optimizer (a resumed one's state), learning-rate curve."""
        cfg, saved, stage = self.cfg, self.resumed, self.stages[index]
        params = apply_stage(self.model, stage, self.base_trainable)
        net = distributed.wrap(self.model, self.device)  # after apply_stage: DDP takes the trainable parameters
        optimizer = make_optimizer(params, cfg)
        scaler = torch.amp.GradScaler("cuda") if cfg.solver.amp == "fp16" else None
        proposal_net = ProposalNet(self.model) if stage.separate_proposals else None
        if saved is not None and saved["stage"] == index:  # resuming inside this stage
            optimizer.load_state_dict(saved["optimizer"])
            if scaler is not None and saved["scaler"]:
                scaler.load_state_dict(saved["scaler"])
            if proposal_net is not None and saved["proposal_net"] is not None:
                proposal_net.load_state_dict(saved["proposal_net"])
        self.resumed = None
        if len(self.stages) > 1:
            self.info(
                "stage %d/%d '%s': %d epochs, %d trainable tensors, losses %s",
                index + 1,
                len(self.stages),
                stage.name,
                stage.epochs,
                len(params),
                ", ".join(stage.losses),
            )
        s, at = cfg.solver, self.progress.fit_anchor
        lr_at = LRSchedule(
            self.iters_per_epoch, stage.epochs, s.schedule, s.milestones, s.gamma, s.warmup_iters, s.warmup_factor
        )
        if self.progress.stage_iters:  # fitted to the time budget (also on resume)
            lr_at = dataclasses.replace(
                lr_at,
                total=self.progress.stage_iters[index],
                anchor=(at[1], at[2]) if at and at[0] == index else (0, 0.0),
            )
        self.current = StageRun(
            index, stage, self.stage_end(index) - stage.epochs, params, net, optimizer, scaler, proposal_net, lr_at
        )

    def restore(self, state: dict[str, Any]) -> None:
        """Where the checkpoint's run stood, every process's random streams, the hooks' states."""
        self.progress = Progress.from_state(state)
        streams = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per process
        if len(streams) == distributed.world_size():
            set_rng_state(streams[distributed.rank()])
        else:
            log.warning(
                "the checkpoint holds the random streams of %d process(es), this run has %d: sampling "
                "starts new streams",
                len(streams),
                distributed.world_size(),
            )
            seed_everything(self.cfg.seed + distributed.rank() + self.progress.iteration)
        if state["iters_per_epoch"] != self.iters_per_epoch:
            log.warning(
                "an epoch had %d iterations at the checkpoint and has %d now (data, batch size or processes "
                "changed): the position within the epoch is approximate",
                state["iters_per_epoch"],
                self.iters_per_epoch,
            )
        saved = hook_states(state)
        for hook in self.hooks:
            hook.load_state_dict(saved.get(type(hook).__name__, {}))
        self.info(
            "resuming %s at epoch %d, batch %d (iteration %d)",
            self.out,
            self.progress.epoch + 1,
            self.progress.batch,
            self.progress.iteration,
        )

    def pretrain(self) -> None:
        """The body pretrained as a crop classifier (``pretrain.py``), its epochs in metrics.jsonl."""
        cfg, t = self.cfg, self.cfg.model.transform
        output = next(h for h in self.hooks if isinstance(h, RunOutput))
        pretrain_body(
            self.model.backbone.body,
            cfg.model.backbone.name,
            cfg.model.backbone.bn_eps,
            self.train_data,
            cfg.model.num_classes,
            cfg.pretrain,
            t.image_mean,
            t.image_std,
            self.device,
            cfg.seed,
            output.progress,
            output.log,
        )
        if distributed.rank() == 0:
            save_checkpoint(self.checkpoint("pretrain_body"), self.model)

    # ---- where the run stands, checkpoints --------------------------------------------------

    @property
    def iteration(self) -> int:
        """Optimizer steps done."""
        return self.progress.iteration

    @property
    def num_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def stage_end(self, index: int) -> int:
        """The epoch after stage ``index``."""
        return sum(s.epochs for s in self.stages[: index + 1])

    def stage_iteration(self) -> int:
        """Iterations done in the current stage."""
        return (self.progress.epoch - self.current.first_epoch) * self.iters_per_epoch + self.progress.batch

    def stage_lengths(self) -> list[int]:
        """Iterations of each stage: as planned, or as fitted to the time budget."""
        return self.progress.stage_iters or [s.epochs * self.iters_per_epoch for s in self.stages]

    def fit_stages(self, lengths: list[int]) -> None:
        """Shorten the stages to ``lengths`` iterations (``budget.TimeBudget``): the current
        stage's learning-rate curve is re-fitted from here to its new end (``LRSchedule.fitted``)."""
        current, it = self.current, self.stage_iteration()
        self.progress.stage_iters = lengths
        current.lr_at = current.lr_at.fitted(it, lengths[current.index])
        self.progress.fit_anchor = [current.index, *current.lr_at.anchor]

    def info(self, message: str, *args: Any) -> None:
        """A line of the run's log (from the first process only)."""
        run_output.info(message, *args)

    def _on_sigint(self) -> None:
        self.interrupt_requested = True

    def nonfinite_loss(self, where: str, report: str | None) -> NonFiniteLossError:
        """The error for a non-finite loss in this process (``report``: its loss terms) or another."""
        reports = distributed.all_gather(report)
        if len(reports) > 1:
            reports = [f"rank {r}: {text}" for r, text in enumerate(reports) if text is not None]
        last = self.checkpoint("last")
        kept = f"{last} holds the last good checkpoint" if last.exists() else "no checkpoint was written yet"
        return NonFiniteLossError(
            f"non-finite loss at {where}: {'; '.join(reports)}. Training stopped; {kept}. "
            "Lower solver.lr, lengthen solver.warmup_iters or set solver.grad_clip"
        )

    def save_last(self) -> None:
        """Write last.pth with the training state and the hooks', only from finite weights."""
        current, last = self.current, self.checkpoint("last")
        assert current is not None, "save_last before the first stage started"
        if not _finite_weights(self.model):  # the same weights, so the same answer, in every process
            raise NonFiniteLossError(
                f"the weights are no longer finite after iteration {self.iteration}; "
                f"{last} was not overwritten. Lower solver.lr or set solver.grad_clip"
            )
        # Every process keeps the mean loss of the epoch so far, so that the epoch a resumed run
        # finishes reports the mean over the processes (end_epoch) of all of its batches.
        self.progress.epoch_loss = distributed.mean(self.progress.epoch_loss)
        rng = distributed.all_gather(rng_state())
        if distributed.rank() == 0:
            save_checkpoint(
                last,
                self.model,
                {
                    **dataclasses.asdict(self.progress),
                    "stage": current.index,
                    "iters_per_epoch": self.iters_per_epoch,
                    "optimizer": current.optimizer.state_dict(),
                    "scaler": current.scaler.state_dict() if current.scaler is not None else None,
                    "proposal_net": current.proposal_net.state_dict() if current.proposal_net is not None else None,
                    "rng": rng,  # one entry per process
                    "config": to_dict(self.cfg),
                    "hooks": {type(h).__name__: h.state_dict() for h in self.hooks},
                },
            )

    def summary(self) -> dict[str, Any]:
        p, best = self.progress, next(h for h in self.hooks if isinstance(h, Validation))
        return {
            "out_dir": str(self.out),
            "last": str(self.checkpoint("last")),
            "best": str(self.checkpoint("best")) if (self.checkpoint("best")).exists() else None,
            "metric": self.cfg.eval.metric,
            "best_metric": best.best_metric,
            "best_epoch": best.best_epoch,
            "epochs": len(p.history),
            "iterations": p.iteration,
            "stopped": self.stop.value if self.stop is not None else "completed",
            "history": p.history,
        }


def default_hooks(cfg: TrainConfig) -> list[HookBase]:
    """The trainer's own hooks, in the order they must run (see ``hooks.py``), and those the
    config asks for (``log.tensorboard``: ``tensorboard.TensorBoardHook``, process 0 only)."""
    extra: list[HookBase] = []
    if cfg.log.tensorboard and distributed.rank() == 0:
        from .tensorboard import TensorBoardHook  # needs the tensorboard package: imported only when asked

        extra.append(TensorBoardHook(cfg.log.tb_images, cfg.log.tb_score))
    return [
        TimeBudget(cfg.solver.max_minutes),  # before Validation: it times it
        Validation(cfg.eval.every, cfg.eval.metric),
        RunOutput(cfg.out_dir, active=distributed.rank() == 0, progress=cfg.progress, log_every=cfg.log_every),
        EarlyStopping(cfg.eval.metric, cfg.eval.patience),  # after RunOutput: its line follows the epoch's
        PeriodicCheckpoint(cfg.checkpoint_every_iters),
        *extra,
    ]


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
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model,
            num_classes=data.num_classes,
            class_names=tuple(data.class_names),
            category_ids=tuple(data.category_ids),
        ),
    )


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


def train(cfg: TrainConfig, resume: bool = False, hooks: Sequence[HookBase] = ()) -> dict[str, Any]:
    """Train a Mask R-CNN as ``cfg`` says; see the module docstring.

    Args:
        cfg: the training configuration.
        resume: continue the run in ``cfg.out_dir`` from its ``last.pth``.
        hooks: more ``hooks.HookBase`` policies (e.g. a metrics writer), called after the
            trainer's own; one per class. Their states are saved in ``last.pth`` and restored
            on resume.

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
        try:
            return Trainer(cfg, resume, device, hooks).run()
        except BaseException as e:
            # The traceback's frames hold the trainer and its DistributedDataParallel. Left so,
            # the reducer outlives the process group it is leaving, and Gloo can abort the
            # process at exit (a SIGABRT after a NaN stop, seen once in CI). Clearing the
            # frames' locals frees both before the group goes.
            traceback.clear_frames(e.__traceback__)
            raise


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
        launch = [
            "torchrun",
            f"--nnodes={world // per_node}",
            f"--nproc_per_node={per_node}",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=HOST:PORT",
        ]
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
            print(
                f"interrupted at iteration {e.iteration}; {e.last} holds it. Continue with:\n  "
                f"{resume_command(config_path, overrides)}"
            )
        return 130
    if first:
        best = (
            f"{result['metric']} {result['best_metric']:.4f} at epoch {result['best_epoch']}"
            if result["best_metric"] is not None
            else "no validation"
        )
        print(
            f"training {result['stopped']} after {result['iterations']} iterations; best {best}; "
            f"checkpoints in {result['out_dir']}/ ({Path(result['last']).name}"
            f"{', ' + Path(result['best']).name if result['best'] else ''})"
        )
    return 0
