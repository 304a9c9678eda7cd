"""Percentile intensity normalisation: by hand, and the same pixels in training, prediction and tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.config import ConfigError, ModelConfig, apply_overrides
from maskrcnn.data import normalize
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.images import load_rgb, normalized_rgb
from maskrcnn.data.normalize import check_percentiles, image_range, stretch
from maskrcnn.inference.tiling import PillowTiles, tile_grid
from maskrcnn.model.build import build_model
from maskrcnn.structures import Detections, ModelOutput
from maskrcnn.weights.checkpoint import load, save_checkpoint

from ..helpers import TINY


def test_stretch_and_percentiles_by_hand():
    values = np.array([[0, 100, 200, 300, 400]], dtype=np.uint16)
    assert stretch(values, 100, 300).tolist() == [[0, 0, 128, 255, 255]]  # 127.5 rounds to even, 128
    assert stretch(values, 50, 50).tolist() == [[0] * 5]  # a flat range holds no contrast
    ramp = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    # Linear interpolation between order statistics: the p-th percentile of 0..999 is p / 100 * 999.
    assert image_range(ramp, (1.0, 99.0)) == pytest.approx((9.99, 989.01))


@pytest.mark.parametrize("bad", [(99, 1), (1,), (1, 2, 3), (-1, 50), (1, 101), (float("nan"), 99)])
def test_bad_percentiles_are_one_line_errors(bad):
    with pytest.raises(ValueError, match="percentiles must be two numbers"):
        check_percentiles(bad)
    with pytest.raises(ConfigError, match="transform.percentiles"):
        build_model(apply_overrides(ModelConfig(), [*TINY, f"transform.percentiles={list(bad)}"]))


def twelve_bit(h: int = 60, w: int = 80) -> np.ndarray:
    rng = np.random.default_rng(1)
    image = rng.normal(200, 20, (h, w))
    image[10:30, 20:50] = rng.normal(2500, 100, (20, 30))
    return image.clip(0, 4095).astype(np.uint16)


def expected_rgb(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """The stretch computed here in float64, from numpy's percentiles of every pixel."""
    lo, hi = np.percentile(raw.astype(np.float64), [low, high])
    gray = np.clip(np.rint((raw - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def test_the_checkpoint_carries_the_percentiles_and_training_and_prediction_read_alike(tmp_path):
    raw = twelve_bit()
    Image.fromarray(raw).save(tmp_path / "cells.png")  # a 16-bit PNG (Pillow mode I;16)
    model = build_model(apply_overrides(ModelConfig(), [*TINY, "transform.percentiles=[1,99.8]"]))
    save_checkpoint(tmp_path / "m.pth", model)
    loaded = load(tmp_path / "m.pth")
    assert loaded.config.transform.percentiles == (1.0, 99.8)

    seen = []

    def forward(images, targets=None, propose=None, score_thresh=None):
        seen.extend(im.clone() for im in images)
        return ModelOutput(detections=[Detections.empty() for _ in images])

    loaded.forward = forward
    loaded.predict(tmp_path / "cells.png")
    expected = expected_rgb(raw, 1.0, 99.8)
    assert torch.equal(seen[0], torch.from_numpy(expected).permute(2, 0, 1))  # (3, H, W) uint8, as the model takes it
    assert expected.max() == 255, "the bright region is white, not 2500 / 257 = 10"

    # Training reads the file the same way (the dataset gets the model's percentiles).
    coco = {
        "images": [{"id": 1, "file_name": "cells.png", "height": 60, "width": 80}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [20, 10, 30, 20],
                "area": 600,
                "iscrowd": 0,
                "segmentation": [[20, 10, 50, 10, 50, 30, 20, 30]],
            }
        ],
        "categories": [{"id": 1, "name": "cell"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    dataset = CocoDataset(tmp_path / "gt.json", tmp_path, percentiles=(1.0, 99.8))
    assert np.array_equal(dataset.load_image(0), expected)
    # Without percentiles: the fixed rule, a dark picture.
    assert load_rgb(tmp_path / "cells.png").max() == round(raw.max() / 257)


def test_tiles_are_stretched_by_the_whole_images_sampled_percentiles(monkeypatch):
    monkeypatch.setattr(normalize, "MAX_SAMPLES", 500)  # every 4th row and column of 60 x 80 (15 x 20 = 300)
    raw = twelve_bit()
    assert normalize.sample_step(60, 80) == 4
    whole = normalized_rgb(raw, (2.0, 98.0))
    lo, hi = np.percentile(raw[::4, ::4].astype(np.float64), [2.0, 98.0])
    assert np.array_equal(whole, np.repeat(stretch(raw, lo, hi)[:, :, None], 3, axis=2))
    source = PillowTiles(Image.fromarray(raw), (2.0, 98.0))
    for t in tile_grid(60, 80, 32, 0.25):
        assert np.array_equal(source.read(t), whole[t.y0 : t.y1, t.x0 : t.x1])
