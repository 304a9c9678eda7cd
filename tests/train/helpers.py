"""The tiny model and training configuration of the trainer tests (the ``shapes`` dataset they
train on is a fixture in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from maskrcnn.config import ModelConfig, from_dict
from maskrcnn.train.config import TrainConfig, check

TINY_MODEL = {
    "backbone": {"name": "resnet18", "frozen_bn": False, "trainable_layers": 5, "fpn_channels": 32},
    "anchors": {"sizes": [16, 32, 64, 128, 256]},
    "rpn": {
        "pre_nms_top_n_train": 200,
        "post_nms_top_n_train": 100,
        "pre_nms_top_n_test": 100,
        "post_nms_top_n_test": 50,
        "batch_size_per_image": 64,
    },
    "roi_heads": {"batch_size_per_image": 32, "representation_size": 32, "mask_channels": [8, 8]},
    "transform": {"min_size": [64], "max_size": 96},
}


def tiny_model_config(num_classes: int = 3) -> ModelConfig:
    return from_dict(ModelConfig, {**TINY_MODEL, "num_classes": num_classes})


def tiny_train_config(shapes: dict, out_dir: Path, device: str = "cpu", **sections: dict) -> TrainConfig:
    """3 iterations per epoch (6 images, batch 2), workers 0, no progress bar."""
    data = {
        "device": device,
        "model": TINY_MODEL,
        "data": {
            "train_ann": str(shapes["train"].ann_file),
            "train_images": str(shapes["train"].image_dir),
            "val_ann": str(shapes["val"].ann_file),
            "val_images": str(shapes["val"].image_dir),
            "batch_size": 2,
            "workers": 0,
        },
        "solver": {"lr": 0.01, "epochs": 1, "warmup_iters": 2},
        "eval": {"num_visualize": 2},
        "out_dir": str(out_dir),
        "log_every": 1,
        "progress": False,
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return check(from_dict(TrainConfig, data))
