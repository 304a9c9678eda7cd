"""``with_input_size`` and ``predict --input-size``: the size images are resized to."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.config import TransformConfig
from maskrcnn.inference.input_size import with_input_size
from maskrcnn.model.mask_rcnn import MaskRCNN

from ..helpers import bright_forward, tiny_model


@pytest.mark.parametrize(
    ("size", "hw", "expected"),
    [
        (512, (600, 900), (512, 768)),  # the short side sets the scale: 512 / 600
        (512, (600, 2000), (256, 853)),  # the long side capped at 1333 * 512 / 800 = 853: 853 / 2000
        (640, (480, 640), (640, 853)),  # 640 / 480 = 1.333: 853.3 rounds down, as torchvision's floor does
    ],
)
def test_images_are_resized_to_the_new_short_side_with_the_long_side_capped_alike(size, hw, expected):
    model = tiny_model()
    model.config = replace(model.config, transform=TransformConfig())  # the paper's 800 / 1333
    with_input_size(model, size)
    batch, _ = model.preprocess([torch.zeros(3, *hw)])
    assert tuple(batch.image_sizes[0]) == pytest.approx(expected, abs=1)


def test_an_input_size_out_of_range_is_a_one_line_error(tiny_ckpt, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ValueError, match="at least 32"):
        with_input_size(tiny_model(), 16)
    with pytest.raises(ValueError, match="at most 4096"):
        with_input_size(tiny_model(), 4097)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    args = ["predict", "--weights", str(tiny_ckpt), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*args, "--input-size", "8"]) == 2
    assert capsys.readouterr().err.startswith("error: the input size must be an integer of at least 32")
    # too large: refused after loading, before any image is read (100000 was an out-of-memory death)
    assert main([*args, "--input-size", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the input size must be at most 4096") and "--tile" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o" / "predictions.jsonl").exists()


def test_predict_input_size_reaches_the_network(tiny_ckpt, tmp_path, monkeypatch, capsys):  # noqa: F811
    seen = []

    def forward(self, images, *args, **kwargs):
        seen.append(self.preprocess(images)[0].image_sizes[0])
        return bright_forward(self, images, *args, **kwargs)

    monkeypatch.setattr(MaskRCNN, "forward", forward)
    picture = np.zeros((300, 400, 3), np.uint8)
    picture[100:150, 100:150] = 255
    Image.fromarray(picture).save(tmp_path / "a.png")
    assert (
        main(
            [
                "predict",
                "--weights",
                str(tiny_ckpt),
                str(tmp_path / "a.png"),
                "--out",
                str(tmp_path / "o"),
                "--input-size",
                "240",
                "--quiet",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert tuple(seen[0]) == (240, 320)
