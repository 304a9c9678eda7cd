"""Typed training configuration: ``TrainConfig`` and its sections.

Read with ``load_training_config(path, overrides)`` (``maskrcnn.config.load_yaml`` underneath),
so unknown keys fail with close-match suggestions and ``section.key=value`` overrides apply on
top of the file. Relative paths are relative to the current directory.

The defaults are the reference recipe for COCO (torchvision / Detectron2 "1x": SGD, momentum
0.9, weight decay 1e-4, 12 epochs, learning rate divided by 10 after epochs 8 and 11, linear
warm-up), with the learning rate scaled linearly to a batch of 2 images (0.02 for 16).
``model.num_classes``, ``class_names`` and ``category_ids`` are always set from the training
data's categories, whatever the file says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, ModelConfig, load_yaml
from ..data.augment import AugmentConfig


@dataclass
class DataConfig:
    train_ann: str = ""  # COCO instances JSON of the training set
    train_images: str = ""  # folder that train_ann's file names are relative to
    val_ann: str = ""  # COCO instances JSON of the validation set ("" = no validation)
    val_images: str = ""  # folder of the validation images
    synthetic: str = ""  # "shapes" or "digits": generate a built-in dataset instead of the paths above
    synthetic_dir: str = "runs/datasets/shapes"  # where the built-in dataset is written (reused if present)
    synthetic_train: int = 200  # built-in dataset: training images
    synthetic_val: int = 50  # built-in dataset: validation images
    synthetic_size: tuple[int, int] = (128, 256)  # built-in dataset: range of image height and width
    max_train_images: int = 0  # use only the first N training images (0 = all); for quick runs
    batch_size: int = 2  # images per training step in each process (a distributed run steps on batch_size x processes)
    workers: int = 2  # DataLoader worker processes (0 = load in the training process)
    hflip: float = 0.5  # probability of a horizontal flip of a training image
    allow_outside_root: bool = (
        False  # let file names in the JSON be absolute or lead out of the image folder ("../x.jpg")
    )


@dataclass
class SolverConfig:
    lr: float = 0.0025  # base learning rate (0.02 for 16 images per step, scaled linearly)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 weight decay
    decay_norm_and_bias: bool = True  # apply weight decay to biases and norm weights too (as torchvision)
    epochs: int = 12  # epochs of the joint schedule
    warmup_iters: int = 1000  # iterations of linear warm-up at the start of each stage
    warmup_factor: float = 0.001  # learning-rate multiplier at the first warm-up iteration
    schedule: str = "step"  # "step" (x gamma at each milestone) or "cosine" (to 0 at the end of the stage)
    milestones: tuple[int, ...] = (8, 11)  # "step": epochs (within a stage) after which lr *= gamma
    gamma: float = 0.1  # "step": learning-rate factor at each milestone
    grad_clip: float = 0.0  # clip the gradient norm to this (0 = off)
    amp: str = ""  # autocast: "auto" (bf16 where native, fp16 on older GPUs, else float32), "" or "fp32", "bf16", "fp16" (CUDA, loss scaling)
    max_iters: int = 0  # stop (with a checkpoint) after this many iterations in all; 0 = run every epoch
    max_minutes: float = 0.0  # time budget from the start of the run: the schedule is shortened to fit it (then a hard stop, validated and saved); 0 = none


@dataclass
class InitConfig:
    weights: str = ""  # our or a torchvision Mask R-CNN checkpoint to start from; class heads re-initialised if the class count differs


@dataclass
class ScheduleConfig:
    kind: str = "joint"  # "joint" (end to end) or "alternating" (RPN and frontend in turn, seed 4.3)
    stage_epochs: tuple[int, int, int, int] = (
        4,
        4,
        2,
        2,
    )  # "alternating": epochs of RPN, frontend, RPN fine-tune, frontend fine-tune


@dataclass
class PretrainConfig:
    epochs: int = 0  # backbone pretraining as an object-crop classifier (seed 4.2); 0 = off
    crop_size: int = 64  # crops are resized to crop_size x crop_size
    context: float = 0.1  # a crop is its box grown by this share of the box size on each side
    background_per_image: int = 2  # random "no object" crops (class 0) drawn per training image
    max_crops: int = 20000  # at most this many object crops (a random subset beyond)
    batch_size: int = 64  # crops per step
    lr: float = 0.05  # SGD learning rate (cosine decay over the pretraining)
    weight_decay: float = 1e-4  # L2 weight decay


@dataclass
class EvalConfig:
    every: int = 1  # validate every N epochs (and after the last epoch of every stage)
    metric: str = "segm_AP"  # checkpoint selection: bbox_AP, segm_AP, *_AP50, *_AP75 (higher better) or val_loss
    patience: int = 0  # end the stage after this many validations without improvement (0 = off)
    max_images: int = 0  # validate on the first N images only (0 = all)
    num_visualize: int = 6  # validation images drawn into val_predictions.png
    visualize_score: float = 0.5  # detections drawn only at or above this score


@dataclass
class LogConfig:
    """``log``: what the run logs besides metrics.jsonl and the console."""

    tensorboard: bool = False  # write TensorBoard events into <out_dir>/tensorboard
    tb_images: int = 4  # validation images drawn with their predictions at each validation
    tb_score: float = 0.5  # detections drawn only at or above this score


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(
        default_factory=AugmentConfig
    )  # vertical flips, rotations, scale, crops, colour (data.augment)
    solver: SolverConfig = field(default_factory=SolverConfig)
    init: InitConfig = field(default_factory=InitConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)  # TensorBoard (train.tensorboard)
    out_dir: str = "runs/train"  # run folder: checkpoints, metrics.jsonl, plots, config.yaml
    exist_ok: bool = False  # start afresh in an out_dir that already holds a run (its files are replaced)
    seed: int = 0  # seeds weights, data order, augmentation and sampling
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # torch CPU threads (0 = torch's default); 1 avoids OpenMP slowdowns on a busy machine
    checkpoint_every_iters: int = 0  # also write last.pth every N iterations (0 = only at epoch ends)
    checkpoint_format: str = (
        "pth"  # pth (torch.save) or safetensors (last/best.safetensors: no pickle, loading runs no code)
    )
    log_every: int = 20  # iterations averaged into one metrics.jsonl line
    progress: bool = True  # show a progress bar
    dist_timeout_minutes: float = (
        10.0  # torchrun: a collective fails after this long waiting for a stopped process (Gloo's own: 30)
    )


AMP_MODES = ("", "auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("step", "cosine")
SCHEDULE_KINDS = ("joint", "alternating")
METRICS = tuple(f"{t}_{s}" for t in ("bbox", "segm") for s in ("AP", "AP50", "AP75", "APs", "APm", "APl")) + (
    "val_loss",
)


def check(cfg: TrainConfig) -> TrainConfig:
    """Reject values that the type alone does not rule out; returns ``cfg``."""

    def choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")

    choice("solver.amp", cfg.solver.amp, AMP_MODES)
    if not cfg.dist_timeout_minutes > 0:
        raise ConfigError(f"dist_timeout_minutes must be above 0, got {cfg.dist_timeout_minutes}")
    choice("solver.schedule", cfg.solver.schedule, LR_SCHEDULES)
    choice("schedule.kind", cfg.schedule.kind, SCHEDULE_KINDS)
    choice("eval.metric", cfg.eval.metric, METRICS)
    choice("data.synthetic", cfg.data.synthetic, ("", "shapes", "digits"))
    if cfg.data.synthetic and cfg.data.train_ann:
        raise ConfigError("set either data.synthetic or data.train_ann, not both")
    if not cfg.data.synthetic and not cfg.data.train_ann:
        raise ConfigError("no training data: set data.train_ann and data.train_images, or data.synthetic=shapes")
    if cfg.data.train_ann and not cfg.data.train_images:
        raise ConfigError("data.train_images is empty; it must name the folder of data.train_ann's images")
    if cfg.data.val_ann and not cfg.data.val_images:
        raise ConfigError("data.val_images is empty; it must name the folder of data.val_ann's images")
    if cfg.model.backbone.sync_bn and cfg.model.backbone.frozen_bn:
        raise ConfigError("model.backbone.sync_bn=true needs trainable BatchNorm: set model.backbone.frozen_bn=false")
    if cfg.eval.metric.startswith("segm") and not cfg.model.masks:
        raise ConfigError(f"eval.metric={cfg.eval.metric} needs masks; use bbox_AP for model.masks=false")
    for key, value in (
        ("data.batch_size", cfg.data.batch_size),
        ("eval.every", cfg.eval.every),
        ("log_every", cfg.log_every),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if cfg.schedule.kind == "joint" and cfg.solver.epochs < 1:
        raise ConfigError(f"solver.epochs must be at least 1, got {cfg.solver.epochs}")
    if cfg.schedule.kind == "alternating" and min(cfg.schedule.stage_epochs) < 1:
        raise ConfigError(f"schedule.stage_epochs must all be at least 1, got {cfg.schedule.stage_epochs}")
    if not 0.0 <= cfg.data.hflip <= 1.0:
        raise ConfigError(f"data.hflip is a probability in [0, 1], got {cfg.data.hflip}")
    try:
        cfg.augment.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.solver.lr <= 0:
        raise ConfigError(f"solver.lr must be positive, got {cfg.solver.lr}")
    if not 0.0 <= cfg.log.tb_score <= 1.0 or cfg.log.tb_images < 0:
        raise ConfigError(
            f"log.tb_score must be in [0, 1] and log.tb_images >= 0, got {cfg.log.tb_score}, {cfg.log.tb_images}"
        )
    return cfg


BUILTIN_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file, or the name of a built-in config ("demo_shapes", "kudzu", "coco_r50")."""
    p = Path(path)
    if p.exists():
        return p
    builtin = BUILTIN_CONFIGS / (p.name if p.suffix == ".yaml" else p.name + ".yaml")
    if builtin.exists():
        return builtin
    names = ", ".join(sorted(q.stem for q in BUILTIN_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {path} (built-in configs: {names})")


def load_training_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a training YAML file (or built-in config name), apply ``key=value`` overrides, check."""
    return check(load_yaml(TrainConfig, resolve_config_path(path), list(overrides)))
