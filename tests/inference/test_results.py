"""Result: COCO export, overlay drawing, saving; visualize: training curves and grids."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from maskrcnn.inference.results import MASK_ALPHA, Result, label_color, write_coco_results
from maskrcnn.inference.visualize import draw_grid, plot_metrics
from maskrcnn.ops.paste import paste_masks
from maskrcnn.structures import Detections

# pycocotools.mask.decode trips numpy 2's __array__(copy=) deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 60, 80


def _masks_from_boxes(boxes: np.ndarray) -> np.ndarray:
    masks = np.zeros((len(boxes), H, W), dtype=bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
        m[y1:y2, x1:x2] = True
    return masks


def _result(with_image: bool = True) -> Result:
    boxes = np.array([[10, 20, 40, 50], [45, 5, 75, 30], [0, 0, 80, 60]], dtype=np.float32)
    masks = _masks_from_boxes(boxes)
    masks[2] = False
    masks[2, 53:55, 20:60] = True  # a thin mask unrelated to its box, clear of labels
    return Result(
        boxes=boxes,
        scores=np.array([0.9, 0.7, 0.2], dtype=np.float32),
        labels=np.array([1, 3, 7]),
        image_size=(H, W),
        masks=masks,
        class_names=["person", "car", ""],
        path="img.jpg",
        image=np.full((H, W, 3), 100, dtype=np.uint8) if with_image else None,
    )


# ---- to_coco -------------------------------------------------------------------------------


def test_to_coco_rle_round_trip_and_xywh() -> None:
    rng = np.random.default_rng(0)
    res = _result()
    res.masks = rng.random((3, H, W)) > 0.5  # arbitrary shapes, not boxes
    entries = res.to_coco(image_id=42)
    assert len(entries) == 3
    for e, box, mask, score, label in zip(entries, res.boxes, res.masks, res.scores, res.labels):
        assert e["image_id"] == 42 and e["category_id"] == label
        x1, y1, x2, y2 = box
        assert e["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
        assert e["score"] == pytest.approx(float(score))
        assert isinstance(e["segmentation"]["counts"], str)
        assert e["segmentation"]["size"] == [H, W]
        np.testing.assert_array_equal(mask_util.decode(e["segmentation"]).astype(bool), mask)
    json.dumps(entries)  # plain Python types only


@pytest.mark.parametrize(
    "mapping",
    [
        lambda k: 100 + k,
        {1: 101, 3: 103, 7: 107},
        [0, 101, 0, 103, 0, 0, 0, 107],
    ],
    ids=["callable", "dict", "sequence"],
)
def test_to_coco_category_mapping(mapping) -> None:
    assert [e["category_id"] for e in _result().to_coco(1, mapping)] == [101, 103, 107]


def test_to_coco_without_masks_and_empty() -> None:
    res = _result()
    res.masks = None
    assert all("segmentation" not in e for e in res.to_coco(1))
    empty = Result(np.zeros((0, 4)), np.zeros(0), np.zeros(0), image_size=(H, W), masks=np.zeros((0, H, W), bool))
    assert len(empty) == 0 and empty.to_coco(1) == []
    assert empty.to_dict()["masks"] == []


def test_write_coco_results_atomic(tmp_path) -> None:
    entries = _result().to_coco(5)
    path = write_coco_results(entries, tmp_path / "sub" / "dets.json")
    assert json.loads(path.read_text()) == entries
    assert [p.name for p in path.parent.iterdir()] == ["dets.json"]  # no temp file left


def test_to_dict_is_json() -> None:
    d = json.loads(json.dumps(_result().to_dict()))
    assert d["labels"] == [1, 3, 7] and d["image_size"] == [H, W] and d["path"] == "img.jpg"
    assert d["class_names"] == ["person", "car", ""]
    assert mask_util.decode(d["masks"][0]).sum() == 30 * 30


# ---- construction --------------------------------------------------------------------------


def test_validation_and_dtypes() -> None:
    res = _result()
    assert res.boxes.dtype == np.float32 and res.labels.dtype == np.int64 and res.masks.dtype == bool
    with pytest.raises(ValueError, match="masks"):
        Result(res.boxes, res.scores, res.labels, image_size=(H + 1, W), masks=res.masks)
    with pytest.raises(ValueError, match="class_names"):
        Result(res.boxes, res.scores, res.labels, image_size=(H, W), class_names=["a"])
    assert Result(res.boxes, res.scores, res.labels, image_size=(H, W)).class_names == ["", "", ""]


def test_indexing() -> None:
    res = _result()
    sub = res[res.scores > 0.5]
    assert len(sub) == 2 and sub.class_names == ["person", "car"] and sub.masks.shape == (2, H, W)
    assert res[1].labels.tolist() == [3]


def test_from_detections() -> None:
    # One 2x2 per-box mask over the box (0, 0)-(30, 40): left column 0.9, right column 0.3.
    det = Detections(
        boxes=torch.tensor([[0.0, 0.0, 30.0, 40.0]]),
        scores=torch.tensor([0.8]),
        labels=torch.tensor([2]),
        masks=torch.tensor([[[0.9, 0.3], [0.9, 0.3]]]),
    )
    res = Result.from_detections(det, (H, W), class_names=["__background__", "a", "b"])
    assert res.class_names == ["b"] and res.masks.dtype == bool and res.masks.shape == (1, H, W)
    # By hand: the zero-padded 4-column profile (0, 0.9, 0.3, 0) spans the box grown 4/2 times
    # about its centre, x = -15..45, resized to 61 columns. Column i samples the profile at
    # (i + 0.5) * 4/61 - 0.5, above 0.5 for 0.556 < s < 1.667: i = 16..32, image x = 1..17.
    assert np.flatnonzero(res.masks[0].any(axis=0)).tolist() == list(range(1, 18))
    assert Result.from_detections(det, (H, W), class_names={1: "a"}).class_names == [""]
    with pytest.raises(ValueError, match=r"\(N, M, M\) per-box"):
        Result.from_detections(Detections(det.boxes, det.scores, det.labels, torch.zeros(1, H, W)), (H, W))


def test_from_detections_pastes_box_by_box_exactly_as_paste_masks() -> None:
    """Each mask is pasted into its box and run-length encoded without a full frame; the pixels
    and the RLE bytes must be those of thresholding paste_masks' full frames (pycocotools encode)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 28, 28, generator=g)
    boxes = torch.tensor(
        [
            [3.2, 4.7, 20.1, 15.3],  # inside
            [-6.3, -2.5, 8.0, 9.9],  # over the top-left corner
            [60.0, 40.0, 79.9, 59.9],  # reaching the bottom-right corner: runs wrap across columns
            [10.0, 10.0, 10.4, 10.2],  # tiny
            [90.0, 70.0, 99.0, 80.0],  # outside
            [-0.4, 0.0, 79.9, 59.9],  # whole image
        ]
    )
    det = Detections(boxes, torch.linspace(0.9, 0.4, 6), torch.ones(6, dtype=torch.int64), probs)
    res = Result.from_detections(det, (H, W), mask_thresh=0.5)
    dense = (paste_masks(probs, boxes, (H, W)) > 0.5).numpy()
    np.testing.assert_array_equal(res.masks, dense)
    expected = mask_util.encode(np.asfortranarray(dense.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"] for r in res.rles] == [r["counts"] for r in expected]
    assert not res.masks[4].any() and res.masks[5].any()


def test_masks_are_kept_as_rles_and_decoded_on_request() -> None:
    res = _result()
    dense = res.masks
    assert all(isinstance(r["counts"], bytes) and r["size"] == [H, W] for r in res.rles)
    assert dense.shape == (3, H, W) and dense.dtype == bool and dense[0, 20:50, 10:40].all() and dense[0].sum() == 900
    res.masks = dense[:, ::-1, :].copy()  # assigning re-encodes
    assert res.masks[0, H - 50 : H - 20, 10:40].all()
    res.masks = None
    assert res.rles is None and res.masks is None
    with pytest.raises(ValueError, match="masks"):
        res.masks = np.zeros((2, H, W), bool)


def test_memory_follows_the_objects_not_the_image() -> None:
    """20 small objects on a 12 MP image: pasting, export and drawing must never hold a frame per
    detection (before: 20 x 12 MB bool, then the same again as uint8 for pycocotools)."""
    import tracemalloc

    h, w, n = 3000, 4000, 20
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 300.0, h - 300.0])
    boxes = torch.cat([xy, xy + 200.0], dim=1)
    det = Detections(
        boxes, torch.linspace(0.9, 0.5, n), torch.ones(n, dtype=torch.int64), torch.rand(n, 28, 28, generator=g)
    )
    image = np.zeros((h, w, 3), np.uint8)
    tracemalloc.start()
    try:
        res = Result.from_detections(det, (h, w), image=image)
        entries = res.to_coco(1)
        _, peak_export = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        res.plot()
        _, peak_plot = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(entries) == n and all(e["segmentation"]["size"] == [h, w] for e in entries)
    assert peak_export < 2e6, peak_export  # kilobytes of RLE, not 20 x 12 MB frames
    # drawing: a copy of the pixels (3 bytes a pixel) and one mask frame at a time (1 byte)
    assert peak_plot < 4.5 * h * w, peak_plot


# ---- plot / save ---------------------------------------------------------------------------


def test_plot_colours_masks_only() -> None:
    res = _result()
    before = res.image.copy()
    out = np.asarray(res.plot(score_thresh=0.5))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(res.image, before)  # input untouched
    # mask interior, away from the box outline and the label
    expected = np.rint((1 - MASK_ALPHA) * 100 + MASK_ALPHA * np.array(label_color(1))).astype(np.uint8)
    np.testing.assert_array_equal(out[38, 25], expected)
    assert not np.array_equal(out[26, 60], before[26, 60])  # inside the second mask, below its label
    # outside every drawn mask and box; detection 2 (score 0.2) is below the threshold
    for y, x in [(57, 5), (57, 75), (40, 60), (54, 30)]:
        np.testing.assert_array_equal(out[y, x], before[y, x])
    # with the threshold lowered the thin mask of detection 2 appears
    assert not np.array_equal(np.asarray(res.plot())[54, 30], before[54, 30])


def test_plot_needs_an_image() -> None:
    res = _result(with_image=False)
    with pytest.raises(ValueError, match="no image"):
        res.plot()
    out = res.plot(image=Image.new("RGB", (W, H), (100, 100, 100)))
    assert out.size == (W, H)
    with pytest.raises(ValueError):
        res.plot(image=np.zeros((H, W + 1, 3), np.uint8))


def test_save_png(tmp_path) -> None:
    path = _result().save(tmp_path / "out" / "overlay.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (W, H)
    assert [p.name for p in path.parent.iterdir()] == ["overlay.png"]


# ---- visualize -----------------------------------------------------------------------------


def test_plot_metrics(tmp_path) -> None:
    log = tmp_path / "metrics.jsonl"
    lines = []
    for epoch in range(2):
        for it in range(epoch * 5, epoch * 5 + 5):
            lines.append({"epoch": epoch, "iter": it, "loss": 2.0 - 0.1 * it, "loss_mask": 0.5, "lr": 0.01})
        lines.append({"epoch": epoch, "val_loss": 1.5 - epoch * 0.1, "bbox_AP": 0.1 * epoch, "segm_AP": 0.05})
    log.write_text("\n".join(json.dumps(r) for r in lines) + "\n\nnot json\n")
    out = plot_metrics(log, tmp_path / "plots" / "metrics.png")
    assert out.stat().st_size > 1000
    with Image.open(out) as im:
        assert im.format == "PNG"


@pytest.mark.parametrize(
    "lines",
    [[], [{"loss": 1.0}, {"loss": 0.5}], [{"epoch": 0, "val_loss": 1.0}], [{"epoch": 1, "segm_AP": 0.3}]],
    ids=["empty", "loss-only-no-iter", "val-only", "ap-only"],
)
def test_plot_metrics_missing_keys(tmp_path, lines) -> None:
    log = tmp_path / "m.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert plot_metrics(log, tmp_path / "m.png").stat().st_size > 0


def test_draw_grid(tmp_path) -> None:
    pictures = [_result(), Image.new("RGB", (30, 90), (255, 0, 0)), Image.new("L", (50, 50), 200)]
    grid = draw_grid(pictures, tmp_path / "grid.png", cols=2, cell=64)
    assert grid.size == (128, 128)
    assert grid.getpixel((64 + 32, 32)) == (255, 0, 0)  # second cell centre
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (128, 128)
    with pytest.raises(ValueError):
        draw_grid([])


def test_a_large_image_is_drawn_on_a_preview_at_its_scale():
    from maskrcnn.inference.masks import crop_to_rle
    from maskrcnn.inference.results import label_color

    size = (4000, 8000)  # h, w
    rle = crop_to_rle(np.ones((1000, 1000), dtype=bool), 1000, 2000, size)  # rows 1000.., columns 2000..
    preview = np.zeros((1000, 2000, 3), dtype=np.uint8)  # the image shrunk 4 times
    r = Result([[2000, 1000, 3000, 2000]], [0.9], [1], size, rles=[rle], image=preview)
    picture = np.asarray(r.plot())
    assert picture.shape == (1000, 2000, 3)
    blended = np.rint(MASK_ALPHA * np.array(label_color(1))).astype(int)
    np.testing.assert_array_equal(picture[375, 625], blended)  # inside the mask, at 1/4 scale
    np.testing.assert_array_equal(picture[100, 100], [0, 0, 0])  # outside it
    np.testing.assert_array_equal(picture[600, 400], [0, 0, 0])  # where the full-size mask would be drawn
    with pytest.raises(ValueError, match="image is"):
        Result([[0, 0, 1, 1]], [0.9], [1], size, image=np.zeros((1000, 1500, 3), np.uint8))  # not one factor


def test_an_overlay_larger_than_the_display_size_is_shrunk():
    r = Result(np.zeros((0, 4)), [], [], (5000, 2500), image=np.full((5000, 2500, 3), 7, np.uint8))
    assert r.plot().size == (2048, 4096)  # DISPLAY_SIZE on the longer side
    assert r.plot(max_size=None).size == (2500, 5000)
