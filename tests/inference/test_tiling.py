"""Tiled inference: the grid by hand, and a large scene of known objects found once each."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn.cli import main
from maskrcnn.inference.masks import crop_to_rle, decode_one
from maskrcnn.inference.results import Result
from maskrcnn.inference.tiling import PillowTiles, Tile, merge_tiles, preview, tile_grid

from ..colour_detector import Scene, colour_forward, crop_iou
from ..helpers import tiny_model


def test_the_grid_by_hand():
    # 2500 wide: a step of at most 1024 - 205 = 819 needs 2 gaps; spread evenly they are 738.
    assert tile_grid(1000, 2500, 1024, 0.2) == [
        Tile(0, 0, 1024, 1000),
        Tile(738, 0, 1762, 1000),
        Tile(1476, 0, 2500, 1000),
    ]
    assert [t.x0 for t in tile_grid(10, 1024 + 819, 1024, 0.2)] == [0, 819]  # exactly one step
    assert [t.x0 for t in tile_grid(10, 2048, 1024, 0.0)] == [0, 1024]
    assert tile_grid(300, 200, 1024) == [Tile(0, 0, 200, 300)]  # smaller than a tile: one tile, the image
    rows = tile_grid(1100, 1100, 512, 0.25)  # 3 x 3, row by row
    assert [(t.x0, t.y0) for t in rows[:4]] == [(0, 0), (294, 0), (588, 0), (0, 294)]
    assert all(t.x1 - t.x0 == 512 and t.y1 - t.y0 == 512 for t in rows)


@pytest.mark.parametrize("tile, overlap", [(0, 0.2), (512, 1.0), (512, -0.1), (12.5, 0.2), (True, 0.2)])
def test_bad_tiling_arguments_are_one_line_errors(tile, overlap):
    with pytest.raises(ValueError, match="tile"):
        tile_grid(100, 100, tile, overlap)


TILE, OVERLAP = 512, 0.25  # 128 px shared between neighbours; the grid is 5 x 4 tiles


def big_scene() -> tuple[Scene, dict[str, int]]:
    """1900 x 1500 px of ~200 small objects on a jittered grid, and a few placed on purpose."""
    scene = Scene(1500, 1900)
    special = {}
    grid = tile_grid(1500, 1900, TILE, OVERLAP)
    xs = sorted({t.x0 for t in grid})  # 0, 347, 694, 1041, 1388
    ys = sorted({t.y0 for t in grid})  # 0, 329, 659, 988
    special["bar"] = len(scene.labels)  # 1200 x 40: cut by every tile that holds any of it
    scene.add(2, "rect", (200, 1420, 1400, 1460))
    special["blob"] = len(scene.labels)  # larger than a tile
    scene.add(3, "ellipse", (1200, 700, 1850, 1350))
    special["corner"] = len(scene.labels)  # across the corner where four tiles meet
    cx, cy = xs[2] + TILE - 64, ys[1] + TILE - 64
    scene.add(1, "ellipse", (cx - 45, cy - 45, cx + 45, cy + 45))
    special["pair"] = len(scene.labels)  # one class, 8 px apart, straddling a tile edge
    edge = xs[1] + TILE
    scene.add(1, "rect", (edge - 40, 150, edge + 4, 200))
    scene.add(1, "rect", (edge + 12, 150, edge + 60, 200))
    reserved = [
        (190, 1410, 1410, 1470),
        (1190, 690, 1860, 1360),
        (cx - 55, cy - 55, cx + 55, cy + 55),
        (edge - 50, 140, edge + 70, 210),
    ]
    rng = np.random.default_rng(0)
    kinds = ("rect", "ellipse", "triangle")
    for y in range(0, 1380, 110):
        for x in range(0, 1800, 110):
            w, h = rng.integers(30, 90, size=2)
            x0, y0 = x + rng.integers(5, 105 - w), y + rng.integers(5, 105 - h)
            box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
            if any(box[0] < r[2] and r[0] < box[2] and box[1] < r[3] and r[1] < box[3] for r in reserved):
                continue
            scene.add(int(rng.integers(1, 4)), kinds[int(rng.integers(0, 3))], box)
    return scene, special


@pytest.fixture(scope="module")
def scene():
    return big_scene()


def crossing(scene: Scene, tiles: list[Tile]) -> int:
    """How many objects some inner tile edge cuts."""
    edges_x = ({t.x0 for t in tiles} | {t.x1 for t in tiles}) - {0, scene.width}
    edges_y = ({t.y0 for t in tiles} | {t.y1 for t in tiles}) - {0, scene.height}
    boxes = scene.boxes()
    return sum(any(b[0] < e < b[2] for e in edges_x) or any(b[1] < e < b[3] for e in edges_y) for b in boxes)


@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "boxes-only"])
def test_every_object_of_a_large_scene_is_found_once_in_the_full_frame(scene, with_masks):
    scene, special = scene
    model = tiny_model()
    model.forward = colour_forward(with_masks)
    result = model.predict(scene.image, tile=TILE, tile_overlap=OVERLAP, batch_size=4)

    tiles = tile_grid(scene.height, scene.width, TILE, OVERLAP)
    assert len(tiles) == 20 and crossing(scene, tiles) > 60  # the merge is really exercised
    assert [len(c) for c in model.forward.calls] == [4] * 5  # 20 tiles in batches of 4
    assert all(size == (TILE, TILE) for c in model.forward.calls for size in c)  # native resolution
    assert result.image_size == (1500, 1900)
    assert len(result) == len(scene.labels), f"{len(result)} detections for {len(scene.labels)} objects"

    truth = scene.boxes()
    # Every detection is one object: its box is the object's box in the full frame (the stand-in
    # reports exact boxes; a union of pieces must give it back), and its label is the object's.
    found = []
    for i in range(len(result)):
        dist = np.abs(truth - result.boxes[i]).max(axis=1)  # (N,) worst box edge offset
        k = int(np.argmin(dist))
        assert dist[k] <= 1.0, f"detection {result.boxes[i]} matches no object (nearest {truth[k]})"
        assert result.labels[i] == scene.labels[k]
        found.append(k)
    assert sorted(found) == list(range(len(scene.labels)))  # each object exactly once
    if with_masks:
        for i, k in enumerate(found):
            rle = result.rles[i]
            assert rle["size"] == [1500, 1900]
            assert crop_iou(decode_one(rle), scene.masks[k]) > 0.9, f"object {k}: mask differs"
    for name in ("bar", "blob", "corner"):
        assert special[name] in found
    assert special["pair"] in found and special["pair"] + 1 in found  # neighbours kept apart


def test_the_whole_image_pass_finds_objects_no_tile_can_hold(scene):
    # A detector that needs an object's outline never sees the 1200-px bar or the 650-px blob
    # in a 512-px tile; the whole image shrunk 4 times shows them, and their cut pieces (none
    # here) would give way to them. Small objects still come from the tiles, once each.
    scene, special = scene
    model = tiny_model()
    model.forward = colour_forward(whole_only=True)
    tiles_only = model.predict(scene.image, tile=TILE, tile_overlap=OVERLAP, batch_size=4)
    assert len(tiles_only) == len(scene.labels) - 2
    result = model.predict(scene.image, tile=TILE, tile_overlap=OVERLAP, batch_size=4, tile_whole=True)
    assert model.forward.calls[-1] == [(375, 475)]  # ceil(1500 / 4) x ceil(1900 / 4), after the 20 tiles
    assert len(result) == len(scene.labels)
    truth = scene.boxes()
    for name in ("bar", "blob"):
        k = special[name]
        i = int(np.argmin(np.abs(result.boxes - truth[k]).max(axis=1)))
        np.testing.assert_allclose(result.boxes[i], truth[k], atol=4)  # 4 px blocks
        assert result.labels[i] == scene.labels[k]
        assert crop_iou(decode_one(result.rles[i]), scene.masks[k]) > 0.8  # a 40-px bar, edges in 4-px blocks


def test_tiles_that_saw_one_object_whole_and_cut_give_one_detection_with_the_best_score():
    # Hand-made: two tiles sharing columns 60..99; an object at columns 80..129 is cut by tile
    # A's right edge and whole in tile B; a second object only in tile A.
    a, b = Tile(0, 0, 100, 50), Tile(60, 0, 160, 50)
    size = (50, 160)
    mask = np.ones((20, 50), dtype=bool)  # rows 10..29, columns 80..129

    def tile_result(tile: Tile, boxes, scores, crops):
        rles = [crop_to_rle(c, y - tile.y0, x - tile.x0, (50, 100)) for y, x, c in crops]
        return Result(
            np.array(boxes, np.float32) - [tile.x0, tile.y0, tile.x0, tile.y0],
            scores,
            [1] * len(scores),
            (50, 100),
            rles=rles,
            class_names=["x"] * len(scores),
        )

    ra = tile_result(
        a, [[80, 10, 100, 30], [5, 5, 25, 25]], [0.6, 0.7], [(10, 80, mask[:, :20]), (5, 5, np.ones((20, 20), bool))]
    )
    rb = tile_result(b, [[80, 10, 130, 30]], [0.9], [(10, 80, mask)])
    merged = merge_tiles([a, b], [ra, rb], size)
    assert len(merged) == 2
    np.testing.assert_array_equal(merged.boxes, [[80, 10, 130, 30], [5, 5, 25, 25]])
    np.testing.assert_allclose(merged.scores, [0.9, 0.7])
    expected = np.zeros(size, bool)
    expected[10:30, 80:130] = True
    np.testing.assert_array_equal(mask_util.decode(merged.rles[0]).astype(bool), expected)


def test_a_single_tile_gives_exactly_the_untiled_result():
    model = tiny_model()
    image = np.random.default_rng(1).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    plain, tiled = model.predict(image), model.predict(image, tile=256)
    assert len(plain) > 0 and len(tiled) == len(plain)
    order = np.argsort(-plain.scores, kind="stable")
    np.testing.assert_allclose(tiled.boxes, plain.boxes[order], atol=1e-4)
    assert [r["counts"] for r in tiled.rles] == [plain.rles[i]["counts"] for i in order]


def test_sixteen_bit_tiles_are_scaled_like_the_whole_image(tmp_path):
    values = (np.arange(300 * 400, dtype=np.uint32).reshape(300, 400) * 7 % 65536).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "slide.tif")
    with Image.open(tmp_path / "slide.tif") as img:
        assert img.mode == "I;16"
        tiles = PillowTiles(img)
        part = tiles.read(Tile(100, 50, 228, 178))
    expected = np.rint(values[50:178, 100:228] / 257.0).astype(np.uint8)  # 0..65535 onto 0..255
    assert part.shape == (128, 128, 3)
    np.testing.assert_array_equal(part[..., 0], expected)
    np.testing.assert_array_equal(part[..., 2], expected)


def test_a_preview_is_the_image_shrunk_by_a_whole_factor():
    from maskrcnn.inference.tiling import ArrayTiles

    rgb = np.zeros((2500, 1000, 3), dtype=np.uint8)
    rgb[:, 500:] = 200
    small = preview(ArrayTiles(rgb), 1000)  # factor 3: 834 x 334, built in strips
    assert small.shape == (834, 334, 3)
    assert (small[:, :166] == 0).all() and (small[:, 167:] == 200).all()


def test_predict_tile_on_the_command_line(tiny_ckpt, tmp_path, capsys):
    rgb = np.random.default_rng(2).integers(0, 255, (500, 700, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--weights",
            str(tiny_ckpt),
            str(tmp_path / "big.png"),
            "--tile",
            "256",
            "--tile-overlap",
            "0.2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    entries = json.loads((out / "predictions.json").read_text())
    assert entries, "the untrained tiny model keeps every candidate (score_thresh 0)"
    for e in entries:
        x, y, w, h = e["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 700 + 1e-3 and y + h <= 500 + 1e-3
        assert e["segmentation"]["size"] == [500, 700]
    with Image.open(out / "overlays" / "big.png") as overlay:
        assert overlay.size == (700, 500)


def test_the_pixel_limit_names_the_file_and_the_tile_flag(tiny_ckpt, tmp_path, capsys):
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(tmp_path / "wide.png")
    code = main(
        [
            "predict",
            "--weights",
            str(tiny_ckpt),
            str(tmp_path / "wide.png"),
            "--max-pixels",
            "10000",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "wide.png" in err and "--tile" in err and "60,000" in err


def test_evaluate_tile_scores_the_merged_detections_against_the_annotations(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from maskrcnn.model.mask_rcnn import MaskRCNN

    scene, _ = big_scene()
    (tmp_path / "images").mkdir()
    Image.fromarray(scene.image).save(tmp_path / "images" / "scene.png")
    annotations = []
    for k, ((y, x, crop), label) in enumerate(zip(scene.masks, scene.labels)):
        rle = crop_to_rle(crop, y, x, (scene.height, scene.width))
        annotations.append(
            {
                "id": k + 1,
                "image_id": 1,
                "category_id": label,
                "iscrowd": 0,
                "area": int(crop.sum()),
                "bbox": [int(x), int(y), crop.shape[1], crop.shape[0]],
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
            }
        )
    gt = {
        "images": [{"id": 1, "file_name": "scene.png", "height": scene.height, "width": scene.width}],
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in enumerate(("circle", "square", "triangle"), 1)],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    forward = colour_forward()
    monkeypatch.setattr(
        MaskRCNN, "forward", lambda self, images, targets=None, propose=None, score_thresh=None: forward(images)
    )
    code = main(
        [
            "evaluate",
            "--weights",
            str(tiny_ckpt),
            "--data",
            str(tmp_path / "gt.json"),
            "--images",
            str(tmp_path / "images"),
            "--tile",
            str(TILE),
            "--tile-overlap",
            str(OVERLAP),
            "--out",
            str(tmp_path / "ev"),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert all(size == (TILE, TILE) for call in forward.calls for size in call)  # tiles went to the model
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    # Every object found once with its own mask: perfect AP50; AP over IoU 0.5..0.95 only loses
    # the pixel or two a 56 x 56 mask misses on the edge of a small object.
    assert metrics["segm"]["AP50"] == pytest.approx(1.0, abs=1e-6) and metrics["segm"]["AP"] > 0.85
    assert metrics["bbox"]["AP50"] == pytest.approx(1.0, abs=1e-6) and metrics["bbox"]["AP"] > 0.95


def test_a_tiled_run_raises_the_default_pixel_limit_but_keeps_an_explicit_one(tmp_path, monkeypatch):
    import maskrcnn.inference.options as options
    from maskrcnn.data.errors import DatasetError

    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(tmp_path / "wide.png")
    model = tiny_model()
    monkeypatch.setattr(options, "MAX_PIXELS", 10_000)  # stands for the default: 60,000 pixels are over it
    with pytest.raises(DatasetError, match="--tile"):
        model.predict(tmp_path / "wide.png", max_pixels=10_000)
    assert model.predict(tmp_path / "wide.png", max_pixels=10_000, tile=128).image_size == (200, 300)
    with pytest.raises(DatasetError, match="more than the limit of 20,000"):
        model.predict(tmp_path / "wide.png", max_pixels=20_000, tile=128)


def test_a_tiled_run_decodes_a_tiff_past_pillows_own_limit(tmp_path):
    # 13,500 x 13,500 = 182 M pixels: over twice Pillow's MAX_IMAGE_PIXELS, which an
    # uncompressed TIFF trips when decoded (1 bit a pixel on disk: 23 MB).
    from maskrcnn.data.errors import DatasetError
    from maskrcnn.structures import Detections, ModelOutput

    Image.new("1", (13_500, 13_500)).save(tmp_path / "slide.tif")
    model = tiny_model()
    seen = []

    def nothing(images, targets=None, propose=None, score_thresh=None):
        seen.extend(tuple(im.shape) for im in images)
        return ModelOutput(detections=[Detections.empty() for _ in images])

    model.forward = nothing
    with pytest.raises(DatasetError, match="slide.tif.*--tile"):
        model.predict(tmp_path / "slide.tif")
    result = model.predict(tmp_path / "slide.tif", tile=8192, tile_overlap=0.1, keep_images=False)
    assert result.error is None and result.image_size == (13_500, 13_500) and len(result) == 0
    assert seen == [(3, 8192, 8192)] * 4


def test_tiling_options_that_would_be_ignored_or_run_thousands_of_tiles_are_refused(tiny_ckpt, tmp_path, capsys):
    """Was: --tile-whole or --tile-overlap without --tile, or --tile-whole on a video, ignored without a word; --tile 100
    --tile-overlap 0.99 planned 13,728 tiles (a 1-px step) for a 242 x 195 image."""
    Image.fromarray(np.zeros((195, 242, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "clip.mp4").write_bytes(b"refused before it is opened")
    cases = [
        ([tmp_path / "a.png", "--tile-whole"], "--tile-whole needs --tile"),
        ([tmp_path / "a.png", "--tile-overlap", "0.5"], "--tile-overlap needs --tile"),  # was ignored
        ([tmp_path / "a.png", "--tile", "100", "--tile-overlap", "0.99"], "[0, 0.75]"),
        ([tmp_path / "clip.mp4", "--tile", "64", "--tile-whole"], "--tile-whole applies to images only"),
        # round 2: --tile 1 planned 24,165 one-pixel tiles for a 179 x 135 image and ran for minutes, silently
        ([tmp_path / "a.png", "--tile", "1"], "must be at least 32 pixels"),
        ([tmp_path / "a.png", "--tile", "31"], "must be at least 32 pixels"),
    ]
    for args, words in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["predict", "--weights", str(tiny_ckpt), *map(str, args), "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and words in err[-1] and err[-1].startswith("maskrcnn predict: error:"), err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["evaluate", "--weights", str(tiny_ckpt), "--data", "x.json", "--images", ".", "--tile-whole"])
    assert "--tile-whole needs --tile" in capsys.readouterr().err

    model = tiny_model()  # the API: the same rules, as ValueErrors
    with pytest.raises(ValueError, match="tile must be at least 32 pixels"):
        model.predict(np.zeros((195, 242, 3), np.uint8), tile=1)
    with pytest.raises(ValueError, match="tile_whole needs tile"):
        model.predict(np.zeros((195, 242, 3), np.uint8), tile_whole=True)
    with pytest.raises(ValueError, match=r"\[0, 0.75\]"):
        tile_grid(195, 242, 100, 0.99)
    assert len(tile_grid(195, 242, 100, 0.75)) == 5 * 7  # the largest overlap allowed: 25-px steps over 95 and 142 px
