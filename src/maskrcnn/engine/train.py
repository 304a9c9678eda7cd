"""Training: ``maskrcnn train CONFIG.yaml key=value ... [--resume]`` or ``train(TrainConfig)``.

One epoch = the training images once, in aspect-ratio grouped batches, each image flipped with
probability ``data.hflip``. Per step: forward with targets, the stage's loss terms summed
(``schedules.Stage``), backward, gradient clipping, SGD with momentum. The learning rate warms
up linearly, then follows a step or cosine curve, set every iteration.

After every epoch (or every ``eval.every``): one pass over the validation set in eval mode
with targets gives both the validation losses and the detections, which give COCO box and mask
AP. The run folder ``out_dir`` receives:

    config.yaml           the resolved configuration (classes filled in from the data)
    last.pth              weights + training state, every epoch and every checkpoint_every_iters
    best.pth              weights of the epoch with the best ``eval.metric``
    metrics.jsonl         one line per ``log_every`` iterations (mean losses, lr, s/iter) and
                          one per epoch (train loss, validation losses and AP)
    metrics.png           loss and AP curves (``visualize.plot_metrics``)
    val_predictions.png   detections on the first validation images
    pretrain_body.pth     the pretrained body, when ``pretrain.epochs > 0``

Checkpoints are written atomically and only with finite weights; a non-finite loss stops the
run with ``NonFiniteLossError`` and leaves the last good ``last.pth`` in place. ``resume=True``
continues from ``last.pth``: weights, optimizer, iteration, position in the epoch (the epoch's
batch order is regenerated from ``seed + epoch`` and the batches already done are skipped),
RNG states, best metric and metrics.jsonl (truncated to the checkpoint). On the CPU a resumed
run ends with the same weights as an uninterrupted one, whatever ``data.workers``: flips draw
from per-image seeds, and validation restores the RNG states it consumed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import precision
from ..checkpoint import FORMAT, CheckpointError, load_state, read_file, save_checkpoint
from ..config import ConfigError, to_dict
from ..data import CocoDataset, GroupedBatchSampler, RandomHorizontalFlip, aspect_ratio_groups, collate, ensure_dataset
from ..model.build import build_model
from ..model.mask_rcnn import MaskRCNN
from ..results import Result
from ..torchvision_compat import convert_keys, is_torchvision_state_dict
from .evaluate import coco_evaluate, flatten_metrics
from .inference import label_to_category
from .pretrain import pretrain_body
from .schedules import FRONTEND_LOSSES, LRSchedule, ProposalNet, Stage, apply_stage, build_schedule, forward_with_proposals, set_train_mode, stage_loss
from .train_config import TrainConfig, check, load_training_config

log = logging.getLogger(__name__)

# Layers whose shape depends on the number of classes: re-initialised when a checkpoint to
# start from was trained on another class count ("new class heads").
CLASS_HEADS = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.", "roi_heads.mask_predictor.mask_fcn_logits.")


# Fitting the schedule to solver.max_minutes: the pace of iterations FIT_FROM..FIT_AT of a run
# (the first ones pay one-time costs), and a validation batch costing VAL_COST training steps
# (measured on the demo: forward with losses, detection and pasting, no backward).
FIT_FROM, FIT_AT, VAL_COST = 5, 25, 0.5


class NonFiniteLossError(RuntimeError):
    """The loss, the gradient or the weights became NaN or infinite; training stopped."""


# ----------------------------------------------------------------------------------------
# Data


class FlipAugmented(Dataset):
    """``dataset`` with each image flipped left-right with probability ``p``.

    The coin for image ``i`` in epoch ``epoch`` is drawn from its own generator seeded with
    (seed, epoch, i), so augmentation is the same whichever worker loads the image and
    wherever a resumed run restarts.
    """

    def __init__(self, dataset: Dataset, p: float, seed: int) -> None:
        self.dataset, self.p, self.seed, self.epoch = dataset, p, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        image, targets, info = self.dataset[i]
        if self.p > 0:
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**63)
            image, targets = RandomHorizontalFlip(self.p, generator=g)(image, targets)
        return image, targets, info


def _first(dataset: CocoDataset, n: int) -> Dataset:
    return Subset(dataset, range(n)) if 0 < n < len(dataset) else dataset


def build_datasets(cfg: TrainConfig) -> tuple[CocoDataset, Dataset, Dataset | None]:
    """(full training CocoDataset, training subset used, validation subset or None)."""
    d = cfg.data
    train_ann, train_images, val_ann, val_images = d.train_ann, d.train_images, d.val_ann, d.val_images
    if d.synthetic:
        paths = ensure_dataset(d.synthetic, d.synthetic_dir, num_train=d.synthetic_train, num_val=d.synthetic_val,
                               image_size=tuple(d.synthetic_size))
        train_ann, train_images = str(paths["train"].ann_file), str(paths["train"].image_dir)
        val_ann, val_images = str(paths["val"].ann_file), str(paths["val"].image_dir)
    train = CocoDataset(train_ann, train_images, allow_outside_root=d.allow_outside_root)
    val = CocoDataset(val_ann, val_images, category_ids=train.category_ids, allow_outside_root=d.allow_outside_root) if val_ann else None
    for dataset, first in ((train, d.max_train_images), (val, cfg.eval.max_images)):
        if dataset is not None:  # every image file now, not when its batch comes up
            dataset.validate(decode=False, first=first)
    log.info("training data: %r", train)
    if val is not None:
        log.info("validation data: %r", val)
    return train, _first(train, d.max_train_images), (_first(val, cfg.eval.max_images) if val is not None else None)


def _base(dataset: Dataset) -> tuple[CocoDataset, list[int]]:
    """The CocoDataset under a Subset and the indices used."""
    if isinstance(dataset, Subset):
        return dataset.dataset, list(dataset.indices)  # type: ignore[return-value]
    return dataset, list(range(len(dataset)))  # type: ignore[arg-type, return-value]


def epoch_batches(num_images: int, groups: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation drawn from ``seed`` and ``epoch`` only, grouped
    by aspect ratio. Regenerating it is how a resumed run finds its place in the epoch."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_images, generator=g).tolist()
    return list(GroupedBatchSampler(order, groups, batch_size))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------
# Model, optimizer, RNG


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    return device


def init_from_checkpoint(model: MaskRCNN, path: str | Path, bn_eps: float) -> list[str]:
    """Load our or a torchvision checkpoint into ``model`` to start training from it.

    Class-specific layers (``CLASS_HEADS``) whose shape differs (another class count) keep
    their fresh initialisation. Returns the names of those re-initialised tensors.
    """
    obj = read_file(path)
    if obj.get("format") == FORMAT:
        state = dict(obj["model"])
    else:
        state = obj["model"] if isinstance(obj.get("model"), dict) else obj
        if not is_torchvision_state_dict(state):
            raise CheckpointError(f"{path}: neither a maskrcnn checkpoint nor a torchvision Mask R-CNN state dict")
        state = convert_keys(state)
        if bn_eps != 0.0:
            log.warning("%s is a torchvision file; its COCO weights were trained with BatchNorm eps 0 "
                        "(model.backbone.bn_eps=0.0 reproduces its features exactly)", path)
    own = model.state_dict()
    heads = [k for k in own if k.startswith(CLASS_HEADS)]
    reinit = []
    if any(k in state and state[k].shape != own[k].shape for k in heads):
        reinit = heads
        state.update({k: own[k] for k in heads})
        log.info("new class heads: %s re-initialised for %d classes", ", ".join(sorted({k.rsplit(".", 1)[0] for k in heads})), model.config.num_classes)
    for k in own:  # trainable BatchNorm counts steps; checkpoints of a frozen one have no counter
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    load_state(model, state, str(path))
    log.info("initialised from %s", path)
    return reinit


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the training step draws from (the model's sampling: torch; the random
    training scale: Python), as plain values and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Validation samples anchors and RoIs for its losses; keep that off the training streams."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _finite_weights(model: nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())  # one sync


def _plain(value: Any) -> Any:
    """JSON-ready: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------------------
# Metrics file


class MetricsLog:
    """Append-only JSON-lines file; ``size`` is recorded in checkpoints so a resumed run can
    drop the lines written after its checkpoint."""

    def __init__(self, path: Path, truncate_to: int | None) -> None:
        self.path = path
        if truncate_to is None:
            path.write_text("")
        else:
            with open(path, "a+b") as f:
                f.truncate(min(truncate_to, f.seek(0, 2)))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    @property
    def size(self) -> int:
        return self.path.stat().st_size


# ----------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validate(
    model: MaskRCNN, stage: Stage, dataset: Dataset, cfg: TrainConfig, device: torch.device
) -> tuple[dict[str, float], list[Result]]:
    """Validation losses and COCO AP in one pass: eval mode with targets gives both the losses
    and the detections (``coco_results`` would run the images a second time for the latter).

    Returns:
        ``{"val_loss": sum of the stage's terms, "val_loss_<term>": ..., "bbox_AP": ...,
        "segm_AP": ...}`` and ``Result``s (with pixels) of the first ``eval.num_visualize`` images.
    """
    coco_ds, indices = _base(dataset)
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, collate_fn=collate, num_workers=cfg.data.workers)
    table = label_to_category(model)
    names = model.config.label_names()
    mask_thresh = model.config.roi_heads.mask_thresh
    sums: dict[str, float] = {}
    batches, entries, pictures = 0, [], []
    model.eval()
    with preserved_rng():
        for images, targets, infos in tqdm(loader, desc="validate", unit="batch", leave=False, disable=not cfg.progress):
            with precision.autocast(device, cfg.solver.amp):
                out = model([im.to(device) for im in images], [t.to(device) for t in targets], mask_threshold=mask_thresh)
            losses = {k: float(v) for k, v in out.losses.items()}
            losses["loss"] = float(stage_loss(stage, out.losses))
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
            for image, info, det in zip(images, infos, out.detections or []):
                result = Result.from_detections(det, info["orig_size"], class_names=names)
                entries.extend(result.to_coco(info["image_id"], table))
                if len(pictures) < cfg.eval.num_visualize:
                    result.image = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
                    pictures.append(result[result.scores >= cfg.eval.visualize_score])
    metrics = {"val_" + k: v / max(batches, 1) for k, v in sums.items()}
    iou_types = ("bbox", "segm") if model.config.masks else ("bbox",)
    image_ids = [coco_ds.image_ids[i] for i in indices]
    metrics.update(flatten_metrics(coco_evaluate(coco_ds.coco, entries, iou_types=iou_types, image_ids=image_ids)))
    return metrics, pictures


def _draw_outputs(out: Path, metrics_path: Path, pictures: list[Result]) -> None:
    """Plots are a convenience: a failure is logged, never fatal."""
    from ..visualize import draw_grid, plot_metrics

    try:
        plot_metrics(metrics_path, out / "metrics.png")
        if pictures:
            draw_grid(pictures, out / "val_predictions.png")
    except Exception as e:  # noqa: BLE001
        log.warning("could not draw the training plots: %s: %s", type(e).__name__, e)


# ----------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class Progress:
    """Where training stands; saved in every checkpoint's ``train_state``."""

    epoch: int = 0  # next epoch to run (0-based, over all stages)
    batch: int = 0  # batches of that epoch already done
    iteration: int = 0  # optimizer steps done in all
    best_metric: float | None = None  # best value of eval.metric so far
    best_epoch: int = 0  # 1-based epoch of best_metric
    bad_evals: int = 0  # validations since the last improvement, in the current stage
    history: list = dataclasses.field(default_factory=list)  # epoch summaries
    epoch_loss: float = 0.0  # sum of the training loss over the batches of this epoch done so far
    epoch_steps: int = 0  # those batches (a resumed epoch reports its loss over all of them)
    stage_iters: list = dataclasses.field(default_factory=list)  # iterations of each stage, fitted to solver.max_minutes ([] = as planned)
    fit_anchor: list = dataclasses.field(default_factory=list)  # [stage, iteration, position]: where the fitted learning-rate curve starts


class _Stop(Exception):
    """Raised at the end of the loop's last validation when max_iters / max_minutes is reached."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_SHORT = {"loss_objectness": "obj", "loss_rpn_box_reg": "rpn_box", "loss_classifier": "cls", "loss_box_reg": "box", "loss_mask": "mask"}


def _postfix(window: dict[str, float], n: int, lr: float, eta_s: float) -> str:
    """Progress-bar text: mean losses of the logging window, learning rate, time left in the run."""
    terms = " ".join(f"{_SHORT.get(k, k)} {v / n:.3f}" for k, v in window.items() if k.startswith("loss_"))
    eta = time.strftime("%H:%M:%S", time.gmtime(eta_s)) if math.isfinite(eta_s) else "?"
    return f"loss {window['loss'] / n:.3f} ({terms}) lr {lr:.2g} run eta {eta}"


def _loss_report(losses: dict[str, Tensor]) -> str:
    return ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())


def _improved(value: float, best: float | None, metric: str) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value < best if metric == "val_loss" else value > best)


class Trainer:
    """The state of one training run; ``train()`` builds it and calls ``run()``."""

    def __init__(self, cfg: TrainConfig, resume: bool) -> None:
        self.started = time.monotonic()
        self.out = Path(cfg.out_dir)
        self.last_path, self.best_path = self.out / "last.pth", self.out / "best.pth"
        saved = None
        if resume:
            saved = read_file(self.last_path) if self.last_path.is_file() else None
            if saved is None or "train_state" not in saved:
                raise ConfigError(f"nothing to resume: {self.last_path} is missing or holds no training state")
        elif self.last_path.exists() and not cfg.exist_ok:
            raise ConfigError(f"{self.out} already holds a run (last.pth); use --resume to continue it, "
                              f"exist_ok=true to start it afresh, or another out_dir=...")
        self.device = resolve_device(cfg.device)
        try:
            amp = precision.resolve(cfg.solver.amp, self.device, training=True)
        except ValueError as e:
            raise ConfigError(f"solver.amp: {e}") from None
        if amp != cfg.solver.amp:
            log.info("solver.amp=%s -> %s on %s", cfg.solver.amp or '""', amp, precision.describe(self.device))
        cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, amp=amp))  # config.yaml keeps the choice
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)

        # Data first: its categories size the class heads.
        train_full, self.train_set, self.val_set = build_datasets(cfg)
        self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, num_classes=train_full.num_classes, class_names=tuple(train_full.class_names),
            category_ids=tuple(train_full.category_ids)))
        (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if self.val_set is None:
            log.warning("no validation data (data.val_ann): no AP, no best.pth, no early stopping")

        self.model = build_model(cfg.model)
        self.base_trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if saved is None and cfg.init.weights:
            init_from_checkpoint(self.model, cfg.init.weights, cfg.model.backbone.bn_eps)
        if saved is not None:
            load_state(self.model, saved["model"], str(self.last_path))
        self.model.to(self.device)
        self.state = saved["train_state"] if saved is not None else None  # consumed when its stage starts
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.state["metrics_bytes"] if self.state else None)

        self.stages = build_schedule(cfg.schedule.kind, cfg.solver.epochs, cfg.schedule.stage_epochs)
        self.num_epochs = sum(s.epochs for s in self.stages)
        self.groups = aspect_ratio_groups(self.train_set)
        self.iters_per_epoch = len(GroupedBatchSampler(range(len(self.train_set)), self.groups, cfg.data.batch_size))  # type: ignore[arg-type]
        self.augmented = FlipAugmented(self.train_set, cfg.data.hflip, cfg.seed)
        self.progress = Progress()
        self.stop_reason = ""  # max_iters / max_minutes reached: validate, save, then stop
        self.stage_done = False  # the stage reached its fitted length inside an epoch
        self.pace: dict[int, float] = {}  # iteration -> time, for fitting the schedule to max_minutes

    # ---- the run --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        if state is None and cfg.pretrain.epochs > 0:
            t = cfg.model.transform
            pretrain_body(self.model.backbone.body, cfg.model.backbone.name, cfg.model.backbone.bn_eps, self.train_set,
                          cfg.model.num_classes, cfg.pretrain, t.image_mean, t.image_std, self.device, cfg.seed,
                          cfg.progress, self.metrics.write)
            save_checkpoint(self.out / "pretrain_body.pth", self.model)
        if state is not None:
            self.progress = Progress(**{f.name: state[f.name] for f in dataclasses.fields(Progress)})
            set_rng_state(state["rng"])
            if state["iters_per_epoch"] != self.iters_per_epoch:
                log.warning("an epoch had %d iterations at the checkpoint and has %d now (data or batch size changed): "
                            "the position within the epoch is approximate", state["iters_per_epoch"], self.iters_per_epoch)
            log.info("resuming %s at epoch %d, batch %d (iteration %d)", self.out, self.progress.epoch + 1,
                     self.progress.batch, self.progress.iteration)
        log.info("training %s: %d stage(s), %d epochs of %d iterations, device %s", self.out, len(self.stages),
                 self.num_epochs, self.iters_per_epoch, self.device)
        self.first_iteration, self.loop_started = self.progress.iteration, time.monotonic()
        stopped = "completed"
        with logging_redirect_tqdm():
            stage_start = 0
            for index, stage in enumerate(self.stages):
                stage_end = stage_start + stage.epochs
                if self.progress.epoch < stage_end:
                    try:
                        stopped = self.run_stage(index, stage, stage_start)
                    except _Stop as stop:
                        stopped = stop.reason
                        log.info("stopped (%s) at iteration %d; --resume continues from %s",
                                 stopped, self.progress.iteration, self.last_path)
                        break
                stage_start = stage_end
        return self.summary(stopped)

    def run_stage(self, index: int, stage: Stage, stage_start: int) -> str:
        """Train ``stage`` from ``progress.epoch`` to its end; returns "completed" or "early_stopping"."""
        cfg, state, progress = self.cfg, self.state, self.progress
        self.stage_index, self.stage, self.stage_start = index, stage, stage_start
        self.params = apply_stage(self.model, stage, self.base_trainable)
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
            log.info("stage %d/%d '%s': %d epochs, %d trainable tensors, losses %s", index + 1, len(self.stages),
                     stage.name, stage.epochs, len(self.params), ", ".join(stage.losses))
        s = cfg.solver
        self.lr_at = LRSchedule(self.iters_per_epoch, stage.epochs, s.schedule, s.milestones, s.gamma, s.warmup_iters, s.warmup_factor)
        if progress.stage_iters:  # fitted to the time budget (also on resume)
            at = progress.fit_anchor
            self.lr_at = dataclasses.replace(self.lr_at, total=progress.stage_iters[index],
                                             anchor=(at[1], at[2]) if at and at[0] == index else (0, 0.0))
        self.stage_done = False
        while progress.epoch < stage_start + stage.epochs and not self.stage_done:
            self.train_epoch()
            if self.end_epoch():
                return "early_stopping" if index == len(self.stages) - 1 else "completed"
        return "completed"

    def fit_to_budget(self) -> None:
        """Shorten the schedule so that the run ends within ``solver.max_minutes``.

        Called once, a few iterations into the run: the pace of iterations ``FIT_FROM`` to
        ``FIT_AT`` (the first ones pay one-time costs) and a validation estimated at
        ``VAL_COST`` of a training step per batch give the iterations that fit; every stage's
        remaining iterations are scaled by the same factor, and the learning-rate curve of the
        current stage is squeezed from here on (``LRSchedule.fitted``), so it still decays to
        its end instead of being cut off at a high rate. A budget that fits the plan changes
        nothing.
        """
        cfg, progress = self.cfg, self.progress
        sec_per_iter = (self.pace[FIT_AT] - self.pace[FIT_FROM]) / (FIT_AT - FIT_FROM)
        planned = [s.epochs * self.iters_per_epoch for s in self.stages]
        it_in_stage = (progress.epoch - self.stage_start) * self.iters_per_epoch + progress.batch
        remaining = planned[self.stage_index] - it_in_stage + sum(planned[self.stage_index + 1:])
        validations = sum(math.ceil(s.epochs / cfg.eval.every) for s in self.stages[self.stage_index:]) if self.val_set is not None else 0
        val_batches = math.ceil(len(self.val_set) / cfg.data.batch_size) if self.val_set is not None else 0
        left = 60 * cfg.solver.max_minutes - (time.monotonic() - self.started) - validations * val_batches * VAL_COST * sec_per_iter
        fits = max(0, int(left / sec_per_iter))
        if fits >= remaining:
            log.info("time budget: %d more iterations at %.2f s each fit in solver.max_minutes=%g", remaining, sec_per_iter, cfg.solver.max_minutes)
            return
        factor = fits / remaining
        stage_iters = [
            n if k < self.stage_index else
            max(it_in_stage + 1, it_in_stage + round(factor * (n - it_in_stage))) if k == self.stage_index else
            max(1, round(factor * n))
            for k, n in enumerate(planned)
        ]
        progress.stage_iters = stage_iters
        self.lr_at = self.lr_at.fitted(it_in_stage, stage_iters[self.stage_index])
        progress.fit_anchor = [self.stage_index, *self.lr_at.anchor]
        log.info("time budget: solver.max_minutes=%g at %.2f s per iteration fits %d of the %d remaining iterations; "
                 "the learning-rate schedule is fitted to end at iteration %d instead of %d",
                 cfg.solver.max_minutes, sec_per_iter, fits, remaining,
                 progress.iteration - it_in_stage + sum(stage_iters[self.stage_index:]), progress.iteration + remaining)

    def train_epoch(self) -> None:
        """The rest of epoch ``progress.epoch`` from batch ``progress.batch``; ends early at the
        stage's fitted length or at a limit (``stop_reason``)."""
        cfg, progress, epoch = self.cfg, self.progress, self.progress.epoch
        batches = epoch_batches(len(self.train_set), self.groups, cfg.data.batch_size, cfg.seed, epoch)
        self.augmented.epoch = epoch
        loader = DataLoader(self.augmented, batch_sampler=batches[progress.batch:], collate_fn=collate,
                            num_workers=cfg.data.workers, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                            pin_memory=self.device.type == "cuda")
        bar = tqdm(total=len(batches), initial=progress.batch, desc=f"epoch {epoch + 1}/{self.num_epochs} {self.stage.name}",
                   unit="it", disable=not cfg.progress, dynamic_ncols=True)
        window: dict[str, float] = {}
        window_n, window_t = 0, time.monotonic()
        set_train_mode(self.model)
        for images, targets, _ in loader:
            it_in_stage = (epoch - self.stage_start) * self.iters_per_epoch + progress.batch
            lr = cfg.solver.lr * self.lr_at(it_in_stage)
            values = self.step(images, targets, lr)
            progress.iteration += 1
            progress.batch += 1
            progress.epoch_loss += values["loss"]
            progress.epoch_steps += 1
            for k, v in values.items():
                window[k] = window.get(k, 0.0) + v
            window_n += 1
            done = progress.iteration - self.first_iteration
            if cfg.solver.max_minutes and not progress.stage_iters and done in (FIT_FROM, FIT_AT):
                self.pace[done] = time.monotonic()
                if done == FIT_AT:
                    self.fit_to_budget()
            left = sum(self.stage_lengths()[self.stage_index:]) - it_in_stage - 1  # in this and later stages
            bar.update(1)
            bar.set_postfix_str(_postfix(window, window_n, lr, (time.monotonic() - self.loop_started) / done * left), refresh=False)
            if progress.iteration % cfg.log_every == 0:
                now = time.monotonic()
                self.metrics.write({"iter": progress.iteration, "epoch": epoch + 1, "stage": self.stage.name, "lr": lr,
                                    **{k: v / window_n for k, v in window.items()}, "sec_per_iter": (now - window_t) / window_n})
                window, window_n, window_t = {}, 0, now
            inside = progress.batch < len(batches)
            if cfg.checkpoint_every_iters and progress.iteration % cfg.checkpoint_every_iters == 0 and inside:
                self.save_last()
            if cfg.solver.max_iters and progress.iteration >= cfg.solver.max_iters:
                self.stop_reason = "max_iters"
            elif cfg.solver.max_minutes and time.monotonic() - self.started >= 60 * cfg.solver.max_minutes:
                self.stop_reason = "max_minutes"
            self.stage_done = it_in_stage + 1 >= self.stage_lengths()[self.stage_index]
            if self.stop_reason or self.stage_done:
                break
        bar.close()

    def stage_lengths(self) -> list[int]:
        """Iterations of each stage: as planned, or as fitted to the time budget."""
        return self.progress.stage_iters or [s.epochs * self.iters_per_epoch for s in self.stages]

    def step(self, images: list[Tensor], targets: list[Any], lr: float) -> dict[str, float]:
        """One optimizer step; returns the loss values and gradient norm. Raises on NaN/inf."""
        cfg, stage, progress = self.cfg, self.stage, self.progress
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [t.to(self.device) for t in targets]
        with precision.autocast(self.device, cfg.solver.amp):
            if self.proposal_net is not None:
                output = forward_with_proposals(self.model, self.proposal_net, images, targets)
            else:
                output = self.model(images, targets)
        losses = {k: v.float() for k, v in output.losses.items() if k in stage.losses}
        loss = stage_loss(stage, losses)
        where = f"iteration {progress.iteration + 1} (epoch {progress.epoch + 1}, batch {progress.batch + 1}, stage '{stage.name}')"
        if not torch.isfinite(loss):
            kept = f"{self.last_path} holds the last good checkpoint" if self.last_path.exists() else "no checkpoint was written yet"
            raise NonFiniteLossError(f"non-finite loss at {where}: {_loss_report(losses)}. Training stopped; {kept}. "
                                     "Lower solver.lr, lengthen solver.warmup_iters or set solver.grad_clip")
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
                                     f"{self.last_path} left as it was. Set solver.grad_clip or lower solver.lr")
        else:
            self.optimizer.step()
        values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}
        values["grad_norm"] = grad_norm if math.isfinite(grad_norm) else 0.0
        return values

    def end_epoch(self) -> bool:
        """Validate, keep the best, log, checkpoint, draw; True when early stopping ends the stage.

        Also called when a limit (``stop_reason``) stopped the epoch early: the last weights are
        validated too, so that ``best.pth`` and the summary count them, and ``_Stop`` is raised
        after the checkpoint. Such a partial epoch is not advanced past: ``--resume`` finishes it.
        """
        cfg, progress, epoch = self.cfg, self.progress, self.progress.epoch
        stage_end = self.stage_start + self.stage.epochs
        last_of_stage = epoch + 1 == stage_end or self.stage_done
        partial = progress.batch < self.iters_per_epoch and not self.stage_done
        summary: dict[str, Any] = {"epoch": epoch + 1, "iter": progress.iteration, "stage": self.stage.name,
                                   "train_loss": progress.epoch_loss / max(progress.epoch_steps, 1)}
        if partial:
            summary["partial"] = True
        pictures: list[Result] = []
        early_stop = False
        if self.val_set is not None and ((epoch + 1) % cfg.eval.every == 0 or last_of_stage or self.stop_reason):
            values, pictures = validate(self.model, self.stage, self.val_set, cfg, self.device)
            summary.update(values)
            value = values.get(cfg.eval.metric, math.nan)
            # Only a stage that trains the heads yields a detector worth keeping; an RPN stage's
            # AP is ~0 and its val_loss sums other terms, so it neither selects nor stops.
            judged = any(name in FRONTEND_LOSSES for name in self.stage.losses)
            if judged and _improved(value, progress.best_metric, cfg.eval.metric):
                progress.best_metric, progress.best_epoch, progress.bad_evals = value, epoch + 1, 0
                save_checkpoint(self.best_path, self.model, {"epoch": epoch + 1, "iteration": progress.iteration, "metrics": summary})
            elif judged:
                progress.bad_evals += 1
                early_stop = 0 < cfg.eval.patience <= progress.bad_evals
        summary["time"] = time.monotonic() - self.started
        progress.history.append({k: _plain(v) for k, v in summary.items()})
        self.metrics.write(summary)
        log.info("epoch %d/%d %s%s: %s", epoch + 1, self.num_epochs, self.stage.name, " (partial)" if partial else "", ", ".join(
            f"{k} {v:.4f}" for k, v in summary.items() if k in ("train_loss", "val_loss", "bbox_AP", "segm_AP")))
        if early_stop:
            log.info("early stopping: %s did not improve for %d validations (best %.4f at epoch %d)",
                     cfg.eval.metric, progress.bad_evals, progress.best_metric, progress.best_epoch)
        if not partial:  # early stopping and a fitted length end the stage
            progress.epoch, progress.batch = (stage_end if early_stop or self.stage_done else epoch + 1), 0
            progress.epoch_loss, progress.epoch_steps = 0.0, 0
        self.save_last()
        _draw_outputs(self.out, self.metrics.path, pictures)
        if self.stop_reason:
            raise _Stop(self.stop_reason)
        return early_stop

    # ---- checkpoints and results ------------------------------------------------------------

    def save_last(self) -> None:
        """Write last.pth with the training state, only from finite weights."""
        if not _finite_weights(self.model):
            raise NonFiniteLossError(f"the weights are no longer finite after iteration {self.progress.iteration}; "
                                     f"{self.last_path} was not overwritten. Lower solver.lr or set solver.grad_clip")
        state = {
            **dataclasses.asdict(self.progress),
            "stage": self.stage_index,
            "iters_per_epoch": self.iters_per_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "proposal_net": self.proposal_net.state_dict() if self.proposal_net is not None else None,
            "rng": rng_state(),
            "metrics_bytes": self.metrics.size,
            "config": to_dict(self.cfg),
        }
        save_checkpoint(self.last_path, self.model, state)

    def summary(self, stopped: str) -> dict[str, Any]:
        p = self.progress
        return {
            "out_dir": str(self.out),
            "last": str(self.last_path),
            "best": str(self.best_path) if self.best_path.exists() else None,
            "metric": self.cfg.eval.metric,
            "best_metric": p.best_metric,
            "best_epoch": p.best_epoch,
            "epochs": len(p.history),
            "iterations": p.iteration,
            "stopped": stopped,
            "history": p.history,
        }


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
        NonFiniteLossError: the loss, gradient or weights became NaN/inf (last.pth is left as
            it was).
        ConfigError, DatasetError, CheckpointError: bad configuration, data or checkpoint.
    """
    return Trainer(check(cfg), resume).run()


def main(config_path: str, overrides: list[str], resume: bool = False) -> int:
    """``maskrcnn train CONFIG.yaml key=value ... [--resume]``; returns the exit code (3 on divergence)."""
    cfg = load_training_config(config_path, overrides)
    try:
        result = train(cfg, resume=resume)
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 3
    best = (f"{result['metric']} {result['best_metric']:.4f} at epoch {result['best_epoch']}"
            if result["best_metric"] is not None else "no validation")
    print(f"training {result['stopped']} after {result['iterations']} iterations; best {best}; "
          f"checkpoints in {result['out_dir']}/ (last.pth{', best.pth' if result['best'] else ''})")
    return 0
