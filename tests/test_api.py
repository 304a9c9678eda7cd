"""The Python API: load, predict on every kind of input, checkpoints round trip and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import maskrcnn
from maskrcnn.config import ConfigError, ModelConfig, apply_overrides
from maskrcnn.inference.results import Result
from maskrcnn.model.build import build_model
from maskrcnn.weights.checkpoint import CheckpointError, load
from maskrcnn.weights.torchvision import convert_keys, infer_config

from .helpers import KUDZU, TV2_PARITY, need, tiny_model


def test_checkpoint_round_trip_gives_the_same_detections(tiny_ckpt):
    a, b = tiny_model(), load(tiny_ckpt)
    assert not b.training and b.config.class_names == ("circle", "square", "triangle")
    img = torch.rand(3, 80, 100)
    with torch.no_grad():
        da, db = a([img]).detections[0], b([img]).detections[0]
    assert len(da) > 0
    torch.testing.assert_close(da.boxes, db.boxes)
    torch.testing.assert_close(da.masks, db.masks)


def test_predict_accepts_paths_pil_arrays_and_tensors(tiny_ckpt, tmp_path):
    model = load(tiny_ckpt)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    inputs = [
        tmp_path / "x.png",
        str(tmp_path / "x.png"),
        Image.fromarray(rgb),
        rgb,
        torch.from_numpy(rgb).permute(2, 0, 1) / 255.0,
    ]
    results = model.predict(inputs)
    assert len(results) == 5 and all(isinstance(r, Result) for r in results)
    ref = results[0]
    assert ref.path == str(tmp_path / "x.png")
    for r in results:
        assert r.image_size == (70, 90)
        assert r.masks.shape == (len(r), 70, 90) and r.masks.dtype == bool
        np.testing.assert_allclose(r.boxes, ref.boxes, atol=1e-4)
        assert set(r.class_names) <= {"circle", "square", "triangle"}
    single = model.predict(rgb)
    assert isinstance(single, Result)


def test_predict_handles_gray_rgba_and_16_bit(tiny_ckpt, tmp_path):
    model = load(tiny_ckpt)
    gray = (np.arange(60 * 80) % 251).astype(np.uint8).reshape(60, 80)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 128)]), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "w.png")
    results = model.predict([tmp_path / "g.png", tmp_path / "a.png", tmp_path / "w.png"])
    # The same picture in three encodings gives the same pixels and so the same detections.
    for r in results:
        assert r.image_size == (60, 80)
        np.testing.assert_array_equal(r.image, results[0].image)
        np.testing.assert_allclose(r.boxes, results[0].boxes, atol=1e-4)


def test_score_threshold_filters(tiny_ckpt):
    model = load(tiny_ckpt)
    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    all_dets = model.predict(img)
    cut = float(np.median(all_dets.scores))
    kept = model.predict(img, score_thresh=cut)
    assert len(kept) == int((all_dets.scores >= cut).sum())
    assert model.roi_heads.score_thresh == 0.0  # restored after the call


def test_bad_checkpoints_give_clear_errors(tmp_path, tiny_ckpt):
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load(tmp_path / "junk.pth")
    obj = torch.load(tiny_ckpt, weights_only=True)
    del obj["model"]["roi_heads.box_head.fc6.weight"]
    obj["model"]["extra.weight"] = torch.zeros(1)
    torch.save(obj, tmp_path / "partial.pth")
    with pytest.raises(
        CheckpointError, match=r"missing keys: roi_heads\.box_head\.fc6\.weight.*unexpected keys: extra\.weight"
    ):
        load(tmp_path / "partial.pth")


def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "flag"),))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError):
        load(tmp_path / "evil.pth")
    assert not (tmp_path / "flag").exists()


def test_current_torchvision_key_names_convert_to_2019_names():
    current = {
        "backbone.fpn.inner_blocks.2.0.weight": 1,
        "backbone.fpn.layer_blocks.0.0.bias": 2,
        "rpn.head.conv.0.0.weight": 3,
        "roi_heads.mask_head.0.0.weight": 4,
        "roi_heads.mask_head.3.0.bias": 5,
        "backbone.body.layer1.0.bn1.num_batches_tracked": 6,
        "backbone.body.conv1.weight": 7,
    }
    assert convert_keys(current) == {
        "backbone.fpn.inner_blocks.2.weight": 1,
        "backbone.fpn.layer_blocks.0.bias": 2,
        "rpn.head.conv.weight": 3,
        "roi_heads.mask_head.mask_fcn1.weight": 4,
        "roi_heads.mask_head.mask_fcn4.bias": 5,
        "backbone.body.conv1.weight": 7,
    }


def test_torchvision_file_with_current_names_loads_like_the_2019_file(tv_checkpoint, tmp_path):
    state = torch.load(tv_checkpoint, weights_only=True)
    renamed = {}
    for k, v in state.items():
        k = k.replace("rpn.head.conv.", "rpn.head.conv.0.0.")
        for i in range(4):
            k = k.replace(f"fpn.inner_blocks.{i}.", f"fpn.inner_blocks.{i}.0.").replace(
                f"fpn.layer_blocks.{i}.", f"fpn.layer_blocks.{i}.0."
            )
            k = k.replace(f"mask_head.mask_fcn{i + 1}.", f"mask_head.{i}.0.")
        renamed[k] = v
    torch.save(renamed, tmp_path / "current.pth")
    a, b = load(tv_checkpoint), load(tmp_path / "current.pth")
    assert a.config.num_classes == 90 and a.config.backbone.bn_eps == 0.0 and a.config.class_names[0] == "person"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_inference_overrides_are_checked(tiny_ckpt):
    assert load(tiny_ckpt, score_thresh="0.3").roi_heads.score_thresh == 0.3
    with pytest.raises(ValueError, match="did you mean roi_heads.score_thresh"):
        load(tiny_ckpt, score_tresh=0.3)


# ---- bad input ------------------------------------------------------------------------------


def test_one_bad_input_in_a_list_keeps_the_others_results(tiny_ckpt, tmp_path):
    model = load(tiny_ckpt)
    rgb = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "good.png")
    inputs = [tmp_path / "good.png", tmp_path / "missing.png", np.zeros((0, 0, 3), np.uint8), object(), rgb]
    results = model.predict(inputs, batch_size=2)
    assert len(results) == 5 and all(isinstance(r, Result) for r in results)
    good, missing, empty, odd, array = results
    assert good.error is None and len(good) > 0 and good.path == str(tmp_path / "good.png")
    assert array.error is None and len(array) == len(good)
    assert "missing.png" in missing.error and "not found" in missing.error and len(missing) == 0
    assert missing.path == str(tmp_path / "missing.png")
    assert "input 2" in empty.error and "no pixels" in empty.error
    assert "input 3 (object)" in odd.error
    with pytest.raises(ValueError, match="no pixels"):  # alone, an input's problem is raised
        model.predict(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match="has no pixels"):
        model([torch.zeros(3, 0, 5)])


def test_an_image_that_breaks_the_model_is_skipped_not_the_batch(tiny_ckpt, monkeypatch):
    model = load(tiny_ckpt)
    forward = model.preprocess.forward

    def fragile(images, targets=None):
        if any(im.shape[-1] == 13 for im in images):
            raise RuntimeError("Input and output sizes should be greater than 0")
        return forward(images, targets)

    monkeypatch.setattr(model.preprocess, "forward", fragile)
    rng = np.random.default_rng(3)
    a, bad, c = (rng.integers(0, 255, (40, w, 3), dtype=np.uint8) for w in (50, 13, 60))
    results = model.predict([a, bad, c], batch_size=2)
    assert [r.error is None for r in results] == [True, False, True]
    assert "input 1" in results[1].error and "RuntimeError: Input and output sizes" in results[1].error
    assert results[0].image_size == (40, 50) and results[2].image_size == (40, 60) and len(results[2]) > 0


def test_a_one_pixel_strip_is_detected_on_not_a_crash(tiny_ckpt):
    # 5000 x 1 scaled by min(96 / 1, 128 / 5000) = 0.0256 was 0 pixels tall: a RuntimeError.
    strip = np.random.default_rng(4).integers(0, 255, (1, 5000, 3), dtype=np.uint8)
    result = load(tiny_ckpt).predict(strip)
    assert result.error is None and result.image_size == (1, 5000)
    assert (result.boxes[:, [1, 3]] <= 1.0 + 1e-4).all() and (result.boxes[:, [0, 2]] <= 5000).all()


@pytest.mark.parametrize("thresh", [2.0, -0.1, float("nan"), float("inf")])
def test_a_score_threshold_outside_0_1_is_refused(tiny_ckpt, thresh):
    with pytest.raises(ValueError, match=r"score threshold must be a number in \[0, 1\]"):
        load(tiny_ckpt).predict(np.zeros((20, 20, 3), np.uint8), score_thresh=thresh)


def test_pil_16_bit_images_are_scaled_like_16_bit_files(tmp_path):
    """A dark 16-bit frame (max 1000) as a file and as a PIL image: the same pixels, divided by
    257 (before, the PIL image was stretched by its own maximum to full white)."""
    from maskrcnn.inference.predictor import as_rgb

    a = (np.arange(12 * 16) * 5).reshape(12, 16).astype(np.uint16)  # 0..955
    Image.fromarray(a).save(tmp_path / "dark.png")
    from_path, _ = as_rgb(tmp_path / "dark.png")
    with Image.open(tmp_path / "dark.png") as im:
        from_pil, _ = as_rgb(im)
    expected = np.rint(a / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(from_path[:, :, 1], expected)
    np.testing.assert_array_equal(from_pil, from_path)


def test_nan_or_inf_weights_are_refused_by_name(tiny_ckpt, tmp_path):
    obj = torch.load(tiny_ckpt, weights_only=True)
    obj["model"]["roi_heads.box_head.fc6.weight"][3, 2] = float("nan")
    obj["model"]["rpn.head.conv.bias"][0] = float("inf")
    torch.save(obj, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"nan\.pth has NaN or infinite values in 2 tensor\(s\)") as info:
        load(tmp_path / "nan.pth")
    assert "roi_heads.box_head.fc6.weight" in str(info.value) and "rpn.head.conv.bias" in str(info.value)


def test_the_unsafe_checkpoint_error_gives_no_advice_to_run_its_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("print('pwned')",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as info:
        load(tmp_path / "evil.pth")
    message = str(info.value)
    assert "weights_only" not in message and "False" not in message and "\n" not in message
    assert "evil.pth" in message and "exec" in message


def test_a_device_this_machine_lacks_is_a_one_line_error(tiny_ckpt):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda asked for, but CUDA is not available"):
            load(tiny_ckpt, device="cuda")
    else:
        with pytest.raises(ValueError, match=r"device cuda:99 asked for, but this machine has \d+ CUDA device"):
            load(tiny_ckpt, device="cuda:99")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="Apple MPS is not available"):
            load(tiny_ckpt, device="mps")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        load(tiny_ckpt, device="gpu")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_inference_precision_auto_follows_the_hardware(tiny_ckpt, monkeypatch, native, expected):
    from maskrcnn import precision

    monkeypatch.setattr(precision, "cpu_bf16_pays", lambda: native)
    model = maskrcnn.load(tiny_ckpt)
    seen = []
    hook = model.backbone.body.conv1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    result = model.predict(image, precision="auto")
    assert seen == [expected]
    assert result.boxes.dtype == np.float32 and result.scores.dtype == np.float32
    seen.clear()
    model.predict(image)  # the default is float32 whatever the hardware: torchvision's numbers
    hook.remove()
    assert seen == [torch.float32]


def test_inference_precision_is_checked(tiny_ckpt):
    model = maskrcnn.load(tiny_ckpt)
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        model.predict([image], precision="fp16")
    with pytest.raises(ValueError, match="not one of"):
        model.predict([image], precision="half")


def test_torchvision_v2_key_list_maps_onto_the_v2_model_one_to_one():
    """torchvision 0.28's own key list of ``maskrcnn_resnet50_fpn_v2`` (the fixture's keys.txt,
    written by torchvision) converts to exactly the state dict keys of the model infer_config
    builds, counters aside; the v1 layout's defaults are untouched."""
    shapes = {}
    for line in (TV2_PARITY / "keys.txt").read_text().splitlines():
        name, _, dims = line.partition(" ")
        shapes[name] = torch.Size(int(d) for d in dims.split(",") if d)
    state = convert_keys({k: torch.empty(s) for k, s in shapes.items()})
    assert len(state) == len([k for k in shapes if not k.endswith("num_batches_tracked")])
    model = build_model(infer_config(state))
    own = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert own == {k: v.shape for k, v in state.items()}
    v1 = ModelConfig()
    assert (v1.backbone.fpn_norm, v1.rpn.conv_depth, v1.roi_heads.box_head, v1.roi_heads.mask_head_norm) == (
        "none",
        1,
        "2fc",
        "none",
    )


def test_unknown_norm_or_box_head_names_the_field():
    with pytest.raises(ConfigError, match="backbone.fpn_norm: 'groupnorm' is not one of 'none', 'batchnorm'"):
        build_model(apply_overrides(ModelConfig(), ["backbone.fpn_norm=groupnorm"]))
    with pytest.raises(ConfigError, match="roi_heads.box_head: '4conv' is not one of '2fc', '4conv1fc'"):
        build_model(apply_overrides(ModelConfig(), ["roi_heads.box_head=4conv"]))


# ---- issue 17: thresholds, file kinds, state dicts, batching ---------------------------------


@pytest.mark.parametrize(
    "key,value",
    [
        ("score_thresh", 2),
        ("score_thresh", float("nan")),
        ("score_thresh", -0.5),
        ("mask_thresh", 1.5),
        ("mask_thresh", "nan"),
    ],
)
def test_load_refuses_thresholds_outside_0_1(tiny_ckpt, key, value):
    """``load(score_thresh=2)`` gave 0 detections and ``mask_thresh=1.5`` empty masks, silently;
    they are refused as ``predict(score_thresh=2)`` is (issue 17, item 2)."""
    with pytest.raises(ValueError, match=rf"^{key} must be a number in \[0, 1\], got "):
        load(tiny_ckpt, **{key: value})


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("detections_per_img", -1, "detections_per_img must be an integer >= 1, got -1"),
        ("detections_per_img", 0, "detections_per_img must be an integer >= 1, got 0"),
        ("nms_thresh", 1.5, r"nms_thresh must be a number in \[0, 1\], got 1.5"),
        ("bn_eps", -1.0, "bn_eps must be a finite number >= 0, got -1.0"),
        ("bn_eps", float("nan"), "bn_eps must be a finite number >= 0, got nan"),
    ],
)
def test_load_refuses_head_values_that_silently_change_the_detections(tiny_ckpt, key, value, message):
    """Round 2 of issue 17: ``load(p, detections_per_img=-1)`` kept all but the last detection
    (a ``[:-1]`` slice), ``nms_thresh=1.5`` suppressed nothing, and ``bn_eps=-1`` or NaN gave a
    torchvision model no detections; all were accepted without a word."""
    with pytest.raises(ValueError, match=message):
        load(tiny_ckpt, **{key: value})


def test_load_refuses_bn_eps_for_a_file_whose_config_sets_it(tiny_ckpt):
    """``bn_eps`` only applies to torchvision files; for ours (and Detectron2's, and ONNX) it was
    silently ignored."""
    with pytest.raises(ValueError, match="bn_eps applies to torchvision .pth files only"):
        load(tiny_ckpt, bn_eps=0.1)


def test_predict_refuses_a_mask_threshold_outside_0_1(tiny_ckpt):
    with pytest.raises(ValueError, match=r"mask threshold must be a number in \[0, 1\], got 1.5"):
        load(tiny_ckpt).predict(np.zeros((20, 20, 3), np.uint8), mask_thresh=1.5)


def test_state_dicts_with_integer_keys_or_a_missing_torchvision_key_are_named(tiny_ckpt, tv_checkpoint, tmp_path):
    """Before: an AttributeError traceback for integer keys and a raw KeyError for a torchvision
    file missing one key (issue 17, item 10)."""
    torch.save({0: torch.zeros(1), 1: torch.zeros(1)}, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match=r"keyed by name, found the key 0 \(int; 2 such keys\)"):
        load(tmp_path / "ints.pth")
    state = torch.load(tv_checkpoint, weights_only=True)
    del state["roi_heads.box_predictor.cls_score.weight"]
    torch.save(state, tmp_path / "tv_missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: roi_heads\.box_predictor\.cls_score\.weight$"):
        load(tmp_path / "tv_missing.pth")
    obj = torch.load(tiny_ckpt, weights_only=True)
    obj["model"]["roi_heads.box_head.fc6.weight"] = "a string"
    torch.save(obj, tmp_path / "str.pth")
    with pytest.raises(CheckpointError, match=r"'roi_heads\.box_head\.fc6\.weight' holds a str"):
        load(tmp_path / "str.pth")


def test_file_kinds_are_told_by_content_not_name(tiny_ckpt, tmp_path):
    """A checkpoint named .onnx or .pkl still loads; text named .pth is named as what it is not."""
    import shutil

    from maskrcnn.weights.checkpoint import file_kind

    for name in ("weights.onnx", "weights.pkl", "weights.bin"):
        shutil.copy(tiny_ckpt, tmp_path / name)
        assert file_kind(tmp_path / name) == "torch"
        assert load(tmp_path / name).config.class_names == ("circle", "square", "triangle")
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="not a model file this package reads; expected a maskrcnn checkpoint"):
        load(tmp_path / "notes.pth")


def test_a_mixed_batch_gives_each_image_its_own_detections(tv_checkpoint):
    """A 640 x 480 photo batched with a 300 x 1200 one was padded to their common 1344 x 1088 and
    lost or changed detections (as in torchvision); images are now batched only with others of
    the same padded size, so ``batch_size`` never changes a result (issue 17, item 13)."""
    photo = Image.open(need(KUDZU / "images" / "train_1.jpg")).convert("RGB")
    a, b = np.array(photo.resize((640, 480))), np.array(photo.resize((300, 1200)))
    a2 = a[:, ::-1].copy()  # another 640 x 480 image: batched with ``a``
    model = load(tv_checkpoint)
    alone = [model.predict(x) for x in (a, b, a2)]
    batched = model.predict([a, b, a2], batch_size=3)
    for one, many in zip(alone, batched):
        assert len(one) == len(many) > 0
        order_one, order_many = np.argsort(-one.scores, kind="stable"), np.argsort(-many.scores, kind="stable")
        np.testing.assert_array_equal(one.labels[order_one], many.labels[order_many])
        np.testing.assert_allclose(one.boxes[order_one], many.boxes[order_many], atol=1e-3)
        np.testing.assert_allclose(one.scores[order_one], many.scores[order_many], atol=1e-4)


def test_a_read_only_array_predicts_without_torchs_not_writable_warning(tiny_ckpt):
    """Round 2 of issue 17: ``model.predict(np.asarray(pil_image))`` (a read-only array, the
    usual way to pass a PIL image as an array) printed torch's "The given NumPy array is not
    writable" UserWarning from inside the package."""
    import warnings

    image = np.zeros((40, 50, 3), np.uint8)
    image.flags.writeable = False
    model = load(tiny_ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.predict(image).error is None
