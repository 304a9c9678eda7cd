"""Everything a training run writes or shows, in one hook.

The run folder ``out_dir`` receives:

    config.yaml           the resolved configuration (classes filled in from the data)
    metrics.jsonl         one line per ``log_every`` iterations (mean losses, lr, s/iter) and
                          one per epoch (train loss, validation losses and AP)
    metrics.png           loss and AP curves (``visualize.plot_metrics``)
    val_predictions.png   detections on the first validation images

and the console gets the progress bar and the run's log lines. In a distributed run only the
first process writes and shows: on the others (``active=False``) every method does nothing, so
the trainer calls them without asking which process it is. The checkpoints are their owners':
``last.pth`` and ``pretrain_body.pth`` the trainer's, ``best.pth`` ``hooks.Validation``'s.
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

from ..config import to_dict
from ..inference.results import Result
from . import distributed
from .hooks import HookBase, StopReason, Trainer

log = logging.getLogger(__name__)

_SHORT = {
    "loss_objectness": "obj",
    "loss_rpn_box_reg": "rpn_box",
    "loss_classifier": "cls",
    "loss_box_reg": "box",
    "loss_mask": "mask",
}


def info(message: str, *args: Any) -> None:
    """A line of the run's log, from the first process only (the others would repeat it)."""
    if distributed.rank() == 0:
        log.info(message, *args)


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


class RunOutput(HookBase):
    """The run folder's config.yaml, metrics.jsonl and plots, and the console's progress bar
    and epoch lines (see the module docstring).

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
        self.metrics: MetricsLog | None = None
        self.resume_bytes: int | None = None  # a resumed run's metrics.jsonl is cut to this size
        self.bar: tqdm | None = None  # an epoch's progress bar, and its metrics.jsonl window:
        self.window: dict[str, float] = {}  # sums of the values of the steps since the last line
        self.window_n, self.window_t = 0, 0.0  # those steps, and when the window began
        self.loop_start: tuple[float, int] | None = None  # (time, iteration) of this process's first step, for the ETA

    def state_dict(self) -> dict[str, Any]:
        return {"metrics_bytes": self.metrics.size if self.metrics is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_bytes = state.get("metrics_bytes")

    def before_train(self, trainer: Trainer) -> None:
        """Write config.yaml and open metrics.jsonl, cut to its size at the checkpoint for a resumed
        run. The trainer calls this once the model and any checkpoint to resume have loaded, so
        that a resume that fails leaves the run folder as it was."""
        if not self.active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(trainer.cfg), sort_keys=False))
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.resume_bytes)

    def log(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl."""
        if self.metrics is not None:
            self.metrics.write(record)

    def before_step(self, trainer: Trainer) -> None:
        """An epoch's first step opens its progress bar and a metrics.jsonl window."""
        if self.loop_start is None:
            self.loop_start = (trainer.clock(), trainer.iteration)
        if self.bar is None:
            p = trainer.progress
            self.bar = tqdm(
                total=trainer.iters_per_epoch,
                initial=p.batch,
                unit="it",
                disable=not self.progress,
                desc=f"epoch {p.epoch + 1}/{trainer.num_epochs} {trainer.current.stage.name}",
                dynamic_ncols=True,
            )
            self.window, self.window_n, self.window_t = {}, 0, trainer.clock()

    def after_step(self, trainer: Trainer, losses: dict[str, float]) -> None:
        """The bar moves, and every ``log_every`` iterations metrics.jsonl gets a line with the
        mean ``losses`` (this process's losses and gradient norm) since the last line."""
        for k, v in losses.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.window_n += 1
        n, iteration = self.window_n, trainer.iteration
        terms = " ".join(f"{_SHORT.get(k, k)} {v / n:.3f}" for k, v in self.window.items() if k.startswith("loss_"))
        eta_s = self.seconds_left(trainer)
        eta = time.strftime("%H:%M:%S", time.gmtime(eta_s)) if math.isfinite(eta_s) else "?"
        self.bar.update(1)
        self.bar.set_postfix_str(
            f"loss {self.window['loss'] / n:.3f} ({terms}) lr {trainer.lr:.2g} run eta {eta}", refresh=False
        )
        if iteration % self.log_every == 0:
            now = trainer.clock()
            self.log(
                {
                    "iter": iteration,
                    "epoch": trainer.progress.epoch + 1,
                    "stage": trainer.current.stage.name,
                    "lr": trainer.lr,
                    **{k: v / n for k, v in self.window.items()},
                    "sec_per_iter": (now - self.window_t) / n,
                }
            )
            self.window, self.window_n, self.window_t = {}, 0, now

    def seconds_left(self, trainer: Trainer) -> float:
        """Time left in the run at this process's pace so far."""
        started, first = self.loop_start
        left = (
            sum(trainer.stage_lengths()[trainer.current.index :]) - trainer.stage_iteration()
        )  # in this and later stages
        return (trainer.clock() - started) / (trainer.iteration - first) * left

    def after_epoch(self, trainer: Trainer) -> None:
        """The epoch's line of metrics.jsonl (stamped with the run's time) and of the log; the plots."""
        self.close_bar()
        values = trainer.record.values
        values["time"] = trainer.clock() - trainer.started
        self.log(values)
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in values.items() if k in ("train_loss", "val_loss", "bbox_AP", "segm_AP")
        )
        if self.active:
            log.info(
                "epoch %d/%d %s%s: %s",
                values["epoch"],
                trainer.num_epochs,
                values["stage"],
                " (partial)" if values.get("partial") else "",
                shown,
            )
        self.draw(trainer.record.pictures)

    def after_train(self, trainer: Trainer) -> None:
        self.close_bar()
        if trainer.stop in (StopReason.MAX_ITERS, StopReason.MAX_MINUTES) and self.active:
            log.info(
                "stopped (%s) at iteration %d; --resume continues from %s",
                trainer.stop.value,
                trainer.iteration,
                trainer.checkpoint("last"),
            )

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

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
