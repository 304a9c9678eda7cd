"""ONNX export run by ONNX Runtime against the PyTorch model it came from.

ONNX Runtime computes the graph with its own kernels (convolutions, RoiAlign,
NonMaxSuppression), so agreement with our PyTorch ops is an independent check of both, on
the parity fixtures' checkpoints (torchvision v1 and v2 layouts, a Detectron2 model-zoo .pkl)
and on small models in our own format (ResNet-18, ResNeXt-50). Every detection must be matched
by one of the same label, boxes within 0.05 px, scores within 1e-3 and pasted masks at IoU >=
0.98, in the original image frame, through the same ``predict`` as users call.

The one exemption from the mask IoU is measured, not tolerated (issue 16, item 3): torchvision's
paste truncates the box grown by (M + 2) / M to integers, so a box corner within a few thousandths
of a pixel of an integer moves the whole pasted mask by one pixel when the two runtimes' boxes
differ by float noise (on scikit-image's ``hubble_deep_field`` a corner 0.003 px from an integer:
a 0.006 px move of that box alone gives IoU 0.899, 879 of 8252 pixels, in PyTorch itself). A mask
below the IoU is accepted only when the two boxes truncate to different integers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'maskrcnn[onnx]')")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'maskrcnn[onnx]')")

import maskrcnn  # noqa: E402
from maskrcnn.cli import main  # noqa: E402
from maskrcnn.config import ConfigError, ModelConfig, apply_overrides  # noqa: E402
from maskrcnn.ops.boxes import box_iou  # noqa: E402
from maskrcnn.ops.paste import _expand_boxes  # noqa: E402
from maskrcnn.weights.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from maskrcnn.weights.export import ExportError, check_exportable, export  # noqa: E402

from ..helpers import KUDZU, TINY, TV_PARITY, d2_checkpoint, need  # noqa: E402

BOX_TOL, SCORE_TOL, MASK_IOU = 0.05, 1e-3, 0.98


def assert_same_results(ours, onnx) -> None:
    """Every PyTorch detection matched by an ONNX one of the same label (and none left over)."""
    assert onnx.error is None and ours.error is None
    assert len(onnx) == len(ours), (len(onnx), len(ours))
    if not len(ours):
        return
    iou = box_iou(torch.from_numpy(ours.boxes), torch.from_numpy(onnx.boxes))  # (N, N)
    iou[torch.from_numpy(ours.labels)[:, None] != torch.from_numpy(onnx.labels)[None, :]] = -1
    taken: set[int] = set()
    for i in torch.argsort(torch.from_numpy(ours.scores), descending=True).tolist():
        row = iou[i].clone()
        row[list(taken)] = -1
        j = int(row.argmax())
        assert row[j] > 0, f"detection {i} (label {ours.labels[i]}, score {ours.scores[i]:.4f}) has no ONNX match"
        taken.add(j)
        assert np.abs(onnx.boxes[j] - ours.boxes[i]).max() <= BOX_TOL, (i, onnx.boxes[j], ours.boxes[i])
        assert abs(onnx.scores[j] - ours.scores[i]) <= SCORE_TOL, (i, onnx.scores[j], ours.scores[i])
        assert onnx.class_names[j] == ours.class_names[i]
        if ours.rles is not None:
            m_iou = float(mask_util.iou([onnx.rles[j]], [ours.rles[i]], [0])[0, 0])
            # A pixel whose probability is within ~1e-4 of the threshold can flip either way, and
            # in a mask under 50 pixels one pixel is more than 1 - MASK_IOU: those may differ by one.
            assert (
                m_iou >= MASK_IOU
                or pixels_differing(onnx.rles[j], ours.rles[i]) <= 1
                or paste_grids_differ(onnx.boxes[j], ours.boxes[i])
            ), (i, m_iou)


def paste_grids_differ(a: np.ndarray, b: np.ndarray, m: int = 28) -> bool:
    """Whether two boxes paste an M x M mask onto different pixel grids: torchvision's paste
    grows each box by (M + 2) / M about its centre and truncates the corners to integers."""
    grown = _expand_boxes(torch.tensor(np.stack([a, b])), (m + 2) / m).to(torch.int64)  # (2, 4)
    return bool((grown[0] != grown[1]).any())


def pixels_differing(a: dict, b: dict) -> int:
    return int(np.count_nonzero(mask_util.decode(a) != mask_util.decode(b)))


@pytest.fixture(scope="module")
def tv_onnx(tv_checkpoint, tmp_path_factory):
    """The parity checkpoint exported once, through the command line."""
    out = tmp_path_factory.mktemp("onnx") / "tv.onnx"
    assert main(["export", "--weights", str(tv_checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def models(tv_checkpoint, tv_onnx):
    return maskrcnn.load(tv_checkpoint), maskrcnn.load(tv_onnx)


def fixture_image(name: str) -> np.ndarray:
    return np.array(Image.open(need(TV_PARITY / name)).convert("RGB"))


@pytest.fixture(scope="module")
def pytorch_results(models):
    """The PyTorch model's results on each fixture image at its own threshold (computed once)."""
    return {name: models[0].predict(fixture_image(name)) for name in ("image_a.png", "image_b.png")}


@pytest.mark.parametrize("name", ["image_a.png", "image_b.png"])
def test_onnxruntime_equals_pytorch_at_any_size(models, pytorch_results, name):
    """The images enter the graph at 800x1066 and 1207x800, neither of them the 480x640 the
    export traced; both give the maximum number of detections, 100."""
    ours = pytorch_results[name]
    assert len(ours) == models[0].config.roi_heads.detections_per_img
    assert_same_results(ours, models[1].predict(fixture_image(name)))


def kudzu_photo(width: int, height: int) -> np.ndarray:
    image = Image.open(need(KUDZU / "images" / "train_1.jpg")).convert("RGB")  # 768 x 576
    return np.array(image.resize((width, height), Image.BILINEAR))


# (width, height) of the photo. Resized to 800 / 1333 they enter the graph as 1333 wide and 6, 19,
# 39 and 208 tall (below ~45 px the RoIAlign scales and the level range differ from the traced
# 480 x 640's: 1, 1/2, 1/4, 1/8 at 6 px), the transposes, 30:1 and 1:30 (1333 x 44), and ordinary
# photos whose padded grids are odd or even on P5 and P6: 1088 x 800 (P5 34 x 25, P6 17 x 13),
# 800 x 800 (25 x 25, 13 x 13), 1333 x 800 (42 x 25, 21 x 13), 704 x 1333 (22 x 42).
SHAPES = [
    (2000, 10),
    (2000, 30),
    (2000, 60),
    (1280, 200),
    (10, 2000),
    (60, 2000),
    (3000, 100),
    (100, 3000),
    (640, 480),
    (500, 500),
    (1000, 600),
    (400, 757),
]


@pytest.mark.parametrize("width,height", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_onnxruntime_equals_pytorch_at_every_aspect_ratio(models, width, height):
    """Nothing of the traced 480 x 640 example is frozen into the graph: the RoIAlign scales and
    the FPN level range follow the image height (they are 1/4 .. 1/32 only above ~45 px), the
    anchor strides follow the padded grid, clipping follows the image size (issue 17, item 1:
    before, 0 of 100 detections matched at 2000 x 10, 2000 x 30 and 2000 x 60)."""
    image = kudzu_photo(width, height)
    ours = models[0].predict(image)
    assert len(ours) > 0
    assert_same_results(ours, models[1].predict(image))


def test_masks_agree_before_pasting(models):
    """The mask probabilities of both runtimes agree to 1e-3 before pasting, so a pasted-mask
    difference never comes from RoIAlign or the FPN level of a box (issue 16, item 3): on this
    640 x 480 photo a box differing by 0.004 px pasted 85 of 316 pixels differently (IoU 0.76),
    from the integer paste grid alone (``paste_grids_differ``)."""
    pytorch, onnx = models
    batch, _ = pytorch.preprocess([torch.from_numpy(kudzu_photo(640, 480)).permute(2, 0, 1)])
    h, w = batch.image_sizes[0]
    with torch.no_grad():
        ours = pytorch.detect(batch)[0][0]
    theirs = onnx.detect(batch.tensors[0, :, :h, :w], pytorch.config.roi_heads.score_thresh)
    assert len(ours) == len(theirs) == 100
    j = torch.cdist(ours.boxes, theirs.boxes).argmin(1)  # (N,) nearest ONNX box of each
    assert (ours.boxes - theirs.boxes[j]).abs().max() <= BOX_TOL
    assert (ours.masks - theirs.masks[j]).abs().max() <= 1e-3


def test_zero_and_one_detection(models, pytorch_results, tv_onnx):
    """Thresholds are graph inputs: one above every score leaves nothing for the mask head (N = 0
    through RoiAlign and the convolutions), one between the two best scores leaves one.

    PyTorch's result at a higher threshold is its result at the default one cut there: a
    greedy NMS by decreasing score never lets a dropped lower-scored box decide for a kept one.
    """
    ours = pytorch_results["image_a.png"]
    best, second = np.sort(ours.scores)[::-1][:2]
    assert best - second > 4 * SCORE_TOL  # else the one-detection case would hinge on rounding
    for thresh, expected in ((1.0, 0), (float(best + second) / 2, 1)):
        onnx = maskrcnn.load(tv_onnx, score_thresh=thresh).predict(fixture_image("image_a.png"))
        cut = ours[ours.scores > thresh]
        assert len(cut) == expected
        assert_same_results(cut, onnx)


def test_file_carries_class_names_and_thresholds(models, tv_onnx):
    ours, onnx = models
    meta = onnx.session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["maskrcnn.class_names"]) == ours.config.label_names()
    assert float(meta["maskrcnn.score_thresh"]) == ours.config.roi_heads.score_thresh == 0.05
    assert float(meta["maskrcnn.mask_thresh"]) == 0.5
    assert onnx.config == ours.config
    assert [i.name for i in onnx.session.get_inputs()] == ["image", "score_thresh"]
    assert [o.name for o in onnx.session.get_outputs()] == ["boxes", "scores", "labels", "masks"]


def test_predict_command_runs_the_onnx_file_unchanged(pytorch_results, tv_onnx, tmp_path):
    out = tmp_path / "out"
    image = need(TV_PARITY / "image_b.png")
    assert (
        main(["predict", str(image), "--weights", str(tv_onnx), "--out", str(out), "--quiet", "--score-thresh", "0.3"])
        == 0
    )
    entries = json.loads((out / "predictions.json").read_text())
    expected = pytorch_results["image_b.png"]
    expected = expected[expected.scores >= 0.3]
    assert len(entries) == len(expected) > 0
    assert sorted(e["category_id"] for e in entries) == sorted(
        expected.labels.tolist()
    )  # a COCO checkpoint: label = id
    assert (out / "overlays" / "image_b.png").is_file()


def test_own_checkpoint_small_backbone_aligned(tmp_path):
    """Our checkpoint format, ResNet-18, three named classes, and aligned RoIAlign (Detectron2's),
    which must export as aligned at the default opset (the parity checkpoint covers the
    non-aligned one). Untrained weights: each class scores about 1/4."""
    torch.manual_seed(0)
    config = apply_overrides(ModelConfig(), [*TINY, "roi_heads.aligned=true"])
    model = maskrcnn.build_model(config).eval()
    save_checkpoint(tmp_path / "tiny.pth", model)
    export(tmp_path / "tiny.pth", tmp_path / "tiny.onnx")
    onnx = maskrcnn.load(tmp_path / "tiny.onnx")
    image = np.random.default_rng(0).integers(0, 255, (70, 150, 3), dtype=np.uint8)
    ours, theirs = maskrcnn.load(tmp_path / "tiny.pth").predict(image), onnx.predict(image)
    assert len(ours) > 0 and set(theirs.class_names) <= {"circle", "square", "triangle"}
    assert_same_results(ours, theirs)


def test_torchvision_v2_layout(tv2_checkpoint, tmp_path):
    """BatchNorm after the FPN's and both heads' convs, the 2-conv RPN head, the 4conv1fc box head.

    image_b (1207x800 in the graph): on image_a, PyTorch's 100th and 101st detections score
    1.1e-5 apart, below the two runtimes' float32 differences (~2e-5 there), so which of them
    makes the cut at ``detections_per_img`` is a coin toss, not a difference of the graph."""
    export(tv2_checkpoint, tmp_path / "tv2.onnx")
    image = fixture_image("image_b.png")
    ours = maskrcnn.load(tv2_checkpoint).predict(image)
    assert len(ours) == 100
    assert_same_results(ours, maskrcnn.load(tmp_path / "tv2.onnx").predict(image))


def test_detectron2_model_zoo_pkl(tmp_path):
    """A Detectron2 R50-FPN .pkl through ``maskrcnn export``: in the graph, logit ranking,
    unrounded anchors, aligned RoIAlign with adaptive sampling (ONNX RoiAlign's sampling_ratio=0),
    Detectron2's level mapper, no box-size filter, background-last logits converted at load;
    outside it, from the file's config: BGR 0..255 input, Detectron2's (PIL) resize and its
    grid-sample paste."""
    weights = d2_checkpoint("r50")
    assert main(["export", "--weights", str(weights), "--out", str(tmp_path / "d2.onnx")]) == 0
    pytorch, onnx = maskrcnn.load(weights), maskrcnn.load(tmp_path / "d2.onnx")
    assert onnx.config == pytorch.config
    t, h = onnx.config.transform, onnx.config.roi_heads
    assert (t.bgr, t.pixel_scale, t.resize, h.paste, h.sampling_ratio, h.aligned) == (
        True,
        255.0,
        "detectron2",
        "detectron2",
        0,
        True,
    )
    image = fixture_image("image_a.png")
    ours = pytorch.predict(image)
    assert len(ours) == 100
    assert_same_results(ours, onnx.predict(image))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_roi_align_adaptive_sampling_is_onnx_sampling_ratio_0(tmp_path):
    """Our RoIAlign with sampling_ratio=0 (ceil(roi size / bins) samples per bin, per RoI) as the
    ONNX RoiAlign node, against its own PyTorch computation, on RoIs whose grids run from 1x1 to
    4x5 samples, aligned and not."""
    from maskrcnn.ops.roi_align import RoIAlign

    onnxruntime = pytest.importorskip("onnxruntime")
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 4, 24, 32, generator=g)
    rois = torch.tensor(
        [
            [0, 1.0, 1.0, 5.0, 5.0],
            [0, 2.5, 3.0, 30.0, 18.0],
            [0, 0.0, 0.0, 20.0, 40.0],
            [0, 10.2, 4.7, 11.0, 5.1],
            [0, 0.0, 0.0, 63.0, 47.0],
        ]
    )
    for aligned in (False, True):
        op = RoIAlign(7, spatial_scale=0.5, sampling_ratio=0, aligned=aligned)
        torch.onnx.export(
            op, (feats, rois), tmp_path / "ra.onnx", dynamo=False, opset_version=16, input_names=["x", "r"]
        )
        session = onnxruntime.InferenceSession(str(tmp_path / "ra.onnx"), providers=["CPUExecutionProvider"])
        (theirs,) = session.run(None, {"x": feats.numpy(), "r": rois.numpy()})
        np.testing.assert_allclose(theirs, op(feats, rois).numpy(), atol=1e-5)


def test_own_checkpoint_resnext(tmp_path):
    """ResNeXt-50 32x4d (grouped 3x3 convs) in our format, untrained, at the tiny model's sizes."""
    torch.manual_seed(0)
    config = apply_overrides(ModelConfig(), [*TINY, "backbone.name=resnext50_32x4d"])
    save_checkpoint(tmp_path / "x50.pth", maskrcnn.build_model(config).eval())
    export(tmp_path / "x50.pth", tmp_path / "x50.onnx")
    image = np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    ours = maskrcnn.load(tmp_path / "x50.pth").predict(image)
    assert len(ours) > 0
    assert_same_results(ours, maskrcnn.load(tmp_path / "x50.onnx").predict(image))


def test_exports_refused_with_a_reason():
    aligned = maskrcnn.build_model(apply_overrides(ModelConfig(), [*TINY, "roi_heads.aligned=true"]))
    with pytest.raises(ExportError, match="opset 15.*aligned"):
        check_exportable(aligned, 15)
    check_exportable(aligned, 16)
    pooled = maskrcnn.build_model(apply_overrides(ModelConfig(), [*TINY, "roi_heads.pooler=pool"]))
    with pytest.raises(ExportError, match="pooler"):
        check_exportable(pooled, 17)


def test_load_refuses_other_onnx_files_and_fixed_settings(tmp_path, tv_onnx):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(CheckpointError, match="other.onnx: not a model written by maskrcnn export"):
        maskrcnn.load(tmp_path / "other.onnx")
    with pytest.raises(CheckpointError, match="nms_thresh cannot change in an exported model"):
        maskrcnn.load(tv_onnx, nms_thresh=0.6)
    with pytest.raises(ValueError, match="computes no losses"):
        maskrcnn.load(tv_onnx)([torch.zeros(3, 8, 8)], targets=[None])


# ---- issue 17: what export writes over, one-line errors, files told by content --------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny checkpoint of our format and its export."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    save_checkpoint(folder / "tiny.pth", maskrcnn.build_model(apply_overrides(ModelConfig(), TINY)).eval())
    export(folder / "tiny.pth", folder / "tiny.onnx")
    return folder / "tiny.pth", folder / "tiny.onnx"


def test_export_never_writes_over_its_input_or_a_foreign_file(tiny_files, tmp_path, capsys):
    """``--out c.pth`` replaced the checkpoint and ``--out notes.txt`` an unrelated file (issue 17,
    item 5). An earlier export may be replaced; anything else only with --overwrite."""
    import shutil

    ckpt = shutil.copy(tiny_files[0], tmp_path / "c.pth")
    before = (tmp_path / "c.pth").read_bytes()
    assert main(["export", "--weights", str(ckpt), "--out", str(ckpt)]) == 2
    assert main(["export", "--weights", str(ckpt), "--out", str(ckpt), "--overwrite"]) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err
    assert (tmp_path / "c.pth").read_bytes() == before
    (tmp_path / "notes.txt").write_text("my notes")
    assert main(["export", "--weights", str(ckpt), "--out", str(tmp_path / "notes.txt")]) == 2
    assert "exists and is not an ONNX file written by maskrcnn export" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "my notes"
    shutil.copy(tiny_files[1], tmp_path / "old.onnx")  # an earlier export: replaced without --overwrite
    assert main(["export", "--weights", str(ckpt), "--out", str(tmp_path / "old.onnx")]) == 0
    assert main(["export", "--weights", str(ckpt), "--out", str(tmp_path / "notes.txt"), "--overwrite"]) == 0
    assert isinstance(maskrcnn.load(tmp_path / "notes.txt"), maskrcnn.OnnxModel)  # told by content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth", "notes.txt", "old.onnx"]  # no temp files left


def test_export_errors_are_one_line(tiny_files, tmp_path, capsys):
    """``--opset 99`` dumped the graph and a traceback; ``--weights model.onnx`` a traceback."""
    ckpt, onnx_file = tiny_files
    for argv, message in (
        (["--weights", str(ckpt), "--opset", "99"], "--opset 99: this export supports opsets 11 to 20"),
        (["--weights", str(ckpt), "--opset", "5"], "--opset 5: this export supports opsets 11 to 20"),
        (["--weights", str(onnx_file)], "is already an exported model; export from the PyTorch checkpoint"),
    ):
        assert main(["export", *argv, "--out", str(tmp_path / "x.onnx")]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
        assert not (tmp_path / "x.onnx").exists()


def test_an_onnx_file_is_recognised_whatever_its_name(tiny_files, tmp_path):
    """An ONNX file named model.pth was refused with the unpickling security message, and so
    was ``train init.weights=model.onnx`` (issue 17, item 11)."""
    import shutil

    from maskrcnn.weights.checkpoint import init_from_checkpoint, read_weights

    renamed = shutil.copy(tiny_files[1], tmp_path / "model.pth")
    assert isinstance(maskrcnn.load(renamed), maskrcnn.OnnxModel)
    for path in (renamed, tiny_files[1]):
        with pytest.raises(
            CheckpointError, match="is an ONNX model .*predict, evaluate and serve only.*PyTorch checkpoint"
        ):
            read_weights(path)
        with pytest.raises(CheckpointError, match="is an ONNX model"):
            init_from_checkpoint(maskrcnn.build_model(apply_overrides(ModelConfig(), TINY)), path, 0.0)


def test_reduced_precision_with_an_onnx_model_is_refused(tiny_files, tmp_path, capsys):
    """``--precision bf16`` with an ONNX model was silently ignored (issue 17, item 12)."""
    model = maskrcnn.load(tiny_files[1])
    image = np.zeros((40, 40, 3), np.uint8)
    for precision in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=f"precision {precision}: an exported model runs in float32"):
            model.predict(image, precision=precision)
    assert model.predict(image, precision="auto").error is None
    Image.fromarray(image).save(tmp_path / "x.png")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "x.png"),
                "--weights",
                str(tiny_files[1]),
                "--out",
                str(tmp_path / "out"),
                "--precision",
                "bf16",
                "--quiet",
            ]
        )
        == 2
    )
    assert "an exported model runs in float32" in capsys.readouterr().err


@pytest.mark.parametrize("key,value", [("score_thresh", 2), ("score_thresh", float("nan")), ("mask_thresh", 1.5)])
def test_loading_an_onnx_model_refuses_thresholds_outside_0_1(tiny_files, key, value):
    with pytest.raises(ValueError, match=rf"^{key} must be a number in \[0, 1\]"):
        maskrcnn.load(tiny_files[1], **{key: value})


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("aligned", [False, True])
def test_multiscale_roi_align_graph_follows_the_image_height(tmp_path, aligned):
    """The FPN pooler alone, traced at 480 x 640 and run by ONNX Runtime at heights where the
    RoIAlign scales and the level range change (torchvision's ``_infer_scale``: at 6 px tall the
    four levels read at 1, 1/2, 1/4, 1/8, at 44 px at 1/2 .. 1/16, from 46 px on at 1/4 .. 1/32),
    against the PyTorch computation on the same features and boxes (issue 17, item 1)."""
    from maskrcnn.ops.poolers import multiscale_roi_align

    onnxruntime = pytest.importorskip("onnxruntime")

    class Pooler(torch.nn.Module):
        def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
            h, w = image.shape[-2:]
            x = torch.nn.functional.pad(image, (0, (w + 31) // 32 * 32 - w, 0, (h + 31) // 32 * 32 - h))
            features = [torch.nn.functional.avg_pool2d(x, s) for s in (4, 8, 16, 32)]  # P2..P5
            return multiscale_roi_align(features, [boxes], [(h, w)], 7, 2, aligned=aligned)

    g = torch.Generator().manual_seed(0)
    pooler = Pooler()
    torch.onnx.export(
        pooler,
        (torch.randn(1, 2, 480, 640, generator=g), torch.tensor([[0.0, 0.0, 50.0, 40.0]])),
        tmp_path / "pool.onnx",
        dynamo=False,
        opset_version=17,
        input_names=["image", "boxes"],
        dynamic_axes={"image": {2: "h", 3: "w"}, "boxes": {0: "n"}},
    )
    session = onnxruntime.InferenceSession(str(tmp_path / "pool.onnx"), providers=["CPUExecutionProvider"])
    for h in (6, 19, 39, 44, 46, 64, 200):
        image = torch.randn(1, 2, h, 1333, generator=g)
        # boxes from 2 px to 1300 px wide: every level, and the clamped ones at both ends
        x1 = torch.rand(40, generator=g) * 600
        boxes = torch.stack([x1, torch.zeros(40), x1 + torch.logspace(0.3, 3.1, 40), torch.full((40,), float(h))], 1)
        (theirs,) = session.run(None, {"image": image.numpy(), "boxes": boxes.numpy()})
        np.testing.assert_allclose(theirs, pooler(image, boxes).numpy(), atol=1e-5, err_msg=f"height {h}")


def test_loading_an_onnx_model_names_an_unknown_key_and_refuses_bn_eps(tiny_files):
    """Round 2 of issue 17: ``load("m.onnx", bogus=3)`` said "bogus cannot change in an exported
    model", as if it were a real setting; ``bn_eps=0.1`` was silently ignored."""
    with pytest.raises(ConfigError, match="unknown config key 'roi_heads.bogus'"):
        maskrcnn.load(tiny_files[1], bogus=3)
    with pytest.raises(ValueError, match="bn_eps applies to torchvision .pth files only"):
        maskrcnn.load(tiny_files[1], bn_eps=0.1)
