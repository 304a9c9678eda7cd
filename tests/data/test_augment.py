"""Augmentation keeps image, boxes and masks consistent: boxes equal the masks' tight boxes after
every transform (computed here with numpy, independently), rotations match ``np.rot90``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskrcnn.data.augment import (
    Augment,
    AugmentConfig,
    Augmented,
    color,
    crop,
    rot90,
    scale,
    tight_boxes,
    vflip,
)
from maskrcnn.data.transforms import hflip
from maskrcnn.structures import Targets
from maskrcnn.train.config import ConfigError, TrainConfig, check


def np_tight(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


def sample(h: int = 37, w: int = 53, seed: int = 0) -> tuple[torch.Tensor, Targets]:
    """A random image and three instances (blobs of random pixels) with their tight boxes."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, h, w), np.uint8)
    masks[0, 3:11, 5:20] = 1
    masks[1, 20:35, 30:52] = rng.random((15, 22)) < 0.5
    masks[2, 0:2, 0:1] = 1  # a corner instance: crops drop it
    boxes = torch.tensor([np_tight(m) for m in masks])
    image = torch.from_numpy(rng.random((3, h, w), dtype=np.float32))
    return image, Targets(boxes=boxes, labels=torch.tensor([1, 2, 3]), masks=torch.from_numpy(masks))


def assert_consistent(image: torch.Tensor, t: Targets) -> None:
    assert t.masks is not None and image.shape[-2:] == t.masks.shape[-2:]
    assert len(t.boxes) == len(t.labels) == len(t.masks)
    for box, mask in zip(t.boxes.tolist(), t.masks.numpy()):
        assert mask.any() and box == np_tight(mask)


def test_tight_boxes_hand_computed() -> None:
    masks = torch.zeros((2, 4, 6), dtype=torch.uint8)
    masks[0, 1:3, 2:5] = 1  # rows 1..2, columns 2..4
    assert tight_boxes(masks).tolist() == [[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_matches_numpy(k: int) -> None:
    image, t = sample()
    out, ot = rot90(image, t, k)
    np.testing.assert_array_equal(out.numpy(), np.rot90(image.numpy(), k, axes=(1, 2)))
    np.testing.assert_array_equal(ot.masks.numpy(), np.rot90(t.masks.numpy(), k, axes=(1, 2)))
    assert_consistent(out, ot)
    assert ot.labels.tolist() == [1, 2, 3]


@pytest.mark.parametrize("name", ["hflip", "vflip", "scale_down", "scale_up", "crop"])
def test_geometric_transforms_keep_boxes_tight(name: str) -> None:
    image, t = sample()
    out, ot = {
        "hflip": lambda: hflip(image, t),
        "vflip": lambda: vflip(image, t),
        "scale_down": lambda: scale(image, t, 0.6),
        "scale_up": lambda: scale(image, t, 1.7),
        "crop": lambda: crop(image, t, 2, 3, 30, 40),
    }[name]()
    assert_consistent(out, ot)
    if name == "vflip":
        np.testing.assert_array_equal(ot.masks.numpy(), t.masks.numpy()[:, ::-1])
    if name == "crop":  # the corner instance (rows 0..1, column 0) is outside: dropped with its label
        assert out.shape == (3, 30, 40) and ot.labels.tolist() == [1, 2]
        np.testing.assert_array_equal(out.numpy(), image.numpy()[:, 2:32, 3:43])
    if name.startswith("scale"):
        assert out.shape[-2:] == (
            round(37 * (0.6 if name == "scale_down" else 1.7)),
            round(53 * (0.6 if name == "scale_down" else 1.7)),
        )


def test_random_pipeline_keeps_boxes_tight_over_many_draws() -> None:
    cfg = AugmentConfig(vflip=0.5, rot90=0.5, scale=(0.5, 2.0), crop=32, brightness=0.3, contrast=0.3, saturation=0.3)
    aug, seen = Augment(cfg, hflip=0.5), set()
    for seed in range(40):
        image, t = sample(seed=seed)
        out, ot = aug(image, t, torch.Generator().manual_seed(seed))
        assert_consistent(out, ot)
        assert out.shape[-1] <= 32 and out.shape[-2] <= 32 and 0 <= out.min() and out.max() <= 1
        seen.add(tuple(out.shape))
    assert len(seen) > 3  # the draws differ


def test_color_identity_and_grey() -> None:
    image, _ = sample()
    torch.testing.assert_close(color(image.clone(), 1.0, 1.0, 1.0), image)
    grey = color(image.clone(), 1.0, 1.0, 0.0)  # saturation 0: every channel is the luma
    luma = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    for c in range(3):
        torch.testing.assert_close(grey[c], luma)


def test_augmented_is_deterministic_per_epoch_and_index() -> None:
    data = [(*sample(seed=i), {"image_id": i}) for i in range(3)]
    ds = Augmented(data, AugmentConfig(rot90=1.0, crop=32), hflip=0.5, seed=7)
    a = ds[1]
    b = ds[1]
    torch.testing.assert_close(a[0], b[0])
    assert a[2] == {"image_id": 1}
    crops = []
    for epoch in range(6):  # another epoch draws anew
        ds.epoch = epoch
        crops.append(ds[1][0])
    assert any(not torch.equal(crops[0], c) for c in crops[1:])


def test_config_errors_are_one_line() -> None:
    cfg = TrainConfig()
    cfg.data.synthetic = "shapes"
    cfg.augment.scale = (1.5, 1.0)
    with pytest.raises(ConfigError, match=r"augment.scale must be \[low, high\]"):
        check(cfg)
    cfg.augment = AugmentConfig(rot90=2.0)
    with pytest.raises(ConfigError, match="augment.rot90 is a probability"):
        check(cfg)
    with pytest.raises(ValueError, match="crop needs instance masks"):
        crop(torch.zeros(3, 8, 8), Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)), 0, 0, 4, 4)


def test_training_config_reads_the_augment_section(tmp_path) -> None:
    from maskrcnn.train.config import load_training_config

    cfg = load_training_config("demo_shapes", ["augment.vflip=0.5", "augment.scale=[0.8,1.25]", "augment.crop=256"])
    assert cfg.augment == AugmentConfig(vflip=0.5, scale=(0.8, 1.25), crop=256) and cfg.augment.enabled
    assert not load_training_config("demo_shapes").augment.enabled  # off unless asked: data.hflip only
    with pytest.raises(ConfigError, match="augment.crop is 0"):
        load_training_config("demo_shapes", ["augment.crop=8"])
    with pytest.raises(ConfigError, match="did you mean augment.vflip"):  # as in every section
        load_training_config("demo_shapes", ["augment.vflp=0.5"])
