"""The demo: ``maskrcnn demo [--out runs/demo] [--minutes M] [key=value ...]`` or ``run_demo()``.

Generates the built-in ``shapes`` dataset, trains the built-in ``demo_shapes`` config on it
from scratch (a few minutes on 2 CPU cores), evaluates the trained model on the held-out val
split with COCO box and mask AP, and draws its predictions. The run folder ``out`` receives:

    dataset/              the generated images and COCO JSON (reused by later demos)
    config.yaml, last.pth, best.pth, metrics.jsonl, metrics.png, val_predictions.png
                          the trainer's outputs (``maskrcnn.train.trainer``)
    predictions/*.png     overlays of the evaluated model's detections on the first val images
    metrics.json          box and mask AP on the whole val split, timings, the checkpoint used

Every call starts a fresh training run: the previous run's checkpoints, metrics and overlays
in ``out`` are deleted first (the dataset is kept and reused while its parameters match), so
a re-run never evaluates or resumes a stale checkpoint. To continue a demo run instead, use
``maskrcnn train OUT/config.yaml --resume``.

The evaluated checkpoint is the trainer's ``best.pth`` (by mask AP on val; the trainer also
validates the last weights when it stops on its time budget). As usual for a demo with no test
split, that choice is made on the split the AP is reported on.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO

from ..data import ensure_dataset
from ..data.synthetic import SplitPaths
from ..evaluation.coco import coco_evaluate, coco_results, flatten_metrics
from ..files import write_json
from ..inference.options import PredictOptions
from ..model.mask_rcnn import MaskRCNN
from ..weights.checkpoint import load
from .config import TrainConfig, load_training_config
from .distributed import resolve_device
from .trainer import NonFiniteLossError, train

log = logging.getLogger(__name__)

DEMO_CONFIG = "demo_shapes"
NUM_OVERLAYS = 8  # val images drawn into predictions/
OVERLAY_SCORE = 0.5  # detections drawn at or above this score
# Outputs of an earlier run in the same folder, removed so that every demo starts afresh.
STALE = (
    "last.pth",
    "best.pth",
    "pretrain_body.pth",
    "last.safetensors",
    "best.safetensors",
    "pretrain_body.safetensors",
    "metrics.jsonl",
    "metrics.png",
    "val_predictions.png",
    "config.yaml",
    "metrics.json",
    "predictions",
)


def demo_config(
    out_dir: str | Path = "runs/demo", overrides: Sequence[str] = (), minutes: float | None = None
) -> TrainConfig:
    """The built-in demo config with its run folder and dataset under ``out_dir``.

    ``overrides`` (``key=value``) apply on top and may move the dataset
    (``data.synthetic_dir=...``); ``minutes`` sets ``solver.max_minutes``.
    """
    out = Path(out_dir)
    fixed = [f"out_dir={out}", f"data.synthetic_dir={out / 'dataset'}", "exist_ok=true"]
    limit = [] if minutes is None else [f"solver.max_minutes={minutes}"]
    return load_training_config(DEMO_CONFIG, [*fixed, *overrides, *limit])


def clear_run(out: Path) -> None:
    """Delete an earlier run's outputs in ``out`` (not its dataset)."""
    for name in STALE:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def evaluate_model(model: MaskRCNN, val: SplitPaths, batch_size: int, progress: bool) -> dict[str, Any]:
    """COCO box and mask AP (``coco_evaluate``'s dict) of ``model`` on every image of ``val``."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while loading
        gt = COCO(str(val.ann_file))
    entries = coco_results(model, gt, val.image_dir, PredictOptions(batch_size=batch_size, progress=progress))
    return coco_evaluate(gt, entries, iou_types=("bbox", "segm") if model.config.masks else ("bbox",))


def draw_predictions(model: MaskRCNN, val: SplitPaths, out: Path, num: int = NUM_OVERLAYS) -> list[Path]:
    """Overlays of ``model``'s detections on the first ``num`` images of ``val``, as ``out/<stem>.png``."""
    images = sorted(Path(val.image_dir).glob("*.png"))[:num]
    out.mkdir(parents=True, exist_ok=True)
    results = model.predict(images, batch_size=4, score_thresh=OVERLAY_SCORE)
    return [r.save(out / f"{p.stem}.png") for p, r in zip(images, results)]


def run_demo(out_dir: str | Path = "runs/demo", overrides: Sequence[str] = (), minutes: float | None = None) -> int:
    """Generate the data, train, evaluate, draw; print a summary. Returns the exit code
    (0, or 3 when training diverged).

    Args:
        out_dir: run folder; relative to the current directory.
        overrides: ``key=value`` overrides of the ``demo_shapes`` training config.
        minutes: training time budget (``solver.max_minutes``); None keeps the config's.
    """
    started = time.monotonic()
    cfg = demo_config(out_dir, overrides, minutes)
    out = Path(cfg.out_dir)
    clear_run(out)

    d = cfg.data  # the trainer calls ensure_dataset with the same arguments and reuses this
    paths = ensure_dataset(
        d.synthetic,
        d.synthetic_dir,
        num_train=d.synthetic_train,
        num_val=d.synthetic_val,
        image_size=tuple(d.synthetic_size),
    )
    data_s = time.monotonic() - started

    t0 = time.monotonic()
    try:
        result = train(cfg)
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 3
    train_s = time.monotonic() - t0

    t0 = time.monotonic()
    # The trainer validated every epoch it ended with, a time-budget stop included, so best.pth
    # holds the best weights on the val split (last.pth only when nothing was validated).
    chosen = Path(result["best"] or result["last"])
    model = load(chosen, device=resolve_device(cfg.device))
    metrics = evaluate_model(model, paths["val"], cfg.data.batch_size, cfg.progress)
    overlays = draw_predictions(model, paths["val"], out / "predictions")
    eval_s = time.monotonic() - t0

    flat = flatten_metrics(metrics)
    report = {
        "checkpoint": str(chosen),
        "val_images": d.synthetic_val,
        **flat,
        "per_class": {t: metrics[t]["per_class"] for t in ("bbox", "segm") if t in metrics},
        "iterations": result["iterations"],
        "epochs": result["epochs"],
        "stopped": result["stopped"],
        "data_seconds": data_s,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "total_seconds": time.monotonic() - started,
        "threads": torch.get_num_threads(),
    }
    write_json(report, out / "metrics.json", indent=1)

    print(metrics["summary"])
    print(
        f"demo: mask AP {flat.get('segm_AP', float('nan')):.3f} (AP50 {flat.get('segm_AP50', float('nan')):.3f}), "
        f"box AP {flat['bbox_AP']:.3f} on {d.synthetic_val} held-out images"
    )
    print(
        f"      training {train_s / 60:.1f} min ({result['iterations']} iterations, {result['stopped']}), "
        f"total {report['total_seconds'] / 60:.1f} min"
    )
    print(
        f"      model {chosen}; metrics {out / 'metrics.json'}; plots {out / 'metrics.png'}, "
        f"{out / 'val_predictions.png'}; overlays {out / 'predictions'}/ ({len(overlays)} images)"
    )
    return 0
