"""Fine-tuning from a checkpoint in torchvision's published v2 layout (the v2 parity fixture's
file: ``maskrcnn_resnet50_fpn_v2``'s keys, BatchNorm counters included) with our Trainer, on a
few synthetic images and another class count.

The training config names no v2 field: the run takes the layout from the file. The class
heads are re-initialised for 3 classes, everything else is the file's; the backbone's BatchNorm
is frozen (``model.backbone.frozen_bn``, the default, keeps the file's statistics), the FPN's and
the heads' train on batch statistics as in torchvision.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch import nn

from maskrcnn.config import from_dict
from maskrcnn.data import generate_shapes
from maskrcnn.model.backbone import FrozenBatchNorm2d
from maskrcnn.train.config import TrainConfig, check
from maskrcnn.train.trainer import train
from maskrcnn.weights.checkpoint import read_file

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture
def one_thread():
    """One intra-op thread (two compete with other processes for 2 cores), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fine_tuning_from_the_v2_layout_lowers_the_loss(tv2_checkpoint, tmp_path, one_thread):
    shapes = generate_shapes(
        tmp_path / "shapes",
        num_train=2,
        num_val=0,
        image_size=(96, 96),
        objects_per_image=(2, 2),
        object_size=(28, 40),
        seed=0,
    )
    out = tmp_path / "run"
    cfg = check(
        from_dict(
            TrainConfig,
            {
                "model": {
                    "rpn": {"pre_nms_top_n_train": 300, "post_nms_top_n_train": 100, "batch_size_per_image": 64},
                    "roi_heads": {"batch_size_per_image": 32},
                    "transform": {"min_size": [96], "max_size": 128},
                },
                "data": {
                    "train_ann": str(shapes["train"].ann_file),
                    "train_images": str(shapes["train"].image_dir),
                    "batch_size": 2,
                    "workers": 0,
                    "hflip": 0.0,
                },
                "init": {"weights": str(tv2_checkpoint)},
                # one batch (two square images: one aspect-ratio group), seen 8 times: the loss must fall
                "solver": {"lr": 0.005, "epochs": 8, "warmup_iters": 0, "milestones": []},
                "out_dir": str(out),
                "log_every": 1,
                "progress": False,
                "device": "cpu",
            },
        )
    )
    result = train(cfg)
    assert result["iterations"] == 8

    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert saved["backbone"]["fpn_norm"] == "batchnorm" and saved["rpn"]["conv_depth"] == 2
    assert saved["roi_heads"]["box_head"] == "4conv1fc" and saved["roi_heads"]["mask_head_norm"] == "batchnorm"
    assert saved["num_classes"] == 3

    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses

    state = read_file(out / "last.pth")["model"]
    start = torch.load(tv2_checkpoint, weights_only=True)
    # frozen body: the file's statistics, untouched; the FPN's BatchNorm learned from the batches
    assert torch.equal(state["backbone.body.layer1.0.bn1.running_var"], start["backbone.body.layer1.0.bn1.running_var"])
    assert not torch.equal(
        state["backbone.fpn.inner_norms.0.running_mean"], start["backbone.fpn.inner_blocks.0.1.running_mean"]
    )
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4


def test_a_v2_file_loads_into_frozen_batchnorm_with_the_same_outputs(tv2_checkpoint):
    """Eval-mode BatchNorm is the affine map FrozenBatchNorm2d computes, so a fine-tuning run
    that freezes the backbone starts from exactly the published network."""
    from maskrcnn.weights.checkpoint import load

    trainable = load(tv2_checkpoint)
    frozen = load(tv2_checkpoint)  # same weights, body norms swapped below
    frozen_body = type(frozen.backbone.body)("resnet50", frozen_bn=True, bn_eps=1e-5)
    frozen_body.load_state_dict(trainable.backbone.body.state_dict())
    frozen.backbone.body = frozen_body.eval()
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.backbone.body.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.backbone.body.modules())
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        a, b = trainable.backbone(x), frozen.backbone(x)
    for fa, fb in zip(a, b):
        torch.testing.assert_close(fa, fb, rtol=1e-4, atol=1e-4)
