"""OpenVINO IR export (``maskrcnn export --out model.xml``) run by OpenVINO against PyTorch.

OpenVINO converts the ONNX graph and computes it with its own CPU kernels, so agreement with our
PyTorch model is an independent check, by the ONNX tests' rule (every detection matched: same
label, box within 0.05 px, score within 1e-3, pasted mask IoU >= 0.98 or explained), on the
torchvision parity checkpoint, at the fixture images' sizes, every aspect ratio of the ONNX
sweep and a batch of mixed sizes.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'maskrcnn[onnx]')")
pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'maskrcnn[openvino]')")

import maskrcnn  # noqa: E402
from maskrcnn.cli import main  # noqa: E402
from maskrcnn.weights.checkpoint import CheckpointError, read_weights  # noqa: E402
from maskrcnn.weights.openvino_model import OpenVinoModel  # noqa: E402

from .test_onnx import assert_same_results, fixture_image, kudzu_photo  # noqa: E402

# Of the ONNX sweep's shapes (test_onnx.SHAPES): 6 px and 19 px tall strips in the graph, 1:30,
# 30:1 at 1333 x 44, a photo with odd padded grids (1088 x 800) and a portrait (704 x 1333).
SHAPES = [(2000, 10), (2000, 30), (10, 2000), (3000, 100), (640, 480), (400, 757)]


@pytest.fixture(scope="module")
def ir(tv_checkpoint, tmp_path_factory):
    """The parity checkpoint exported once to OpenVINO IR, through the command line."""
    out = tmp_path_factory.mktemp("openvino") / "tv.xml"
    assert main(["export", "--weights", str(tv_checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def models(tv_checkpoint, ir):
    return maskrcnn.load(tv_checkpoint), maskrcnn.load(ir)


def test_the_export_is_an_ir_with_float32_weights(models, ir):
    """Two files; the weights are float32 (OpenVINO's converter halves them by default, which
    would move scores past the tolerance): the .bin holds at least 4 bytes per parameter."""
    pytorch, openvino = models
    assert isinstance(openvino, OpenVinoModel)
    assert openvino.config == pytorch.config
    params = sum(p.numel() for p in pytorch.parameters())
    assert ir.with_suffix(".bin").stat().st_size >= 4 * params * 0.99  # folded BatchNorms drop a few
    assert sorted(p.name for p in ir.parent.iterdir()) == ["tv.bin", "tv.xml"]  # no temporary files left


@pytest.fixture(scope="module")
def pytorch_results(models):
    return {name: models[0].predict(fixture_image(name)) for name in ("image_a.png", "image_b.png")}


@pytest.mark.parametrize("name", ["image_a.png", "image_b.png"])
def test_openvino_equals_pytorch_on_the_fixture_images(models, pytorch_results, name):
    """800x1066 and 1207x800 in the graph, 100 detections each (near-equal scores)."""
    ours = pytorch_results[name]
    assert len(ours) == 100
    assert_same_results(ours, models[1].predict(fixture_image(name)))


@pytest.mark.parametrize("width,height", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_openvino_equals_pytorch_at_every_aspect_ratio(models, width, height):
    """30:1 to 1:30, strips 6 px tall in the graph, odd and even padded grids."""
    pytorch, openvino = models
    image = kudzu_photo(width, height)
    ours = pytorch.predict(image)
    assert len(ours) > 0
    assert_same_results(ours, openvino.predict(image))


def test_a_batch_of_mixed_sizes_gives_each_image_its_own_results(models):
    pytorch, openvino = models
    images = [kudzu_photo(640, 480), kudzu_photo(300, 900)]
    for ours, theirs in zip(pytorch.predict(images), openvino.predict(images)):
        assert_same_results(ours, theirs)


def test_a_threshold_set_at_load_reaches_the_graph(pytorch_results, ir):
    """A threshold in the widest gap between two of the 100 scores. PyTorch's result there is its
    default one cut at it (greedy NMS never lets a lower-scored box decide for a kept one)."""
    ours = pytorch_results["image_b.png"]
    scores = np.sort(ours.scores)[::-1]
    k = int(np.argmax(scores[:-1] - scores[1:]))
    assert scores[k] - scores[k + 1] > 4e-3  # else the cut would hinge on rounding
    thresh = float(scores[k] + scores[k + 1]) / 2
    theirs = maskrcnn.load(ir, score_thresh=thresh).predict(fixture_image("image_b.png"))
    assert len(theirs) == k + 1
    assert_same_results(ours[ours.scores > thresh], theirs)


def test_export_refuses_what_it_must_not_write(tiny_ckpt, ir, tmp_path, capsys):
    """A foreign model.bin beside --out model.xml is the user's file; an IR, like an ONNX file,
    is not a checkpoint to train or export from; INT8 is ONNX Runtime's."""
    (tmp_path / "model.bin").write_bytes(b"my data")
    assert main(["export", "--weights", str(tiny_ckpt), "--out", str(tmp_path / "model.xml")]) == 2
    assert "model.bin exists and is not part of an OpenVINO model written by maskrcnn export" in capsys.readouterr().err
    assert (tmp_path / "model.bin").read_bytes() == b"my data" and not (tmp_path / "model.xml").exists()
    assert main(["export", "--weights", str(ir), "--out", str(tmp_path / "again.xml")]) == 2
    assert "is already an exported model" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is an OpenVINO model .*predict, evaluate and serve only"):
        read_weights(ir)
    argv = ["export", "--weights", str(tiny_ckpt), "--out", str(tmp_path / "q.xml"), "--int8", "--calib", "x"]
    assert main(argv) == 2
    assert "--int8 writes an ONNX file" in capsys.readouterr().err


def test_a_foreign_bin_beside_an_earlier_export_is_refused(tiny_ckpt, ir, tmp_path, capsys):
    """The .xml being ours does not make the .bin ours: its size must be what the graph reads
    (a tester's ``cp model.xml m2.xml; echo foreign > m2.bin`` was replaced)."""
    shutil.copy(ir, tmp_path / "m2.xml")
    (tmp_path / "m2.bin").write_text("foreign\n")
    assert main(["export", "--weights", str(tiny_ckpt), "--out", str(tmp_path / "m2.xml")]) == 2
    assert "m2.bin exists and is not part of an OpenVINO model" in capsys.readouterr().err
    assert (tmp_path / "m2.bin").read_text() == "foreign\n"


def test_a_missing_or_wrong_bin_is_named(ir, tmp_path):
    shutil.copy(ir, tmp_path / "lone.xml")
    with pytest.raises(CheckpointError, match="lone.xml: its weights lone.bin are not beside it"):
        maskrcnn.load(tmp_path / "lone.xml")
    (tmp_path / "lone.bin").write_bytes(ir.with_suffix(".bin").read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="lone.bin holds 1,000 bytes, the graph reads"):
        maskrcnn.load(tmp_path / "lone.xml")


def test_an_earlier_export_is_replaced_and_found_by_content(tiny_ckpt, ir, tmp_path):
    """Replacing the parity model's IR with a tiny model's: both files change, nothing else is left."""
    for part in ("tv.xml", "tv.bin"):
        shutil.copy(ir.parent / part, tmp_path / part)
    assert main(["export", "--weights", str(tiny_ckpt), "--out", str(tmp_path / "tv.xml")]) == 0
    assert (tmp_path / "tv.bin").stat().st_size < ir.with_suffix(".bin").stat().st_size / 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv.bin", "tv.xml"]
    shutil.move(tmp_path / "tv.xml", tmp_path / "renamed.cfg")  # by content; the weights go by the .xml's name
    shutil.move(tmp_path / "tv.bin", tmp_path / "renamed.bin")
    assert isinstance(maskrcnn.load(tmp_path / "renamed.cfg"), OpenVinoModel)


def test_an_ir_that_is_not_ours_is_refused(tmp_path):
    """OpenVINO's own conversion of some other network: no maskrcnn metadata."""
    import openvino as ov

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    ov.save_model(ov.convert_model(net, example_input=torch.zeros(1, 3, 8, 8)), str(tmp_path / "other.xml"))
    with pytest.raises(CheckpointError, match="other.xml: not a model written by maskrcnn export"):
        maskrcnn.load(tmp_path / "other.xml")


def test_predict_command_runs_the_ir_unchanged(models, ir, tmp_path):
    import json

    out = tmp_path / "out"
    image = tmp_path / "strip.png"
    from PIL import Image

    Image.fromarray(kudzu_photo(1280, 200)).save(image)
    assert main(["predict", str(image), "--weights", str(ir), "--out", str(out), "--quiet"]) == 0
    entries = json.loads((out / "predictions.json").read_text())
    expected = models[0].predict(np.asarray(Image.open(image)))
    assert len(entries) == len(expected) > 0
    assert sorted(e["score"] for e in entries) == pytest.approx(sorted(expected.scores.tolist()), abs=1e-3)
