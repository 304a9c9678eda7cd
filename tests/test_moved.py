"""Modules that moved into folders stay importable by their old names, with a warning."""

import importlib
import sys

import pytest

import maskrcnn
from maskrcnn._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module_and_warns(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is new and module.__spec__.name == MOVED[old]


def test_public_names_unchanged():
    for old in ("maskrcnn.engine.evaluate", "maskrcnn.engine.train", "maskrcnn.engine.train_config"):
        sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning):
        from maskrcnn.engine.evaluate import coco_evaluate  # noqa: F401  the README of 0.1 showed these
        from maskrcnn.engine.train import train
        from maskrcnn.engine.train_config import TrainConfig  # noqa: F401

    assert train is maskrcnn.train.trainer.train
    for name in ("load", "save_checkpoint", "build_model", "MaskRCNN", "OnnxModel", "ModelConfig", "CheckpointError"):
        assert hasattr(maskrcnn, name)
