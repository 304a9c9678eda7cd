"""Training in several processes: torch.distributed with Gloo on the CPU, launched by torchrun
(``python -m torch.distributed.run ... -m maskrcnn train``) or spawned here.

The equivalence test needs per-image losses whose batch mean is the mean of the images' own
losses, so that averaging the gradients of two processes is the gradient of one process with
both images: every image has the same boxes at the same size (the same number of sampled
anchors and RoIs), every candidate is sampled (no random subset), the RoI foreground threshold
keeps only the ground-truth boxes themselves as positives, and BatchNorm is frozen.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import maskrcnn
from maskrcnn.config import ConfigError, ModelConfig, from_dict, to_dict
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.train import distributed
from maskrcnn.train.config import TrainConfig, check, load_training_config
from maskrcnn.train.schedules import joint_schedule
from maskrcnn.train.trainer import NonFiniteLossError, train
from maskrcnn.train.validate import validate
from maskrcnn.weights.checkpoint import read_file

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]

BOXES = [(8, 10, 36, 40, 1), (30, 28, 58, 56, 2)]  # x1 y1 x2 y2 label: the same in every image
SIZE = 64

MODEL = {
    "backbone": {"name": "resnet18", "frozen_bn": True, "trainable_layers": 5, "fpn_channels": 16},
    "anchors": {"sizes": [16, 32, 64, 128, 256]},
    "rpn": {
        "pre_nms_top_n_train": 100,
        "post_nms_top_n_train": 16,
        "pre_nms_top_n_test": 50,
        "post_nms_top_n_test": 10,
        "batch_size_per_image": 100_000,
    },  # every anchor that is not neutral
    "roi_heads": {
        "batch_size_per_image": 100_000,
        "fg_iou_thresh": 0.99,
        "bg_iou_thresh": 0.99,  # every RoI; gt boxes the positives
        "representation_size": 16,
        "mask_channels": [8],
    },
    "transform": {"min_size": [SIZE], "max_size": SIZE},
}


def write_coco(root: Path, images: int, seed: int, empty: tuple[int, ...] = ()) -> tuple[str, str]:
    """``images`` noise pictures of SIZE x SIZE with BOXES drawn as flat rectangles (none in the
    images listed in ``empty``), and their COCO JSON. Returns (annotation file, image folder)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    entries, annotations = [], []
    for i in range(images):
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        if i not in empty:
            for x1, y1, x2, y2, label in BOXES:
                pixels[y1:y2, x1:x2] = rng.integers(0, 256, 3, dtype=np.uint8)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": label,
                        "iscrowd": 0,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                    }
                )
        Image.fromarray(pixels).save(root / f"{i}.png")
        entries.append({"id": i + 1, "file_name": f"{i}.png", "width": SIZE, "height": SIZE})
    ann = root / "annotations.json"
    ann.write_text(
        json.dumps(
            {
                "images": entries,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            }
        )
    )
    return str(ann), str(root)


def run_config(
    train_data: tuple[str, str], out_dir: Path, val_data: tuple[str, str] | None = None, batch_size: int = 1, **top
) -> TrainConfig:
    """2 epochs, fp32, no warm-up, no flips, a metrics line per step; ``top``: other top-level fields."""
    data = {
        "train_ann": train_data[0],
        "train_images": train_data[1],
        "batch_size": batch_size,
        "workers": 0,
        "hflip": 0.0,
    }
    if val_data is not None:
        data.update(val_ann=val_data[0], val_images=val_data[1])
    return check(
        from_dict(
            TrainConfig,
            {
                "model": MODEL,
                "data": data,
                "solver": {"lr": 0.02, "epochs": 2, "warmup_iters": 0},
                "eval": {"metric": "bbox_AP", "num_visualize": 0},
                "out_dir": str(out_dir),
                "threads": 1,
                "log_every": 1,
                "progress": False,
                **top,
            },
        )
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    config: Path, overrides: list[str], processes: int = 2, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=N -m maskrcnn train CONFIG ...`` on 127.0.0.1; killed (a
    hang) after ``timeout`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "maskrcnn",
        "train",
        str(config),
        *overrides,
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a process waiting for another?):\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.allclose(value.float(), b[key].float(), rtol=1e-4, atol=2e-6), (
            key,
            float((value - b[key]).abs().max()),
        )


# ---------------------------------------------------------------------------------------


def test_two_processes_of_one_image_train_as_one_process_of_two(tmp_path):
    """4 images, 2 steps an epoch, 2 epochs: one process with 2 images a step, and two Gloo
    processes with 1 image each, stopped after 3 steps and resumed. Same weights at the end."""
    data = write_coco(tmp_path / "train", 4, seed=0)
    train(run_config(data, tmp_path / "one", batch_size=2))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(run_config(data, tmp_path / "two"))))

    started = time.monotonic()
    cut = torchrun(config, ["solver.max_iters=3"])
    assert cut.returncode == 0, cut.stdout[-3000:]
    assert "training max_iters after 3 iterations" in cut.stdout
    assert read_file(tmp_path / "two" / "last.pth")["train_state"]["iteration"] == 3
    resumed = torchrun(config, ["--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "training completed after 4 iterations" in resumed.stdout
    assert time.monotonic() - started < 60

    two, single = read_file(tmp_path / "two" / "last.pth"), read_file(tmp_path / "one" / "last.pth")
    same_weights(two["model"], single["model"])
    momenta = [
        [s["momentum_buffer"] for s in ckpt["train_state"]["optimizer"]["state"].values()] for ckpt in (two, single)
    ]
    assert len(momenta[0]) == len(momenta[1]) > 0
    assert all(torch.allclose(x, y, rtol=1e-4, atol=2e-6) for x, y in zip(*momenta))

    torch.manual_seed(0)  # the trainer's initial weights: the config's seed, then the model
    start = maskrcnn.build_model(load_training_config(tmp_path / "one" / "config.yaml").model).state_dict()
    moved = max(float((single["model"][k].float() - v.float()).abs().max()) for k, v in start.items())
    assert moved > 1e-3  # four steps changed the weights: the equality above is not that of untouched weights
    # only process 0 wrote: one line per step, none twice, and the run's files
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_a_process_whose_batch_has_no_object_does_not_stop_the_others(tmp_path):
    """Image 1 of 2 has no object, so in every step one of the two processes trains on an empty
    image: every parameter still gets a (zero) gradient there, and DDP, which waits for every
    gradient, goes on. Validation on 3 images is sharded 2 + 1 and gives what one process gives."""
    train_data = write_coco(tmp_path / "train", 2, seed=1, empty=(1,))
    val_data = write_coco(tmp_path / "val", 3, seed=2)
    cfg = run_config(train_data, tmp_path / "run", val_data)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    done = torchrun(config, [])
    assert done.returncode == 0, done.stdout[-3000:]
    assert "training completed after 2 iterations" in done.stdout

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(
        set(r) >= {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"} for r in steps
    )
    epoch = [r for r in records if "val_loss" in r][-1]
    model = maskrcnn.load(tmp_path / "run" / "last.pth")
    resolved = load_training_config(tmp_path / "run" / "config.yaml")  # solver.amp as the run resolved it
    values, _ = validate(model, joint_schedule(1)[0], _val_set(val_data), resolved, torch.device("cpu"))
    assert epoch["val_loss"] == pytest.approx(values["val_loss"], rel=1e-4)  # 3 images, none counted twice
    assert epoch["bbox_AP"] == pytest.approx(values["bbox_AP"], abs=1e-6)


def _val_set(val_data: tuple[str, str]):
    from maskrcnn.data import CocoDataset

    return CocoDataset(*val_data, category_ids=[1, 2])


# ---------------------------------------------------------------------------------------
# Spawned processes: what torchrun sets, then train() in each


def _nan_in_process_1(rank: int, port: int, cfg: TrainConfig, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    forward, calls = MaskRCNN.forward, [0]

    def poisoned(self, images, targets=None, **kwargs):
        result = forward(self, images, targets, **kwargs)
        if self.training:
            calls[0] += 1
            if rank == 1 and calls[0] == 2:
                result.losses["loss_mask"] = result.losses["loss_mask"] * float("nan")
        return result

    MaskRCNN.forward = poisoned
    destroy, alive = dist.destroy_process_group, []

    def counting_destroy(*args, **kwargs):  # the DDP wrappers still alive as the group is left
        alive.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
        return destroy(*args, **kwargs)

    dist.destroy_process_group = counting_destroy
    try:
        train(cfg)
        message = "no error"
    except NonFiniteLossError as e:
        message = str(e)
    Path(out, f"rank{rank}.txt").write_text(message)
    Path(out, f"alive{rank}.txt").write_text(str(alive))
    distributed.exit_process(0)  # as ``maskrcnn train`` leaves under torchrun


def test_a_nan_in_one_process_stops_every_process_with_the_message(tmp_path):
    data = write_coco(tmp_path / "train", 4, seed=3)
    cfg = run_config(data, tmp_path / "run", checkpoint_every_iters=1)
    context = mp.start_processes(
        _nan_in_process_1, args=(free_port(), cfg, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the processes did not stop within 120 s")
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert (
        "non-finite loss at iteration 2" in messages[0] and "rank 1: " in messages[0] and "loss_mask=nan" in messages[0]
    )
    assert "rank 0:" not in messages[0]
    # The error's traceback must not keep DDP (and its reducer) past the process group: that
    # once aborted a process at exit in CI.
    assert [(tmp_path / f"alive{r}.txt").read_text() for r in range(2)] == ["[0]", "[0]"]
    assert read_file(tmp_path / "run" / "last.pth")["train_state"]["iteration"] == 1  # the last good state


def test_sync_bn_replaces_trainable_batchnorm_only():
    trainable = from_dict(
        ModelConfig, {**MODEL, "num_classes": 2, "backbone": {**MODEL["backbone"], "frozen_bn": False}}
    )
    synced = dataclasses.replace(trainable, backbone=dataclasses.replace(trainable.backbone, sync_bn=True))
    torch.manual_seed(0)
    plain = maskrcnn.build_model(trainable).backbone.body.train()
    torch.manual_seed(0)
    body = maskrcnn.build_model(synced).backbone.body.train()
    norms = [m for m in body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    x = torch.rand(2, 3, 64, 64)
    assert all(torch.allclose(a, b) for a, b in zip(plain(x), body(x)))  # one process: plain BatchNorm
    assert body.state_dict().keys() == plain.state_dict().keys()  # checkpoints load either way

    frozen = dataclasses.replace(synced, backbone=dataclasses.replace(synced.backbone, frozen_bn=True))
    assert not any(
        isinstance(m, nn.SyncBatchNorm) for m in maskrcnn.build_model(frozen).modules()
    )  # frozen stays frozen
    with pytest.raises(ConfigError, match="sync_bn=true needs trainable BatchNorm"):
        check(from_dict(TrainConfig, {"model": to_dict(frozen), "data": {"synthetic": "shapes"}}))


def test_shards_cover_every_item_once(monkeypatch):
    for world in (1, 2, 3, 4, 7):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        shares = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "rank", lambda: rank)
            shares.append(distributed.shard(list(range(5))))
        assert [i for s in shares for i in s] == [0, 1, 2, 3, 4]  # in order, once each
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_configured_timeout_reaches_init_process_group(monkeypatch):
    """A stopped process must not stall the others for Gloo's default 30 minutes: the config's
    ``dist_timeout_minutes`` (default 10) is the process group's timeout."""
    import datetime

    class Joined(Exception):
        pass

    seen: list[dict] = []

    def record(backend, **kwargs):
        seen.append({"backend": backend, **kwargs})
        raise Joined  # stop before any training

    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed.dist, "init_process_group", record)
    for overrides, minutes in (({}, 10), ({"dist_timeout_minutes": 2.5}, 2.5)):
        cfg = from_dict(TrainConfig, {"data": {"synthetic": "shapes"}, "device": "cpu", **overrides})
        with pytest.raises(Joined):
            train(cfg)
        assert seen[-1]["backend"] == "gloo" and seen[-1]["timeout"] == datetime.timedelta(minutes=minutes)
    with pytest.raises(ConfigError, match="dist_timeout_minutes"):
        check(from_dict(TrainConfig, {"data": {"synthetic": "shapes"}, "dist_timeout_minutes": 0}))
