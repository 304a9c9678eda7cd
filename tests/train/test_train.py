"""The trainer on a tiny model and a tiny synthetic dataset: one step, outputs, resume, NaN,
pretraining, checkpoint initialisation, configuration. The tests that take ``device`` (one
step, a whole run with pretraining, resume, autocast) run on every device of
``tests.helpers.DEVICES``; the others on the CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

import maskrcnn
from maskrcnn.config import ConfigError, to_dict
from maskrcnn.data import CocoDataset, DatasetError
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.structures import Targets
from maskrcnn.train.config import PretrainConfig, load_training_config
from maskrcnn.train.datasets import build_datasets
from maskrcnn.train.pretrain import extract_crops, pretrain_body
from maskrcnn.train.trainer import NonFiniteLossError, Trainer, TrainingInterrupted, main, train
from maskrcnn.weights.checkpoint import CheckpointError, init_from_checkpoint, read_file, save_checkpoint

from .helpers import TINY_MODEL, tiny_model_config, tiny_train_config

REPO = Path(__file__).resolve().parents[2]

# pycocotools.mask trips numpy 2's __array__(copy=) deprecation; not ours to fix
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def _square_targets(h: int, w: int, boxes: list[tuple[int, int, int, int]], labels: list[int]) -> Targets:
    masks = torch.zeros((len(boxes), h, w), dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        masks[k, y1:y2, x1:x2] = 1
    return Targets(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        masks=masks,
    )


# ---------------------------------------------------------------------------------------
# One training step


def test_one_step_reaches_every_trainable_parameter(device):
    torch.manual_seed(0)
    model = maskrcnn.build_model(tiny_model_config()).train().to(device)
    images = [torch.rand(3, 80, 96).to(device), torch.rand(3, 64, 64).to(device)]
    targets = [
        _square_targets(80, 96, [(10, 10, 50, 60), (50, 20, 90, 70)], [1, 2]).to(device),
        _square_targets(64, 64, [(8, 8, 40, 48)], [3]).to(device),
    ]
    out = model(images, targets)
    assert set(out.losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    loss = out.total_loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))  # trainable_layers 5, trainable BatchNorm
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"no gradient reaches {no_grad}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in {bad}"
    assert sum(float(p.grad.abs().sum()) for _, p in trainable if p.ndim > 1) > 0


def test_images_without_objects_train():
    torch.manual_seed(0)
    model = maskrcnn.build_model(tiny_model_config()).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 64)]
    for targets in (
        [Targets.empty(64, 80), Targets.empty(64, 64)],  # no object in the batch
        [Targets.empty(64, 80), _square_targets(64, 64, [(8, 8, 40, 48)], [1])],
    ):  # half empty
        model.zero_grad()
        out = model(images, targets)
        loss = out.total_loss
        assert torch.isfinite(loss), out.losses
        loss.backward()
        # every parameter takes part in the graph (zero-weighted where there is nothing to learn),
        # as DistributedDataParallel without find_unused_parameters needs
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        assert set(out.losses) == {
            "loss_objectness",
            "loss_rpn_box_reg",
            "loss_classifier",
            "loss_box_reg",
            "loss_mask",
        }


# ---------------------------------------------------------------------------------------
# Whole runs


def test_run_writes_checkpoints_metrics_and_pictures(shapes, tmp_path, device):
    cfg = tiny_train_config(
        shapes,
        tmp_path / "run",
        str(device),
        data={"max_train_images": 4},
        pretrain={"epochs": 1, "crop_size": 32, "batch_size": 8},
    )
    result = train(cfg)
    out = tmp_path / "run"
    for name in (
        "last.pth",
        "best.pth",
        "config.yaml",
        "metrics.jsonl",
        "metrics.png",
        "val_predictions.png",
        "pretrain_body.pth",
    ):
        assert (out / name).is_file(), name
    assert result["stopped"] == "completed" and result["iterations"] == 2 and result["epochs"] == 1
    assert result["best"] == str(out / "best.pth") and result["best_epoch"] == 1

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "iter" in r and "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["sec_per_iter"] > 0 for r in steps)
    assert [r["pretrain_epoch"] for r in records if "pretrain_epoch" in r] == [1]
    (epoch,) = [r for r in records if "train_loss" in r]
    assert (
        epoch["epoch"] == 1
        and math.isfinite(epoch["val_loss"])
        and 0.0 <= epoch["segm_AP"] <= 1.0
        and "bbox_AP" in epoch
    )

    # the resolved config names the data's classes; the checkpoints load as models
    resolved = load_training_config(out / "config.yaml")
    assert resolved.model.num_classes == 3 and resolved.model.class_names == ("circle", "square", "triangle")
    assert resolved.model.category_ids == (1, 2, 3)
    model = maskrcnn.load(out / "best.pth")
    assert model.config.class_names == ("circle", "square", "triangle")
    maskrcnn.load(out / "pretrain_body.pth")
    state = read_file(out / "last.pth")["train_state"]
    assert state["epoch"] == 1 and state["iteration"] == 2 and state["optimizer"]["state"]

    # a second run into the same folder must not clobber it by accident
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)


def _copy_split(split, dest: Path, edit=None) -> tuple[Path, Path]:
    """A copy of a generated split (JSON and images) that a test may break; returns (ann, images)."""
    import shutil

    images = dest / "images"
    shutil.copytree(split.image_dir, images)
    data = json.loads(Path(split.ann_file).read_text())
    if edit is not None:
        edit(data)
    ann = dest / "instances.json"
    ann.write_text(json.dumps(data))
    return ann, images


def test_missing_image_files_fail_before_the_first_iteration(shapes, tmp_path, monkeypatch):
    """Every training image is checked up front: all missing files in one error, nothing trained."""
    ann, images = _copy_split(shapes["train"], tmp_path / "data")
    names = sorted(p.name for p in images.iterdir())
    for name in names[1:3]:
        (images / name).unlink()
    cfg = tiny_train_config(shapes, tmp_path / "run", data={"train_ann": str(ann), "train_images": str(images)})
    monkeypatch.setattr("maskrcnn.train.trainer.build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(DatasetError) as e:
        train(cfg)
    message = str(e.value)
    assert "instances.json: 2 of 6 images are bad" in message
    assert names[1] in message and names[2] in message and "not found" in message
    assert not (tmp_path / "run" / "last.pth").exists()


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda d: d.update(annotations=[]), "no instances"),
        (lambda d: d.update(images=[], annotations=[]), "no images"),
        (lambda d: d.update(categories=[], annotations=[]), "no categories"),
    ],
    ids=["no annotations", "no images", "no categories"],
)
def test_an_empty_dataset_is_an_error_not_a_zero_iteration_run(shapes, tmp_path, edit, fragment):
    ann, images = _copy_split(shapes["train"], tmp_path / "data", edit)
    cfg = tiny_train_config(shapes, tmp_path / "run", data={"train_ann": str(ann), "train_images": str(images)})
    with pytest.raises(DatasetError, match=f"instances.json: {fragment}"):
        train(cfg)


def test_file_names_outside_the_image_folder_need_allow_outside_root(shapes, tmp_path):
    def escape(d):
        d["images"][0]["file_name"] = "../images/" + d["images"][0]["file_name"]

    ann, images = _copy_split(shapes["train"], tmp_path / "data", escape)
    cfg = tiny_train_config(shapes, tmp_path / "run", data={"train_ann": str(ann), "train_images": str(images)})
    with pytest.raises(
        DatasetError, match=r"image id \d+: file_name '\.\./images/.*' points outside .*allow_outside_root"
    ):
        build_datasets(cfg)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, allow_outside_root=True))
    full, _, _ = build_datasets(cfg)
    assert len(full) == 6


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_file(path)["model"]


def test_resume_continues_exactly(shapes, tmp_path, device, monkeypatch):
    """Stop inside epoch 2 after a mid-epoch checkpoint, resume, and end where an
    uninterrupted run ends: same iteration count, optimizer state and weights.

    On the CPU the runs agree to float32 rounding. On CUDA, with cuDNN's deterministic
    algorithms, kernels that accumulate with atomics (e.g. the losses' reductions) still add in
    a run-dependent order, so two identical runs differ in the last bits and four steps
    amplify that: the tolerances there are 10x wider."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    rtol, atol, loss_rel = (1e-4, 1e-6, 1e-3) if device.type == "cpu" else (1e-3, 1e-5, 1e-2)
    common = {
        "solver": {"lr": 0.01, "epochs": 2, "warmup_iters": 2},
        "eval": {"every": 2, "num_visualize": 0},
        "data": {"max_train_images": 4},
    }  # 2 iterations per epoch
    full = train(tiny_train_config(shapes, tmp_path / "full", str(device), **common))

    cut = tiny_train_config(
        shapes,
        tmp_path / "cut",
        str(device),
        checkpoint_every_iters=1,
        solver={**common["solver"], "max_iters": 3},
        eval=common["eval"],
        data=common["data"],
    )
    first = train(cut)
    assert first["stopped"] == "max_iters" and first["iterations"] == 3
    state = read_file(tmp_path / "cut" / "last.pth")["train_state"]
    assert (state["epoch"], state["batch"], state["iteration"]) == (1, 1, 3)
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(tiny_train_config(shapes, tmp_path / "nothing"), resume=True)

    resumed = train(dataclasses.replace(cut, solver=dataclasses.replace(cut.solver, max_iters=0)), resume=True)
    assert resumed["stopped"] == "completed" and resumed["iterations"] == full["iterations"] == 4

    a, b = read_file(tmp_path / "full" / "last.pth"), read_file(tmp_path / "cut" / "last.pth")
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), rtol=rtol, atol=atol), key
    momenta_a = [s["momentum_buffer"] for s in a["train_state"]["optimizer"]["state"].values()]
    momenta_b = [s["momentum_buffer"] for s in b["train_state"]["optimizer"]["state"].values()]
    assert len(momenta_a) == len(momenta_b) > 0
    assert all(torch.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(momenta_a, momenta_b))
    # metrics.jsonl lost the lines written after the checkpoint: no iteration logged twice
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["iter"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert a["train_state"]["history"][-1]["val_loss"] == pytest.approx(
        b["train_state"]["history"][-1]["val_loss"], rel=loss_rel
    )


def _assert_same_run(a: Path, b: Path) -> None:
    """last.pth of two runs: same weights and SGD momenta (float tolerance)."""
    x, y = read_file(a / "last.pth"), read_file(b / "last.pth")
    assert x["train_state"]["iteration"] == y["train_state"]["iteration"]
    for key, value in x["model"].items():
        assert torch.allclose(value.float(), y["model"][key].float(), rtol=1e-4, atol=1e-6), key
    momenta_x = [s["momentum_buffer"] for s in x["train_state"]["optimizer"]["state"].values()]
    momenta_y = [s["momentum_buffer"] for s in y["train_state"]["optimizer"]["state"].values()]
    assert len(momenta_x) == len(momenta_y) > 0
    assert all(torch.allclose(m, n, rtol=1e-4, atol=1e-6) for m, n in zip(momenta_x, momenta_y))


def _ctrl_c_at(monkeypatch: pytest.MonkeyPatch, iteration: int, how: str) -> None:
    """Ctrl-C while iteration ``iteration`` (1-based) is about to run: a real SIGINT to this
    process, or a KeyboardInterrupt raised from the step."""
    step = Trainer.step

    def interrupted(self, *args, **kwargs):
        if self.progress.iteration + 1 == iteration:
            if how == "exception":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", interrupted)


@pytest.mark.parametrize("how, saved_at", [("signal", 3), ("exception", 2)])
def test_ctrl_c_saves_the_current_iteration_and_resume_continues_exactly(shapes, tmp_path, monkeypatch, how, saved_at):
    """A SIGINT lets the step under way finish; a KeyboardInterrupt raised inside the step loses
    that step. Either way last.pth holds a whole state, and resuming from it ends where an
    uninterrupted run ends."""
    common = {
        "solver": {"lr": 0.01, "epochs": 2, "warmup_iters": 2},
        "eval": {"every": 2, "num_visualize": 0},
        "data": {"max_train_images": 4},
    }  # 2 iterations per epoch
    train(tiny_train_config(shapes, tmp_path / "full", **common))
    cut = tiny_train_config(shapes, tmp_path / "cut", **common)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started under nohup
    with monkeypatch.context() as m:
        _ctrl_c_at(m, 3, how)
        with pytest.raises(TrainingInterrupted) as err:
            train(cut)
    assert err.value.iteration == saved_at
    state = read_file(tmp_path / "cut" / "last.pth")["train_state"]
    assert state["iteration"] == saved_at and (state["epoch"], state["batch"]) == (1, saved_at - 2)
    assert signal.getsignal(signal.SIGINT) is before  # the trainer's handler is gone, the caller's is back

    resumed = train(cut, resume=True)
    assert resumed["stopped"] == "completed" and resumed["iterations"] == 4
    _assert_same_run(tmp_path / "full", tmp_path / "cut")
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_ctrl_c_on_the_command_line_prints_the_resume_command(shapes, tmp_path, monkeypatch, capsys):
    cfg = tiny_train_config(shapes, tmp_path / "run", data={"max_train_images": 4}, eval={"num_visualize": 0})
    path = tmp_path / "my config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    overrides = ["solver.epochs=2", "eval.max_images=1"]
    with monkeypatch.context() as m:
        _ctrl_c_at(m, 2, "signal")
        assert main(str(path), overrides) == 130
    printed = capsys.readouterr().out
    assert f"maskrcnn train '{path}' solver.epochs=2 eval.max_images=1 --resume" in printed
    assert read_file(tmp_path / "run" / "last.pth")["train_state"]["iteration"] == 2
    assert main(str(path), overrides, resume=True) == 0
    assert read_file(tmp_path / "run" / "last.pth")["train_state"]["iteration"] == 4


def test_a_resume_that_does_not_fit_leaves_the_run_folder_as_it_was(shapes, tmp_path):
    cfg = tiny_train_config(
        shapes, tmp_path / "run", data={"max_train_images": 2}, eval={"max_images": 1, "num_visualize": 0}
    )
    train(cfg)
    out = tmp_path / "run"
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "metrics.jsonl", "last.pth")}
    other = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model, roi_heads=dataclasses.replace(cfg.model.roi_heads, representation_size=48)
        ),
    )  # a changed model override
    with pytest.raises(CheckpointError, match="does not fit the model"):
        train(other, resume=True)
    assert {name: (out / name).read_bytes() for name in before} == before


def test_training_starts_from_the_imagenet_body_weights(shapes, tmp_path):
    torch.manual_seed(1)
    from maskrcnn.model.backbone import ResNetBody

    imagenet = ResNetBody("resnet18", frozen_bn=False).state_dict()
    torch.save(imagenet, tmp_path / "imagenet.pth")
    backbone = {
        **TINY_MODEL["backbone"],
        "frozen_bn": True,
        "trainable_layers": 0,
        "weights": str(tmp_path / "imagenet.pth"),
    }
    cfg = tiny_train_config(
        shapes,
        tmp_path / "run",
        model={**TINY_MODEL, "backbone": backbone},
        data={"max_train_images": 2},
        eval={"max_images": 1, "num_visualize": 0},
    )
    train(cfg)
    body = {
        k.removeprefix("backbone.body."): v
        for k, v in read_file(tmp_path / "run" / "last.pth")["model"].items()
        if k.startswith("backbone.body.")
    }
    assert all(
        torch.equal(body[k], v) for k, v in imagenet.items() if not k.endswith("num_batches_tracked")
    )  # frozen: as loaded


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(shapes, tmp_path, monkeypatch):
    forward = MaskRCNN.forward
    calls = {"train": 0}

    def poisoned(self, images, targets=None, **kwargs):
        out = forward(self, images, targets, **kwargs)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 2:
                out.losses["loss_box_reg"] = out.losses["loss_box_reg"] * float("nan")
        return out

    monkeypatch.setattr(MaskRCNN, "forward", poisoned)
    cfg = tiny_train_config(shapes, tmp_path / "run", checkpoint_every_iters=1)
    with pytest.raises(NonFiniteLossError, match=r"iteration 2 .*loss_box_reg=nan") as err:
        train(cfg)
    assert "last.pth holds the last good checkpoint" in str(err.value)
    last = tmp_path / "run" / "last.pth"
    assert read_file(last)["train_state"]["iteration"] == 1
    model = maskrcnn.load(last)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_divergence_exits_non_zero_from_the_command_line(shapes, tmp_path):
    cfg = tiny_train_config(shapes, tmp_path / "run", checkpoint_every_iters=1, solver={"lr": 1e30, "warmup_iters": 0})
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(str(path), []) != 0
    last = tmp_path / "run" / "last.pth"
    if last.exists():  # written only while the weights were still finite
        assert all(torch.isfinite(v).all() for v in read_file(last)["model"].values() if v.is_floating_point())


def test_early_stopping_ends_the_run_for_good(shapes, tmp_path):
    # APl is -1 on every validation (no large objects), so it never improves after the first
    cfg = tiny_train_config(
        shapes,
        tmp_path / "run",
        data={"max_train_images": 2},
        solver={"epochs": 4},
        eval={"metric": "bbox_APl", "patience": 1, "num_visualize": 0},
    )
    result = train(cfg)
    assert result["stopped"] == "early_stopping" and result["epochs"] == 2 and result["best_epoch"] == 1
    again = train(cfg, resume=True)  # nothing left to do
    assert again["iterations"] == 2 and again["epochs"] == 2


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_training(shapes, tmp_path, device, amp):
    """bf16 autocast trains on any device; fp16 (with a gradient scaler) needs CUDA."""
    cfg = tiny_train_config(
        shapes,
        tmp_path / amp,
        str(device),
        solver={"amp": amp},
        data={"max_train_images": 2},
        eval={"max_images": 1, "num_visualize": 0},
    )
    if amp == "fp16" and device.type == "cpu":
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            train(cfg)
        return
    result = train(cfg)
    assert result["iterations"] == 1 and math.isfinite(result["history"][0]["val_loss"])


# ---------------------------------------------------------------------------------------
# Pretraining and initialisation


def test_pretrain_gives_body_weights_that_load_into_the_detector(shapes):
    dataset = CocoDataset(shapes["train"].ann_file, shapes["train"].image_dir)
    cfg = PretrainConfig(epochs=1, crop_size=32, batch_size=8, lr=0.01)
    crops, labels = extract_crops(dataset, cfg, torch.Generator().manual_seed(0))
    assert crops.shape[1:] == (3, 32, 32) and crops.dtype == torch.uint8
    assert set(labels.tolist()) >= {0} and labels.max() <= 3 and (labels > 0).sum() > 0

    model_cfg = tiny_model_config()
    detector = maskrcnn.build_model(model_cfg)
    before = {k: v.clone() for k, v in detector.backbone.body.state_dict().items()}
    history = pretrain_body(
        detector.backbone.body,
        "resnet18",
        1e-5,
        dataset,
        3,
        cfg,
        (0.5, 0.5, 0.5),
        (0.25, 0.25, 0.25),
        torch.device("cpu"),
        progress=False,
    )
    assert len(history) == 1 and math.isfinite(history[0]["pretrain_loss"])
    after = detector.backbone.body.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("conv1.weight"))

    # the body's weights (BatchNorm statistics included) load into a detector with frozen BatchNorm too
    frozen = maskrcnn.build_model(
        dataclasses.replace(model_cfg, backbone=dataclasses.replace(model_cfg.backbone, frozen_bn=True))
    )
    frozen.backbone.body.load_state_dict(after)
    assert torch.equal(frozen.backbone.body.layer1[0].bn1.running_var, after["layer1.0.bn1.running_var"])


def test_init_from_a_checkpoint_with_other_classes_renews_the_class_heads(tmp_path):
    torch.manual_seed(0)
    source = maskrcnn.build_model(tiny_model_config(num_classes=5))
    save_checkpoint(tmp_path / "five.pth", source)
    target = maskrcnn.build_model(tiny_model_config(num_classes=3))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    reinit = init_from_checkpoint(target, tmp_path / "five.pth", 1e-5)
    assert sorted({k.rsplit(".", 1)[0] for k in reinit}) == [
        "roi_heads.box_predictor.bbox_pred",
        "roi_heads.box_predictor.cls_score",
        "roi_heads.mask_predictor.mask_fcn_logits",
    ]
    src = source.state_dict()
    for key, value in target.state_dict().items():
        assert torch.equal(value, fresh[key] if key in reinit else src[key]), key

    same = maskrcnn.build_model(tiny_model_config(num_classes=5))
    assert init_from_checkpoint(same, tmp_path / "five.pth", 1e-5) == []
    assert torch.equal(same.roi_heads.box_predictor.cls_score.weight, source.roi_heads.box_predictor.cls_score.weight)


def test_init_follows_class_names_into_the_class_heads(tmp_path):
    """A file that names its classes gives each class of the new model its own rows, found by
    name (a subset, reordered); a file with other names of the same count gives nothing."""
    torch.manual_seed(0)
    source = maskrcnn.build_model(
        dataclasses.replace(tiny_model_config(num_classes=3), class_names=("cat", "dog", "bird"))
    )
    save_checkpoint(tmp_path / "pets.pth", source)
    src = source.state_dict()

    target = maskrcnn.build_model(dataclasses.replace(tiny_model_config(num_classes=2), class_names=("bird", "cat")))
    assert init_from_checkpoint(target, tmp_path / "pets.pth", 1e-5) == []
    got = target.state_dict()
    rows = [0, 3, 1]  # background, bird, cat in the file's labels
    for name, block in (
        ("box_predictor.cls_score", 1),
        ("box_predictor.bbox_pred", 4),
        ("mask_predictor.mask_fcn_logits", 1),
    ):
        for part in ("weight", "bias"):
            key = f"roi_heads.{name}.{part}"
            want = torch.cat([src[key][r * block : (r + 1) * block] for r in rows])
            assert torch.equal(got[key], want), key

    other = maskrcnn.build_model(
        dataclasses.replace(tiny_model_config(num_classes=3), class_names=("car", "bus", "bike"))
    )
    fresh = {k: v.clone() for k, v in other.state_dict().items()}
    reinit = init_from_checkpoint(other, tmp_path / "pets.pth", 1e-5)
    assert len(reinit) == 6  # 3 layers, weight and bias: cat's scores must not become car's
    assert all(torch.equal(other.state_dict()[k], fresh[k]) for k in reinit)
    assert torch.equal(other.state_dict()["roi_heads.box_head.fc6.weight"], src["roi_heads.box_head.fc6.weight"])

    # a repeated or empty name is ambiguous only between lists that differ: the same list loads as it is
    for names in (("cat", "cat", "bird"), ("cat", "", "bird")):
        twin = dataclasses.replace(tiny_model_config(num_classes=3), class_names=names)
        save_checkpoint(tmp_path / "twin.pth", maskrcnn.build_model(twin))
        again = maskrcnn.build_model(twin)
        assert init_from_checkpoint(again, tmp_path / "twin.pth", 1e-5) == [], names
        saved = read_file(tmp_path / "twin.pth")["model"]
        assert torch.equal(
            again.state_dict()["roi_heads.box_predictor.cls_score.weight"],
            saved["roi_heads.box_predictor.cls_score.weight"],
        )


# ---------------------------------------------------------------------------------------
# Configuration


def test_config_unknown_key_fails_with_a_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {synthetic: shapes}\nsolver: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"solver\.lrr.*did you mean solver\.lr"):
        load_training_config(path)
    path.write_text("data: {synthetic: shapes}\n")
    with pytest.raises(ConfigError, match=r"eval\.metrc.*did you mean eval\.metric"):
        load_training_config(path, ["eval.metrc=bbox_AP"])


def test_config_overrides_apply_and_values_are_checked(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("data: {synthetic: shapes}\nsolver: {lr: 0.01}\n")
    cfg = load_training_config(
        path,
        [
            "solver.lr=0.5",
            "model.backbone.name=resnet18",
            "solver.milestones=[3, 4]",
            "schedule.kind=alternating",
            "solver.amp=bf16",
        ],
    )
    assert cfg.solver.lr == 0.5 and cfg.model.backbone.name == "resnet18" and cfg.solver.milestones == (3, 4)
    assert cfg.schedule.kind == "alternating" and cfg.solver.amp == "bf16"
    for override, message in (
        ("solver.amp=fp8", "solver.amp"),
        ("schedule.kind=staged", "schedule.kind"),
        ("eval.metric=mAP", "eval.metric"),
        ("data.synthetic=", "no training data"),
        ("data.train_ann=x.json", "either data.synthetic"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_training_config(path, [override])


@pytest.mark.parametrize("name", ["demo_shapes.yaml", "kudzu.yaml", "coco_r50.yaml"])
def test_shipped_configs_load(name):
    cfg = load_training_config(REPO / "src" / "maskrcnn" / "configs" / name)
    assert cfg.solver.lr > 0
    assert cfg.solver.amp == "auto"  # no built-in config hard-codes bf16, which AVX2-only CPUs emulate 19x slower
    maskrcnn.build_model(dataclasses.replace(cfg.model, num_classes=2))  # the model section builds


# ---------------------------------------------------------------------------------------
# Overfitting (slow; run with -m slow)


@pytest.mark.slow
def test_overfits_two_images(shapes, tmp_path):
    cfg = tiny_train_config(
        shapes,
        tmp_path / "run",
        data={"train_ann": str(shapes["val"].ann_file), "train_images": str(shapes["val"].image_dir), "hflip": 0.0},
        solver={"lr": 0.01, "epochs": 150, "warmup_iters": 20, "milestones": [120], "grad_clip": 5.0},
        eval={"every": 50, "metric": "bbox_AP50"},
        model={
            **TINY_MODEL,
            "roi_heads": {**TINY_MODEL["roi_heads"], "representation_size": 128, "mask_channels": [32, 32]},
        },
        log_every=10,
    )
    result = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.3 * losses[0], losses
    assert result["best_metric"] > 0.8, result["history"][-1]
