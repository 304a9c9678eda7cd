"""GeoTIFF inputs read window by window, and --geojson / --polygons outlines checked against the
truth painted into a synthetic raster with a known CRS and transform."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")
pytest.importorskip("skimage")

import pycocotools.mask as mask_util  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from scipy.ndimage import binary_fill_holes  # noqa: E402
from shapely.geometry import shape  # noqa: E402

from maskrcnn.cli import main  # noqa: E402
from maskrcnn.inference import geotiff as geo  # noqa: E402
from maskrcnn.inference.tiling import PREVIEW_STRIP, tile_grid  # noqa: E402
from maskrcnn.weights.checkpoint import save_checkpoint  # noqa: E402

from ..colour_detector import Scene, colour, colour_forward, tight  # noqa: E402
from ..helpers import tiny_model  # noqa: E402

H, W = 4200, 300  # taller than results.DISPLAY_SIZE: the overlay's preview is built in strips
TILE, OVERLAP = 256, 0.2
X0, Y0, PIXEL = 500_000.0, 4_650_000.0, 0.5  # UTM 33N: the top-left corner, 0.5 m pixels


def raster_scene() -> Scene:
    """Shapes on black, one crossing several tile borders, and a square with a square hole."""
    scene = Scene(H, W)
    scene.add(1, "ellipse", (20, 30, 90, 80))
    scene.add(2, "rect", (150, 180, 190, 700))  # 520 px tall: cut by three tile borders
    scene.add(3, "triangle", (40, 1000, 120, 1070))
    scene.add(1, "ellipse", (200, 3000, 280, 3100))
    # The donut: an 80 x 80 square without its middle 30 x 30.
    ring = np.ones((80, 80), bool)
    ring[25:55, 25:55] = False
    y, x = 2000, 100
    scene.image[y : y + 80, x : x + 80][ring] = colour(2, len(scene.labels))
    scene.labels.append(2)
    scene.masks.append(tight(y, x, ring))
    return scene


def write_geotiff(path, rgb: np.ndarray) -> None:
    transform = from_origin(X0, Y0, PIXEL, PIXEL)  # x = X0 + 0.5 col, y = Y0 - 0.5 row
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=rgb.shape[0],
        width=rgb.shape[1],
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=transform,
        tiled=True,
        blockxsize=256,
        blockysize=256,
    ) as ds:
        ds.write(np.moveaxis(rgb, -1, 0))


def filled(geometry, y0: int, x0: int, h: int, w: int, to_pixels) -> np.ndarray:
    """The (h, w) pixels at (y0, x0) whose centres lie inside ``geometry`` (given in map or pixel units)."""
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w] + 0.5
    gx, gy = to_pixels(xx, yy)
    return shapely.contains_xy(geometry, gx, gy)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


class Recorder:
    """A rasterio dataset that notes every window it is asked to read."""

    def __init__(self, ds) -> None:
        self.ds, self.windows = ds, []

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def read(self, indexes=None, window=None, **kw):
        assert window is not None, "a read without a window reads the whole raster"
        self.windows.append((int(window.height), int(window.width)))
        return self.ds.read(indexes, window=window, **kw)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, tiny_model())
    return path


def test_a_geotiff_is_tiled_by_windows_and_outlined_in_its_crs(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from maskrcnn.model.mask_rcnn import MaskRCNN

    scene = raster_scene()
    write_geotiff(tmp_path / "field.tif", scene.image)
    forward = colour_forward()
    monkeypatch.setattr(
        MaskRCNN, "forward", lambda self, images, targets=None, propose=None, score_thresh=None: forward(images)
    )
    opened = []
    real_open = geo._open_raster

    @contextlib.contextmanager
    def recording_open(path):
        with real_open(path) as ds:
            opened.append(Recorder(ds))
            yield opened[-1]

    monkeypatch.setattr(geo, "_open_raster", recording_open)
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--weights",
            str(tiny_ckpt),
            str(tmp_path / "field.tif"),
            "--tile",
            str(TILE),
            "--tile-overlap",
            str(OVERLAP),
            "--geojson",
            "--polygons",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err

    # Never the whole raster: one window per tile, and the preview's strips of rows.
    windows = [w for r in opened for w in r.windows]
    tiles = [w for w in windows if w[0] <= TILE and w[1] <= TILE]
    strips = [w for w in windows if w not in tiles]
    assert len(tiles) == len(tile_grid(H, W, TILE, OVERLAP))
    assert strips and all(h <= PREVIEW_STRIP and w == W for h, w in strips)
    assert max(h * w for h, w in windows) <= PREVIEW_STRIP * W < H * W / 4

    collection = json.loads((out / "field.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    features = collection["features"]
    assert len(features) == len(scene.labels), "one outline per object, merged across tile borders"
    entries = json.loads((out / "predictions.json").read_text())

    def to_map(x, y):  # the known transform, applied here by hand
        return X0 + PIXEL * x, Y0 - PIXEL * y

    for feature, entry in zip(features, entries):
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and geometry.geom_type == "Polygon"
        assert feature["properties"]["score"] == pytest.approx(entry["score"])
        assert feature["properties"]["category_id"] == entry["category_id"]
        rle = {"size": [H, W], "counts": entry["segmentation"]["counts"].encode()}
        predicted = mask_util.decode(rle).astype(bool)
        # Filled back at pixel centres, the outline is the predicted mask within the simplification.
        x, y, w, h = (int(v) for v in mask_util.toBbox(rle))
        back = filled(geometry, y - 2, x - 2, h + 4, w + 4, to_map)
        assert iou(back, predicted[y - 2 : y + h + 2, x - 2 : x + w + 2]) > 0.97
        # And it is the object painted there (the stand-in detector's masks are 56 x 56 a box).
        k = next(
            i
            for i, (ty, tx, c) in enumerate(scene.masks)
            if ty <= y + h / 2 < ty + c.shape[0] and tx <= x + w / 2 < tx + c.shape[1]
        )
        ty, tx, truth = scene.masks[k]
        assert feature["properties"]["class"] == ("circle", "square", "triangle")[scene.labels[k] - 1]
        assert iou(filled(geometry, ty, tx, *truth.shape, to_map), truth) > 0.9
        if k == len(scene.labels) - 1:  # the donut keeps its hole: 30 x 30 pixels of 0.25 m2
            (hole,) = geometry.interiors
            assert shapely.Polygon(hole).area == pytest.approx(900 * PIXEL**2, rel=0.15)
        else:
            assert not geometry.interiors

    # polygons.json: COCO results that pycocotools reads, each polygon the RLE mask's outline.
    gt = COCO()
    gt.dataset = {
        "images": [{"id": entries[0]["image_id"], "height": H, "width": W}],
        "categories": [{"id": i} for i in (1, 2, 3)],
        "annotations": [],
    }
    gt.createIndex()
    polys = gt.loadRes(str(out / "polygons.json"))
    for ann, entry in zip(polys.loadAnns(polys.getAnnIds()), entries):
        assert isinstance(ann["segmentation"], list)
        rle = {"size": [H, W], "counts": entry["segmentation"]["counts"].encode()}
        # COCO polygons have no holes: the outline is the mask with its holes filled.
        assert iou(polys.annToMask(ann).astype(bool), binary_fill_holes(mask_util.decode(rle))) > 0.97


def test_an_image_without_georeferencing_is_outlined_in_pixels(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from maskrcnn.model.mask_rcnn import MaskRCNN

    scene = Scene(120, 160)
    scene.add(2, "rect", (30, 20, 90, 70))
    Image.fromarray(scene.image).save(tmp_path / "plain.png")
    forward = colour_forward()
    monkeypatch.setattr(
        MaskRCNN, "forward", lambda self, images, targets=None, propose=None, score_thresh=None: forward(images)
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(tiny_ckpt),
                str(tmp_path / "plain.png"),
                "--geojson",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    collection = json.loads((out / "plain.geojson").read_text())
    assert "crs" not in collection
    (feature,) = collection["features"]
    # Pixel-edge coordinates: columns 30..89 and rows 20..69 span x 30..90, y 20..70.
    assert shape(feature["geometry"]).bounds == pytest.approx((30, 20, 90, 70), abs=1.0)
    (tmp_path / "mine.geojson").write_text("{}")
    capsys.readouterr()
    Image.fromarray(scene.image).save(tmp_path / "mine.png")
    code = main(
        [
            "predict",
            "--weights",
            str(tiny_ckpt),
            str(tmp_path / "mine.png"),
            "--geojson",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 2 and "mine.geojson exists and was not written by maskrcnn predict" in capsys.readouterr().err
    assert (tmp_path / "mine.geojson").read_text() == "{}"


def test_georeference_reads_the_crs_and_transform_and_plain_tiffs_have_none(tmp_path):
    write_geotiff(tmp_path / "g.tif", np.zeros((40, 50, 3), np.uint8))
    ref = geo.georeference(tmp_path / "g.tif")
    assert ref.crs == "EPSG:32633" and ref.transform == (PIXEL, 0.0, X0, 0.0, -PIXEL, Y0)
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "plain.tif")
    assert geo.georeference(tmp_path / "plain.tif") is None and not geo.is_georeferenced(tmp_path / "plain.tif")


def test_a_sixteen_bit_raster_is_read_by_windows_as_the_whole_image_is(tmp_path, monkeypatch):
    from maskrcnn.data import normalize
    from maskrcnn.data.images import normalized_rgb

    monkeypatch.setattr(normalize, "MAX_SAMPLES", 2000)  # percentiles over every 2nd row and column
    raw = np.random.default_rng(3).gamma(2.0, 300.0, (70, 90)).clip(0, 65535).astype(np.uint16)
    with rasterio.open(
        tmp_path / "dem.tif",
        "w",
        driver="GTiff",
        height=70,
        width=90,
        count=1,
        dtype="uint16",
        crs="EPSG:32633",
        transform=from_origin(X0, Y0, PIXEL, PIXEL),
    ) as ds:
        ds.write(raw, 1)
    for percentiles in (None, (1.0, 99.0)):
        whole = normalized_rgb(raw, percentiles)
        with geo.RasterioTiles.open(tmp_path / "dem.tif", None, percentiles) as source:
            for t in tile_grid(70, 90, 32, 0.1):
                assert np.array_equal(source.read(t), whole[t.y0 : t.y1, t.x0 : t.x1])


def test_a_geotiff_without_rasterio_is_refused_in_one_line(tmp_path, monkeypatch):
    import sys

    write_geotiff(tmp_path / "g.tif", np.zeros((40, 50, 3), np.uint8))
    monkeypatch.setitem(sys.modules, "rasterio", None)  # import rasterio now raises ImportError
    with pytest.raises(ValueError, match=r"needs rasterio: pip install 'maskrcnn\[geo\]'"):
        geo.is_georeferenced(tmp_path / "g.tif")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "plain.tif")
    assert not geo.is_georeferenced(tmp_path / "plain.tif")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--geojson", "--polygon-tolerance", "-1"], "polygon tolerance must be a number of pixels >= 0, got -1.0"),
        (["--polygons", "--polygon-tolerance", "nan"], "polygon tolerance must be a number of pixels >= 0, got nan"),
    ],
)
def test_bad_polygon_options_are_one_line_errors_before_any_work(tiny_ckpt, tmp_path, capsys, flags, message):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    code = main(
        [
            "predict",
            "--weights",
            str(tiny_ckpt),
            str(tmp_path / "a.png"),
            *flags,
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tolerance", [0.0, 0.5, 1.0, 3.0])
def test_every_outline_is_valid_even_for_ragged_masks_with_holes_and_touching_parts(tolerance):
    from maskrcnn.applications.polygon_files import feature_collection
    from maskrcnn.inference.geotiff import Georeference
    from maskrcnn.inference.results import Result

    rng = np.random.default_rng(5)
    masks = np.stack([rng.random((40, 60)) < p for p in (0.3, 0.5, 0.7)])  # noise: parts, holes, diagonal contacts
    masks[0] = np.eye(40, 60, dtype=bool) | np.eye(40, 60, 2, dtype=bool)  # parts touching only at corners
    result = Result(np.tile([0, 0, 60, 40], (3, 1)), np.array([0.9, 0.8, 0.7]), np.ones(3), (40, 60), masks=masks)
    reference = Georeference("EPSG:32633", (PIXEL, 0.0, X0, 0.0, -PIXEL, Y0))
    for ref in (None, reference):
        for feature in feature_collection(result, tolerance, ref)["features"]:
            geometry = shape(feature["geometry"])
            assert geometry.is_valid, (tolerance, feature["id"], shapely.is_valid_reason(geometry))
            if tolerance == 0 and ref is None:  # unsimplified: filled at pixel centres, the mask exactly
                k = feature["id"] - 1
                assert (filled(geometry, 0, 0, 40, 60, lambda x, y: (x, y)) == masks[k]).all()
