"""Weight files: what a trained checkpoint needs to load, and the ImageNet body weights."""

from __future__ import annotations

import dataclasses

import torch

import maskrcnn
from maskrcnn.config import ModelConfig, apply_overrides
from maskrcnn.model.backbone import ResNetBody
from maskrcnn.weights.checkpoint import load_backbone_weights, save_checkpoint

TINY = [
    "num_classes=2",
    "backbone.name=resnet18",
    "backbone.fpn_channels=32",
    "roi_heads.representation_size=32",
    "roi_heads.mask_channels=[8,8]",
]


def test_a_trained_checkpoint_loads_without_the_imagenet_file_it_started_from(tmp_path):
    torch.manual_seed(0)
    imagenet = tmp_path / "resnet18-imagenet.pth"
    classifier = ResNetBody("resnet18", frozen_bn=False).state_dict()
    torch.save({**classifier, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, imagenet)
    cfg = apply_overrides(ModelConfig(), [*TINY, f"backbone.weights={imagenet}"])
    model = maskrcnn.build_model(cfg)
    load_backbone_weights(model.backbone.body, cfg.backbone.weights)  # as training does before its first step
    assert torch.equal(model.backbone.body.conv1.weight, classifier["conv1.weight"])
    save_checkpoint(tmp_path / "trained.pth", model)

    imagenet.unlink()  # the config still names it, but the checkpoint holds every weight
    loaded = maskrcnn.load(tmp_path / "trained.pth")
    assert loaded.config.backbone.weights == str(imagenet)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_build_model_gives_random_weights_whatever_the_config_names(tmp_path):
    cfg = apply_overrides(ModelConfig(), [*TINY, f"backbone.weights={tmp_path / 'absent.pth'}"])
    torch.manual_seed(0)
    a = maskrcnn.build_model(cfg)
    torch.manual_seed(0)
    b = maskrcnn.build_model(dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, weights="")))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_folder_given_as_weights_is_called_a_folder_not_missing(tmp_path):
    """Round 2 of issue 17: ``--weights runs/demo`` (a folder) said "checkpoint not found"."""
    import pytest

    from maskrcnn.weights.checkpoint import CheckpointError

    (tmp_path / "run.pth").mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a file"):
        maskrcnn.load(tmp_path / "run.pth")
