"""TensorBoardHook: the event file, read back with TensorBoard's own EventAccumulator, holds the
losses and learning rate of every step, per-class AP, PR curves and images at validation."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from maskrcnn.config import ModelConfig, apply_overrides
from maskrcnn.data import CocoDataset
from maskrcnn.data.synthetic import generate_shapes
from maskrcnn.model.build import build_model
from maskrcnn.train.tensorboard import TensorBoardHook
from tests.helpers import TINY


def read_events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_hook_writes_what_tensorboard_reads_back(tmp_path: Path) -> None:
    split = generate_shapes(tmp_path / "shapes", num_train=1, num_val=2, image_size=(64, 96), seed=3)["val"]
    val = CocoDataset(split.ann_file, split.image_dir)
    ids = [c["id"] for c in json.loads(split.ann_file.read_text())["categories"]]
    torch.manual_seed(0)
    model = build_model(apply_overrides(ModelConfig(), TINY + [f"category_ids={ids}"]))
    trainer = SimpleNamespace(iteration=0, lr=0.0, model=model, cfg=None, out=tmp_path / "run", val_data=val)

    hook = TensorBoardHook(num_images=2, score_thresh=0.0)
    hook.before_train(trainer)
    for it, (loss, lr) in enumerate([(3.0, 0.01), (2.5, 0.02), (float("nan"), 0.02)], 1):
        trainer.iteration, trainer.lr = it, lr
        hook.after_step(trainer, {"loss": loss, "loss_mask": loss / 3})
    model.train()
    hook.after_validation(trainer, {"val_loss": 4.0, "segm_AP": 0.25})
    assert model.training  # the hook's own prediction pass leaves the mode as it was
    hook.after_train(trainer)

    acc = read_events(tmp_path / "run" / "tensorboard")
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 3.0), (2, 2.5)]  # the NaN step is not a point
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([0.01, 0.02, 0.02])
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == [(3, 4.0)]
    tags = acc.Tags()
    names = [c["name"] for c in json.loads(split.ann_file.read_text())["categories"]]
    with_gt = {
        c["name"]
        for c in json.loads(split.ann_file.read_text())["categories"]
        if any(a["category_id"] == c["id"] for a in json.loads(split.ann_file.read_text())["annotations"])
    }
    assert {f"val_AP_per_class/segm/{n}" for n in with_gt} <= set(tags["scalars"])
    assert {f"val_pr/{n}" for n in names} <= set(tags["tensors"])
    pr = acc.Tensors(f"val_pr/{names[0]}")[0]
    data = tensor_util.make_ndarray(pr.tensor_proto)  # (6, thresholds): tp fp tn fn precision recall
    assert (
        data.shape[1] == 101 and (data[0] + data[3] == data[0, 0] + data[3, 0]).all()
    )  # TP + FN = instances at every threshold
    assert tags["images"] == ["val_images/0", "val_images/1"]
    assert hook.state_dict() == {"last_logged": 3}


def test_a_resumed_run_drops_the_steps_after_its_checkpoint(tmp_path: Path) -> None:
    trainer = SimpleNamespace(iteration=0, lr=0.1, out=tmp_path)
    hook = TensorBoardHook()
    hook.before_train(trainer)
    for it in (1, 2, 3, 4):  # the checkpoint was saved at 2; 3 and 4 are lost with the crash
        trainer.iteration = it
        hook.after_step(trainer, {"loss": float(it)})
    state = {**hook.state_dict(), "last_logged": 2}
    hook.after_train(trainer)

    resumed = TensorBoardHook()
    resumed.load_state_dict(state)
    trainer.iteration = 2
    resumed.before_train(trainer)
    trainer.iteration = 3
    resumed.after_step(trainer, {"loss": 30.0})
    resumed.after_train(trainer)
    loss = read_events(tmp_path / "tensorboard").Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_log_tensorboard_in_the_config_logs_a_real_run(tmp_path: Path) -> None:
    """``log.tensorboard: true`` puts the hook into a real ``train`` run (process 0 only)."""
    from maskrcnn.train.trainer import train

    from .helpers import tiny_train_config

    shapes = generate_shapes(tmp_path / "shapes", num_train=4, num_val=2, image_size=(64, 96), seed=5)
    cfg = tiny_train_config(
        shapes,
        tmp_path / "run",
        log={"tensorboard": True, "tb_images": 1},
        solver={"lr": 0.01, "epochs": 1, "warmup_iters": 2, "max_iters": 2},
    )
    train(cfg)
    acc = read_events(tmp_path / "run" / "tensorboard")
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 2]
    assert any(tag.startswith("val/") for tag in acc.Tags()["scalars"])
