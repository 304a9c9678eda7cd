"""Time budgets and stops: ``solver.max_minutes`` fits the schedule, a stopped run validates its
last weights, ``solver.amp=auto`` is resolved and recorded. The clock is faked: every training
step takes exactly one second, so the fitted lengths can be computed by hand."""

from __future__ import annotations

import json
import math
import time as real_time
import types

import pytest
import yaml

from maskrcnn import precision
from maskrcnn.train import trainer as train_module
from maskrcnn.train.trainer import FIT_AT, VAL_COST, Trainer, train

from .helpers import tiny_train_config

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch):
    """A clock that advances one second per training step and stands still otherwise."""
    now = [0.0]
    fake = types.SimpleNamespace(monotonic=lambda: now[0], strftime=real_time.strftime, gmtime=real_time.gmtime)
    monkeypatch.setattr(train_module, "time", fake)
    step = Trainer.step

    def timed_step(self, *args, **kwargs):
        now[0] += 1.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", timed_step)
    return now


def lrs(out_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["lr"] for r in lines if "lr" in r}


def test_budget_that_fits_changes_nothing(shapes, tmp_path, clock):
    # 6 images, batch 2: 3 iterations an epoch; 9 epochs = 27 iterations of 1 s in a 10-minute budget
    cfg = tiny_train_config(
        shapes,
        tmp_path / "run",
        solver={"epochs": 9, "schedule": "cosine", "max_minutes": 10},
        eval={"every": 9, "num_visualize": 0},
    )
    result = train(cfg)
    assert result["iterations"] == 27 and result["stopped"] == "completed" and result["epochs"] == 9


def test_short_budget_fits_the_cosine_to_the_time_left(shapes, tmp_path, clock):
    cfg = tiny_train_config(
        shapes,
        tmp_path / "run",
        solver={"epochs": 12, "schedule": "cosine", "max_minutes": 0.5, "warmup_iters": 2, "lr": 0.01},
        eval={"every": 4, "num_visualize": 0},
    )
    result = train(cfg)
    # At iteration 25, 25 s of the 30 are spent; the one validation still to come (the stage's
    # last; epochs 4 and 8 are past), 1 batch at VAL_COST steps, is set aside, which leaves room
    # for 4 iterations of the 11 planned: the run ends at 29.
    left = 30 - FIT_AT - 1 * 1 * VAL_COST * 1.0
    end = FIT_AT + int(left)
    assert end == 29 and result["iterations"] == end and result["stopped"] == "completed"
    last = result["history"][-1]
    assert last["iter"] == end and "segm_AP" in last and result["best"] is not None
    # The cosine runs unchanged to iteration 25 (position 25/3 of 12 epochs), then from there
    # to its end (position 12) at iteration 29: continuous, and it still decays to 0.
    lr = lrs(tmp_path / "run")
    cosine = lambda pos: 0.01 * 0.5 * (1 + math.cos(math.pi * pos / 12))  # noqa: E731
    for it in range(3, FIT_AT + 1):  # logged after iteration `it`, which ran at index it - 1
        assert lr[it] == pytest.approx(cosine((it - 1) / 3), rel=1e-9)
    start = FIT_AT / 3
    for it in range(FIT_AT + 1, end + 1):
        assert lr[it] == pytest.approx(cosine(start + (it - 1 - FIT_AT) * (12 - start) / (end - FIT_AT)), rel=1e-9)
    assert lr[end] < lr[FIT_AT] / 5
    # The fitted schedule is saved: a resume finds the run complete.
    again = train(cfg, resume=True)
    assert again["iterations"] == end


def test_steps_that_slow_down_are_caught_by_a_refit(shapes, tmp_path, monkeypatch):
    """1 s a step up to iteration 25, then 2 s: the first fit (at 25) plans for 1 s steps, the
    refit at 50 sees the slower pace and ends the run before the hard stop would cut it."""
    now = [0.0]
    fake = types.SimpleNamespace(monotonic=lambda: now[0], strftime=real_time.strftime, gmtime=real_time.gmtime)
    monkeypatch.setattr(train_module, "time", fake)
    step = Trainer.step
    steps = [0]

    def timed_step(self, *args, **kwargs):
        steps[0] += 1
        now[0] += 1.0 if steps[0] <= 25 else 2.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", timed_step)
    cfg = tiny_train_config(
        shapes,
        tmp_path / "run",
        solver={"epochs": 40, "schedule": "cosine", "max_minutes": 100 / 60},
        eval={"every": 40, "num_visualize": 0},
    )
    result = train(cfg)
    # At 25 (25 s spent): 100 - 25 - 0.5 s of validation leave 74 iterations -> end at 99.
    # At 50 (75 s spent, 2 s a step since): 100 - 75 - 0.5 * 2 leave 12 -> end at 62, which
    # the 2 s steps reach at 99 s, before the hard stop at 100 s.
    assert result["iterations"] == 62 and result["stopped"] == "completed"
    assert result["history"][-1]["iter"] == 62 and "segm_AP" in result["history"][-1]
    lr = lrs(tmp_path / "run")
    assert lr[62] < lr[50] / 5  # annealed, not cut off at a high rate


def test_a_stop_inside_an_epoch_validates_the_last_weights_and_resume_finishes_the_epoch(shapes, tmp_path):
    base = tiny_train_config(shapes, tmp_path / "whole", solver={"epochs": 3}, eval={"num_visualize": 0})
    whole = train(base)
    cut = tiny_train_config(shapes, tmp_path / "cut", solver={"epochs": 3, "max_iters": 4}, eval={"num_visualize": 0})
    stopped = train(cut)
    assert stopped["stopped"] == "max_iters" and stopped["iterations"] == 4
    last = stopped["history"][-1]
    # The weights after iteration 4 (inside epoch 2) were validated, and best.pth considered them.
    assert last["epoch"] == 2 and last["partial"] and "segm_AP" in last and last["iter"] == 4
    assert stopped["best_epoch"] in (1, 2) and stopped["best"] is not None
    resumed = train(
        tiny_train_config(shapes, tmp_path / "cut", solver={"epochs": 3}, eval={"num_visualize": 0}), resume=True
    )
    assert resumed["iterations"] == 9
    full = [h for h in resumed["history"] if not h.get("partial")]
    assert [h["epoch"] for h in full] == [1, 2, 3]
    # Epoch 2's train loss covers all three of its batches, also those before the resume.
    for a, b in zip(full, whole["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_amp_auto_is_resolved_and_recorded(shapes, tmp_path, monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_bf16_pays", lambda: native)
    cfg = tiny_train_config(
        shapes,
        tmp_path / "run",
        solver={"amp": "auto", "max_iters": 1},
        data={"max_train_images": 2},
        eval={"max_images": 1, "num_visualize": 0},
    )
    train(cfg)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["solver"]["amp"] == expected
