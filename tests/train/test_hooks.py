"""Hooks (``maskrcnn.train.hooks``): a hook passed to ``train`` sees the run's events and the
trainer's attributes, its state goes into last.pth under its class name and comes back on
resume; a last.pth written before hooks (their states among the progress fields) resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.train.hooks import HookBase, StopReason
from maskrcnn.train.trainer import train
from maskrcnn.weights.checkpoint import read_file

from .helpers import tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# 2 training images, batch 2: one iteration an epoch; 2 epochs; one validation image
SMALL = {"data": {"max_train_images": 2}, "solver": {"epochs": 2}, "eval": {"max_images": 1, "num_visualize": 0}}


class Recorder(HookBase):
    """Writes down the events it sees and counts the steps across a resume."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.steps = 0

    def before_train(self, trainer) -> None:
        assert isinstance(trainer.model, MaskRCNN) and trainer.val_data is not None
        assert trainer.out == Path(trainer.cfg.out_dir)
        self.events.append("before_train")

    def before_step(self, trainer) -> None:
        self.events.append("before_step")

    def after_step(self, trainer, losses) -> None:
        assert isinstance(trainer.iteration, int) and trainer.lr > 0 and "loss" in losses
        self.steps += 1
        self.events.append(f"after_step {trainer.iteration}")

    def after_epoch(self, trainer) -> None:
        self.events.append("after_epoch")

    def after_validation(self, trainer, metrics) -> None:
        assert "val_loss" in metrics
        self.events.append("after_validation")

    def after_train(self, trainer) -> None:
        self.events.append("after_train")

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state.get("steps", 0)


def _config(shapes, out: Path, **solver):
    return tiny_train_config(shapes, out, **{**SMALL, "solver": {**SMALL["solver"], **solver}})


def test_a_hook_sees_the_run_and_its_state_survives_resume(shapes, tmp_path):
    first = Recorder()
    result = train(_config(shapes, tmp_path / "run", max_iters=1), hooks=[first])
    assert result["stopped"] == StopReason.MAX_ITERS.value == "max_iters"
    # the trainer's Validation hook validates inside after_epoch, before this hook's turn
    assert first.events == [
        "before_train",
        "before_step",
        "after_step 1",
        "after_validation",
        "after_epoch",
        "after_train",
    ]
    state = read_file(tmp_path / "run" / "last.pth")["train_state"]
    assert state["hooks"]["Recorder"] == {"steps": 1}
    assert set(state["hooks"]) >= {"TimeBudget", "Validation", "RunOutput", "EarlyStopping", "PeriodicCheckpoint"}

    again = Recorder()
    result = train(_config(shapes, tmp_path / "run"), resume=True, hooks=[again])
    assert result["iterations"] == 2 and again.steps == 2  # one step here, one restored
    assert again.events[:3] == ["before_train", "before_step", "after_step 2"]


def test_two_hooks_of_one_class_are_refused(shapes, tmp_path):
    with pytest.raises(ValueError, match="one hook per class"):
        train(_config(shapes, tmp_path / "run"), hooks=[Recorder(), Recorder()])


def test_a_checkpoint_from_before_hooks_resumes(shapes, tmp_path):
    """last.pth as the trainer wrote it before hooks: the best metric, the early-stopping count
    and the size of metrics.jsonl were fields of the training state itself."""
    out = tmp_path / "run"
    cut = train(_config(shapes, out, max_iters=1))
    last = out / "last.pth"
    saved = read_file(last)
    state = saved["train_state"]
    hooks = state.pop("hooks")
    state.update(
        best_metric=hooks["Validation"]["best_metric"],
        best_epoch=hooks["Validation"]["best_epoch"],
        bad_evals=hooks["EarlyStopping"]["bad_evals"],
        metrics_bytes=hooks["RunOutput"]["metrics_bytes"],
    )
    torch.save(saved, last)
    with open(out / "metrics.jsonl", "a") as f:  # a line written after the checkpoint: the resume drops it
        f.write(json.dumps({"iter": 99, "loss": 1.0}) + "\n")

    resumed = train(_config(shapes, out), resume=True)
    assert resumed["iterations"] == 2 and resumed["epochs"] == 2
    assert cut["best_epoch"] == 1 and resumed["best_epoch"] in (1, 2)
    if resumed["best_epoch"] == 1:  # epoch 2 did not beat the restored best
        assert resumed["best_metric"] == cut["best_metric"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2]
    assert "hooks" in read_file(last)["train_state"]  # written anew in the current layout
