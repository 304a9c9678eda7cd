"""Reading Detectron2 model zoo files: the restricted unpickler, key and slot conversion, and
the config a file's architecture implies."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from maskrcnn.weights import checkpoint
from maskrcnn.weights.checkpoint import CheckpointError, read_weights
from maskrcnn.weights.detectron2 import PIXEL_STD_X101, convert_keys, load_pickle

from ..helpers import D2_PARITY, TV_PARITY, d2_checkpoint, need


class _RunsShell:
    """Unpickling this runs ``os.system(command)``: what a malicious weight file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_final_evil.pkl"
    payload = {"model": {"backbone.bottom_up.stem.conv1.weight": _RunsShell(f"touch {marker}")}, "__author__": "x"}
    path.write_bytes(pickle.dumps(payload, protocol=2))
    # The payload works: a plain pickle.loads would create the marker (checked on a copy).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_RunsShell(f"touch {probe}")))
    assert probe.exists()
    with pytest.raises(CheckpointError) as err:
        read_weights(path)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "system" in message and "not unpickled" in message


@pytest.mark.parametrize("global_name", ["builtins.eval", "numpy.load", "torch._utils._rebuild_tensor_v2"])
def test_any_other_global_is_refused(global_name):
    module, name = global_name.rsplit(".", 1)
    # GLOBAL opcode naming the callable, then an empty tuple and REDUCE: calling it would run code.
    data = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n)R."
    with pytest.raises(pickle.UnpicklingError, match=global_name.replace(".", r"\.")):
        load_pickle(data)


def _d2_r50_like_state(rng: np.random.Generator, classes: int = 3) -> dict[str, np.ndarray]:
    """A tiny subset of a Detectron2 state dict: the predictor layers whose slots move."""
    return {
        "roi_heads.box_predictor.cls_score.weight": rng.standard_normal((classes + 1, 8)).astype(np.float32),
        "roi_heads.box_predictor.cls_score.bias": rng.standard_normal(classes + 1).astype(np.float32),
        "roi_heads.box_predictor.bbox_pred.weight": rng.standard_normal((4 * classes, 8)).astype(np.float32),
        "roi_heads.box_predictor.bbox_pred.bias": rng.standard_normal(4 * classes).astype(np.float32),
        "roi_heads.mask_head.predictor.weight": rng.standard_normal((classes, 8, 1, 1)).astype(np.float32),
        "roi_heads.mask_head.predictor.bias": rng.standard_normal(classes).astype(np.float32),
        "backbone.bottom_up.res3.0.shortcut.norm.running_var": np.ones(4, np.float32),
        "backbone.bottom_up.res5.2.conv3.norm.weight": np.ones(4, np.float32),
        "backbone.fpn_lateral4.weight": np.zeros((2, 2, 1, 1), np.float32),
        "proposal_generator.rpn_head.objectness_logits.bias": np.zeros(3, np.float32),
        "roi_heads.mask_head.deconv.weight": np.zeros((2, 2, 2, 2), np.float32),
        # Buffers some Detectron2 versions saved: dropped, not loaded.
        "pixel_mean": np.zeros((3, 1, 1), np.float32),
        "proposal_generator.anchor_generator.cell_anchors.0": np.zeros((3, 4), np.float32),
    }


def test_keys_and_background_slot_follow_our_layout():
    state = _d2_r50_like_state(np.random.default_rng(0))
    out = convert_keys(state)
    assert set(out) == {
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.mask_predictor.mask_fcn_logits.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias",
        "backbone.body.layer2.0.downsample.1.running_var",
        "backbone.body.layer4.2.bn3.weight",
        "backbone.fpn.inner_blocks.2.weight",
        "rpn.head.cls_logits.bias",
        "roi_heads.mask_predictor.conv5_mask.weight",
    }
    # Background logit: Detectron2's last row is our row 0; foreground rows keep their order.
    w = state["roi_heads.box_predictor.cls_score.weight"]
    ours = out["roi_heads.box_predictor.cls_score.weight"].numpy()
    np.testing.assert_array_equal(ours[0], w[-1])
    np.testing.assert_array_equal(ours[1:], w[:-1])
    # The softmax of any input is the same distribution, background moved first.
    x = np.random.default_rng(1).standard_normal(8).astype(np.float32)
    theirs = torch.softmax(torch.from_numpy(w @ x + state["roi_heads.box_predictor.cls_score.bias"]), 0)
    mine = torch.softmax(torch.from_numpy(ours @ x) + out["roi_heads.box_predictor.cls_score.bias"], 0)
    torch.testing.assert_close(mine, torch.cat([theirs[-1:], theirs[:-1]]))
    # Box and mask predictors gain an all-zero background slot in front.
    bbox = out["roi_heads.box_predictor.bbox_pred.weight"].numpy()
    assert bbox.shape == (16, 8) and not bbox[:4].any()
    np.testing.assert_array_equal(bbox[4:], state["roi_heads.box_predictor.bbox_pred.weight"])
    mask = out["roi_heads.mask_predictor.mask_fcn_logits.bias"].numpy()
    assert mask[0] == 0 and np.array_equal(mask[1:], state["roi_heads.mask_head.predictor.bias"])


def _tiny_d2_file(tmp_path, name: str, depth_blocks: int, groups: int, extra: dict | None = None):
    """A Detectron2-layout file with just enough keys for ``infer_config``, as a protocol-2
    OrderedDict pickle (how Python 3 writes bytes for protocol 2: through ``_codecs.encode``)."""
    width = 256 if groups > 1 else 64
    state = OrderedDict()
    state["backbone.bottom_up.res2.0.conv2.weight"] = np.zeros((width, width // groups, 3, 3), np.float32)
    state["backbone.bottom_up.res2.0.conv3.weight"] = np.zeros((256, width, 1, 1), np.float32)
    for b in range(depth_blocks):
        state[f"backbone.bottom_up.res4.{b}.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    state["roi_heads.box_predictor.cls_score.weight"] = np.zeros((81, 4), np.float32)
    state["roi_heads.box_predictor.bbox_pred.weight"] = np.zeros((320, 4), np.float32)
    state["roi_heads.mask_head.predictor.weight"] = np.zeros((80, 4, 1, 1), np.float32)
    state.update(extra or {})
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"model": state, "__author__": "Detectron2 Model Zoo"}, protocol=2))
    return path


@pytest.mark.parametrize(
    "blocks,groups,backbone,stride_in_1x1,std",
    [
        (6, 1, "resnet50", True, (1.0, 1.0, 1.0)),
        (23, 1, "resnet101", True, (1.0, 1.0, 1.0)),
        (23, 32, "resnext101_32x8d", False, PIXEL_STD_X101),
    ],
)
def test_config_from_the_architecture(tmp_path, blocks, groups, backbone, stride_in_1x1, std):
    config, state = read_weights(_tiny_d2_file(tmp_path, "model_final_x.pkl", blocks, groups))
    assert config.backbone.name == backbone and config.backbone.stride_in_1x1 is stride_in_1x1
    assert config.transform.image_std == std and config.transform.image_mean == (103.530, 116.280, 123.675)
    assert config.transform.bgr and config.transform.pixel_scale == 255.0 and config.transform.resize == "detectron2"
    assert config.num_classes == 80 and config.masks
    assert (config.class_names[0], config.category_ids[0]) == ("person", 1)
    assert (config.class_names[-1], config.category_ids[-1]) == ("toothbrush", 90)
    assert config.roi_heads.aligned and config.roi_heads.sampling_ratio == 0 and config.rpn.rank_by == "logit"
    assert config.anchors.strides == (4, 8, 16, 32, 64)  # not padded // grid: P6 of an 800-px side steps 64, not 61
    assert config.roi_heads.pooler_strides == (4, 8, 16, 32)  # not inferred from the height: wrong at 30:1
    assert state["roi_heads.box_predictor.cls_score.weight"].shape == (81, 4)


def test_saved_pixel_statistics_win(tmp_path):
    """Files that saved ``pixel_std`` are normalised with it, as Detectron2 loads them."""
    extra = {"pixel_std": np.array([2.0, 3.0, 4.0], np.float32).reshape(3, 1, 1)}
    config, state = read_weights(_tiny_d2_file(tmp_path, "m.pkl", 6, 1, extra))
    assert config.transform.image_std == (2.0, 3.0, 4.0)
    assert "pixel_std" not in state


def test_not_a_detectron2_file(tmp_path):
    path = tmp_path / "blobs.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.zeros(2)}}))
    with pytest.raises(CheckpointError, match="Detectron \\(v1\\) 'blobs' file"):
        read_weights(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="not a Detectron2 weight pickle"):
        read_weights(path)
    path.write_bytes(pickle.dumps({"model": {"a": [1, 2]}}))
    with pytest.raises(CheckpointError, match="not numeric arrays"):
        read_weights(path)


def test_the_one_reader_routes_pkl_files(tmp_path, monkeypatch):
    """``checkpoint.read_file`` never hands a .pkl to ``torch.load``."""
    path = _tiny_d2_file(tmp_path, "m.pkl", 6, 1)
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: pytest.fail("torch.load used for a .pkl"))
    obj = checkpoint.read_file(path)
    assert isinstance(obj["model"]["roi_heads.box_predictor.cls_score.weight"], np.ndarray)


def test_training_from_a_detectron2_file_warns_about_its_other_network(caplog):
    """Starting training from a model zoo file with the default (torchvision-style) config loads
    the tensors, re-initialises the class heads, and says which settings the file differs in."""
    import logging

    from maskrcnn.model.build import build_model
    from maskrcnn.weights.checkpoint import init_from_checkpoint

    need(D2_PARITY / "r50" / "spec.json")
    model = build_model()
    with caplog.at_level(logging.WARNING, logger="maskrcnn.weights.checkpoint"):
        reinit = init_from_checkpoint(model, d2_checkpoint("r50"), 1e-5)
    assert "roi_heads.box_predictor.cls_score.weight" in reinit  # 80 classes vs 90
    assert "model.backbone.stride_in_1x1=False (file: True)" in caplog.text and "model.transform.bgr" in caplog.text


# COCO's 80 category ids in Detectron2's contiguous order, written out by hand from the COCO
# 2017 annotation file (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused there).
COCO_IDS_BY_HAND = [
    *range(1, 12),
    *range(13, 26),
    27,
    28,
    *range(31, 45),
    *range(46, 66),
    67,
    70,
    *range(72, 83),
    *range(84, 91),
]


def test_detectron2_coco_labels_come_out_as_coco_category_ids():
    """Detectron2 predicts contiguous classes 0..79; a COCO results file needs COCO's ids (1..90),
    from ``predict`` as from the CLI, with no mapping passed by the user."""
    import maskrcnn

    assert len(COCO_IDS_BY_HAND) == 80
    need(D2_PARITY / "r50" / "spec.json")
    ref = np.load(D2_PARITY / "r50" / "single_a.npz")
    model = maskrcnn.load(d2_checkpoint("r50"))
    result = model.predict(str(need(TV_PARITY / "image_a.png")))
    d2_classes = ref["final_labels_0"]  # Detectron2's own contiguous classes
    assert sorted(result.labels.tolist()) == sorted((d2_classes + 1).tolist())
    expected = sorted(COCO_IDS_BY_HAND[k] for k in d2_classes)
    assert sorted(result.category_ids.tolist()) == expected
    assert sorted(e["category_id"] for e in result.to_coco(image_id=7)) == expected
    assert any(k != COCO_IDS_BY_HAND[k] - 1 for k in d2_classes)  # the case shows a real remapping
    assert sorted(e["category_id"] for e in result[:3].to_coco(1)) == sorted(result.category_ids[:3].tolist())
