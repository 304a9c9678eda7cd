"""Microscopy outputs: an instance label image per input, and one table of per-object measurements.

``maskrcnn predict --labels`` writes, beside the COCO results:

- ``OUT/labels/<name>.tif``: the image's detections as one label image, the form Fiji/ImageJ,
  napari, CellProfiler and scikit-image take: 0 is background, object k of the image (its
  index in the results order, best score first) is k + 1; uint16, or uint32 past 65,535
  objects. Where masks overlap, the pixel goes to the higher score (equal scores: the earlier
  object). Written by tifffile, zlib-compressed (ImageJ's "ZIP"), with its ``Software`` tag
  set to ``SOFTWARE``.
- ``OUT/measurements.csv``: one row per object (``COLUMNS``), measured by scikit-image's
  ``regionprops`` on the object's own mask, i.e. the mask in ``predictions.json`` (before
  overlaps are resolved; ``area_in_labels`` counts the pixels it keeps in the label image),
  with the intensities of the *original* image file under it (its raw 8-, 12-, 16-bit or
  float values, not the 8-bit picture the model saw; a multi-channel image's channels
  averaged per pixel).

Coordinates are pixels: x right, y down. ``centroid_x``, ``centroid_y`` are the mean pixel
position with pixel (0, 0)'s centre at (0, 0) (regionprops' convention); ``box_*`` is the
detection's box as in ``predictions.json`` (pixel edges). ``perimeter`` is regionprops'
(4-connected boundary, diagonal steps counted sqrt(2)).

Shape shorthand: H x W image, h x w an object's box-sized crop.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..inference.masks import decode_one
from ..inference.results import Result

log = logging.getLogger(__name__)

SOFTWARE = "maskrcnn predict --labels"
COLUMNS = (
    "image_id",
    "image",
    "object_id",
    "class",
    "category_id",
    "score",
    "area",
    "area_in_labels",
    "centroid_x",
    "centroid_y",
    "box_x1",
    "box_y1",
    "box_x2",
    "box_y2",
    "perimeter",
    "eccentricity",
    "solidity",
    "mean_intensity",
    "max_intensity",
)
_MISSING = "--labels needs tifffile: pip install 'maskrcnn[microscopy]'"


def label_dtype(n: int) -> type:
    """uint16 for up to 65,535 objects (what every viewer reads), else uint32."""
    return np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32


def label_image(result: Result) -> np.ndarray:
    """(H, W) label image of ``result``: 0 background, detection i -> i + 1, overlaps to the
    higher score (then the lower index); uint16, uint32 past 65,535 detections.

    Built from each mask's box-sized crop: no (N, H, W) stack.
    """
    n = len(result)
    labels = np.zeros(result.image_size, dtype=label_dtype(n))
    if result.rles is None:
        return labels
    # Painted worst first, so a better object overwrites: lexsort's last key is the primary one.
    order = np.lexsort((-np.arange(n), result.scores))  # score ascending, then index descending
    for i in order:
        y0, x0, crop = decode_one(result.rles[i])
        labels[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]][crop] = i + 1
    return labels


class OriginalPixels:
    """The original values of an image file, box by box, for intensity measurements.

    A georeferenced TIFF is read by rasterio windows (never whole); another TIFF by tifffile
    (any bit depth, channels first or last), other formats by Pillow with EXIF orientation, as
    the image was read for the model. When the file's pixels do not match the ``image_size``
    the detections are for, no intensities are given (None).
    """

    def __init__(self, path: str | Path, image_size: tuple[int, int]) -> None:
        from ..inference.geotiff import RasterioTiles, _open_raster, is_georeferenced

        self._stack = contextlib.ExitStack()
        self._raster: RasterioTiles | None = None
        self.pixels: np.ndarray | None = None  # (H, W) or (H, W, C), the file's own dtype
        try:
            if is_georeferenced(path):
                self._raster = RasterioTiles(self._stack.enter_context(_open_raster(path)))
                if self._raster.size != tuple(image_size):
                    raise ValueError(f"raster is {self._raster.size}")
                return
            pixels = self._read(Path(path))
        except (OSError, ValueError) as e:  # the detections are written all the same
            log.warning("%s: cannot read its pixels for intensities (%s): none measured", path, e)
            self.close()
            return
        if pixels.ndim == 3 and pixels.shape[1:] == tuple(image_size) and pixels.shape[0] <= 4:
            pixels = np.moveaxis(pixels, 0, -1)  # (C, H, W) -> (H, W, C)
        if pixels.shape[:2] != tuple(image_size):
            log.warning(
                "%s: pixels of shape %s, detections for %s: no intensities measured", path, pixels.shape, image_size
            )
            return
        self.pixels = pixels

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.squeeze(tifffile.imread(path))
        from PIL import ImageOps

        from ..data.images import open_image

        with open_image(path, None) as img:
            img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB") if img.mode in ("P", "PA", "CMYK", "YCbCr") else img)

    def box(self, y0: int, x0: int, h: int, w: int) -> np.ndarray | None:
        """(h, w) float64 values of the box at row y0, column x0; None when not measurable."""
        if self._raster is not None:
            return _gray(self._raster.box_values(y0, x0, h, w))
        return None if self.pixels is None else _gray(self.pixels[y0 : y0 + h, x0 : x0 + w])

    def close(self) -> None:
        self._stack.close()
        self._raster = None


def _gray(pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W) float64: channels averaged (alpha included as read)."""
    values = np.asarray(pixels, dtype=np.float64)
    return values.mean(axis=2) if values.ndim == 3 else values


def measure(result: Result, labels: np.ndarray, pixels: OriginalPixels | None) -> list[dict]:
    """One measurement row per detection (``COLUMNS`` less ``image_id`` and ``image``).

    Each object is measured by ``regionprops`` on its own box-sized mask crop, padded by one
    background pixel so that the perimeter of an object cut by the image border is closed.
    """
    from skimage.measure import regionprops

    in_labels = np.bincount(labels.reshape(-1), minlength=len(result) + 1)
    category_ids = result.category_ids
    rows = []
    for i in range(len(result)):
        row: dict = {
            "object_id": i + 1,
            "class": result.class_names[i] or str(int(result.labels[i])),
            "category_id": int(category_ids[i]),
            "score": round(float(result.scores[i]), 6),
            "area": 0,
            "area_in_labels": int(in_labels[i + 1]),
        }
        row.update(zip(("box_x1", "box_y1", "box_x2", "box_y2"), (round(float(v), 3) for v in result.boxes[i])))
        y0, x0, crop = decode_one(result.rles[i]) if result.rles is not None else (0, 0, np.zeros((0, 0), bool))
        if crop.any():
            values = pixels.box(y0, x0, *crop.shape) if pixels is not None else None
            padded = np.pad(crop, 1).astype(np.uint8)  # (h + 2, w + 2)
            intensity = None if values is None else np.pad(values, 1)
            (props,) = regionprops(padded, intensity_image=intensity)
            cy, cx = props.centroid
            row.update(
                area=int(props.area),
                centroid_x=round(x0 + cx - 1, 3),
                centroid_y=round(y0 + cy - 1, 3),
                perimeter=round(float(props.perimeter), 3),
                eccentricity=round(float(props.eccentricity), 6),
                solidity=round(float(props.solidity), 6),
            )
            if intensity is not None:
                row.update(mean_intensity=float(props.intensity_mean), max_intensity=float(props.intensity_max))
        rows.append(row)
    return rows


class LabelWriter:
    """``predict --labels``: ``OUT/labels/<name>.tif`` per image, ``OUT/measurements.csv`` at the end.

    Args:
        out: the output folder.
        intensities: measure the original image's values under each mask (reads the file
            again; False leaves the two intensity columns empty).
    """

    def __init__(self, out: Path, intensities: bool = True) -> None:
        try:
            import tifffile  # noqa: F401
        except ImportError:
            raise ValueError(_MISSING) from None
        self.out = Path(out)
        self.intensities = intensities
        self.rows: list[dict] = []

    def targets(self, names: list[str]) -> list[Path]:
        return [*(self.out / "labels" / f"{n}.tif" for n in names), self.out / "measurements.csv"]

    @staticmethod
    def ours(path: Path) -> bool:
        """True for a label image or measurements table that ``LabelWriter`` wrote."""
        if path.suffix == ".csv":
            try:
                with open(path, "rb") as f:
                    return f.read(len(_HEADER)) == _HEADER
            except OSError:
                return False
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                return tif.pages[0].software == SOFTWARE
        except (OSError, ValueError, tifffile.TiffFileError, IndexError):
            return False

    def add(self, image_id: int, name: str, path: Path, result: Result) -> None:
        """Write the image's label image now; keep its measurement rows for ``close``."""
        import tifffile

        labels = label_image(result)
        pixels = OriginalPixels(path, result.image_size) if self.intensities and len(result) else None
        try:
            rows = measure(result, labels, pixels)
        finally:
            if pixels is not None:
                pixels.close()
        data = io.BytesIO()  # tifffile wants a named file or a buffer; the compressed labels are small
        tifffile.imwrite(data, labels, compression="zlib", software=SOFTWARE, metadata=None)
        atomic_write(self.out / "labels" / f"{name}.tif", lambda f: f.write(data.getbuffer()))
        self.rows.extend({"image_id": image_id, "image": name, **row} for row in rows)

    def close(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        data = text.getvalue().encode("utf-8")
        atomic_write(self.out / "measurements.csv", lambda f: f.write(data))


_HEADER = (",".join(COLUMNS) + "\n").encode("utf-8")
