"""Everything a training run writes or shows, in one object.

The run folder ``out_dir`` receives:

    config.yaml           the resolved configuration (classes filled in from the data)
    last.pth              weights + training state, every epoch, every checkpoint_every_iters
                          and when the run stops
    best.pth              weights of the epoch with the best ``eval.metric``
    metrics.jsonl         one line per ``log_every`` iterations (mean losses, lr, s/iter) and
                          one per epoch (train loss, validation losses and AP)
    metrics.png           loss and AP curves (``visualize.plot_metrics``)
    val_predictions.png   detections on the first validation images
    pretrain_body.pth     the pretrained body, when ``pretrain.epochs > 0``

and the console gets the progress bar and the run's log lines. In a distributed run only the
first process writes and shows: on the others (``active=False``) every method does nothing, so
the trainer calls them without asking which process it is. Checkpoints are written atomically
(``checkpoint.save_checkpoint``); reading them is not this object's business.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from ..weights.checkpoint import save_checkpoint
from ..config import to_dict
from ..model.mask_rcnn import MaskRCNN
from ..inference.results import Result
from .config import TrainConfig

log = logging.getLogger(__name__)

_SHORT = {"loss_objectness": "obj", "loss_rpn_box_reg": "rpn_box", "loss_classifier": "cls", "loss_box_reg": "box", "loss_mask": "mask"}


def plain(value: Any) -> Any:
    """JSON-ready: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
            f.write(json.dumps({k: plain(v) for k, v in record.items()}) + "\n")

    @property
    def size(self) -> int:
        return self.path.stat().st_size


class RunOutput:
    """The run folder and the console of one training run (see the module docstring).

    Args:
        out_dir: the run folder.
        active: write and show; False on every process of a distributed run but the first.
        progress: show progress bars.
        log_every: iterations averaged into one metrics.jsonl line.
    """

    def __init__(self, out_dir: str | Path, active: bool = True, progress: bool = True, log_every: int = 20) -> None:
        self.out = Path(out_dir)
        self.active = active
        self.progress = progress and active
        self.log_every = log_every
        self.last, self.best = self.out / "last.pth", self.out / "best.pth"
        self.metrics: MetricsLog | None = None
        self.bar = tqdm(disable=True)  # an epoch's progress bar, and its metrics.jsonl window:
        self.window: dict[str, float] = {}  # sums of the values of the steps since the last line
        self.window_n, self.window_t = 0, 0.0  # those steps, and when the window began

    def start(self, cfg: TrainConfig, metrics_bytes: int | None) -> None:
        """Write config.yaml and open metrics.jsonl, cut to ``metrics_bytes`` for a resumed run.

        Called once the model and any checkpoint to resume have loaded, so that a resume that
        fails leaves the run folder as it was.
        """
        if not self.active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.metrics = MetricsLog(self.out / "metrics.jsonl", metrics_bytes)

    # ---- files ------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl."""
        if self.metrics is not None:
            self.metrics.write(record)

    def save_last(self, model: MaskRCNN, train_state: dict[str, Any]) -> None:
        """last.pth with ``train_state`` and the size of metrics.jsonl."""
        if self.metrics is not None:
            save_checkpoint(self.last, model, {**train_state, "metrics_bytes": self.metrics.size})

    def save_best(self, model: MaskRCNN, info: dict[str, Any]) -> None:
        if self.active:
            save_checkpoint(self.best, model, info)

    def save_pretrained(self, model: MaskRCNN) -> None:
        if self.active:
            save_checkpoint(self.out / "pretrain_body.pth", model)

    def draw(self, pictures: list[Result]) -> None:
        """metrics.png and val_predictions.png. Plots are a convenience: a failure is logged, never fatal."""
        if self.metrics is None:
            return
        from ..inference.visualize import draw_grid, plot_metrics

        try:
            plot_metrics(self.metrics.path, self.out / "metrics.png")
            if pictures:
                draw_grid(pictures, self.out / "val_predictions.png")
        except Exception as e:  # noqa: BLE001
            log.warning("could not draw the training plots: %s: %s", type(e).__name__, e)

    # ---- console ----------------------------------------------------------------------------

    def info(self, message: str, *args: Any) -> None:
        if self.active:
            log.info(message, *args)

    def open_bar(self, total: int, done: int, desc: str) -> None:
        """A progress bar for an epoch of ``total`` steps, ``done`` of them already; it also
        starts a metrics.jsonl window."""
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="it", disable=not self.progress, dynamic_ncols=True)
        self.window: dict[str, float] = {}
        self.window_n, self.window_t = 0, time.monotonic()

    def after_step(self, iteration: int, epoch: int, stage: str, lr: float, values: dict[str, float], eta_s: float) -> None:
        """Step ``iteration`` done: the bar moves, and every ``log_every`` iterations
        metrics.jsonl gets a line with the mean ``values`` (this process's losses and gradient
        norm) since the last line."""
        for k, v in values.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.window_n += 1
        n = self.window_n
        terms = " ".join(f"{_SHORT.get(k, k)} {v / n:.3f}" for k, v in self.window.items() if k.startswith("loss_"))
        eta = time.strftime("%H:%M:%S", time.gmtime(eta_s)) if math.isfinite(eta_s) else "?"
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {self.window['loss'] / n:.3f} ({terms}) lr {lr:.2g} run eta {eta}", refresh=False)
        if iteration % self.log_every == 0:
            now = time.monotonic()
            self.log({"iter": iteration, "epoch": epoch + 1, "stage": stage, "lr": lr,
                      **{k: v / n for k, v in self.window.items()}, "sec_per_iter": (now - self.window_t) / n})
            self.window, self.window_n, self.window_t = {}, 0, now

    def close_bar(self) -> None:
        self.bar.close()

    def epoch(self, summary: dict[str, Any], num_epochs: int) -> None:
        """metrics.jsonl's epoch line and its log line."""
        self.log(summary)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k in ("train_loss", "val_loss", "bbox_AP", "segm_AP"))
        self.info("epoch %d/%d %s%s: %s", summary["epoch"], num_epochs, summary["stage"],
                  " (partial)" if summary.get("partial") else "", shown)
