"""GeoTIFF inputs: read window by window for tiling, and where their pixels lie on the map.

An aerial or satellite GeoTIFF can be tens of gigapixels; Pillow would decode it whole (and
cannot read many of them: 4-band, 16-bit, tiled and compressed files). ``RasterioTiles`` is a
tiling source (``tiling.predict_tiled``'s ``read(tile)``) backed by rasterio windows: each
tile, preview strip and percentile sample is read on its own, so memory holds a batch of
tiles, never the raster. ``maskrcnn predict --tile`` uses it for every georeferenced TIFF;
without ``--tile`` a georeferenced TIFF is read whole, by Pillow, like any image.

Bands: 1, 2, 3 as R, G, B when the raster has three or more (a 4th band, near infrared or
alpha, is not seen by an RGB model), else band 1 as gray. Values become 8-bit by
``data.images.to_rgb``'s rule (16-bit divided by 257, wider data scaled by the raster's own
maximum), or by the model's percentiles (``data.normalize``), over the whole raster alike.

Georeference: ``georeference(path)`` gives the raster's CRS and affine transform, which map
pixel-edge coordinates (pixel (0, 0) covers [0, 1] x [0, 1], ``polygons``' convention) to
map coordinates: x_map = a x + b y + c, y_map = d x + e y + f.

Shape shorthand: H x W raster, C bands, h x w window.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.errors import DatasetError
from ..data.images import _pillow_limit_off, to_rgb
from ..data.normalize import strip_range
from .tiling import PREVIEW_STRIP, Tile

# TIFF tags that georeference a file (GeoTIFF 1.1): pixel scale, tie points, transformation, GeoKeys.
_GEO_TAGS = (33550, 33922, 34264, 34735)
_MISSING = "reading GeoTIFFs needs rasterio: pip install 'maskrcnn[geo]'"
GDAL_CACHE_MB = 128  # GDAL's block cache while a raster is read (a row of 1024-px tiles of a 40000-px wide RGB raster)


def _rasterio() -> Any:
    try:
        import rasterio
    except ImportError:
        raise ValueError(_MISSING) from None
    return rasterio


def is_georeferenced(path: str | Path) -> bool:
    """True for a TIFF file that names a CRS or maps its pixels by a transform (header only).

    Read by rasterio (GDAL: BigTIFF, every compression); without it, by Pillow's TIFF tags.

    Raises:
        ValueError: the file is georeferenced but rasterio is not installed (its map position
            would otherwise be dropped without a word).
    """
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        rasterio = _rasterio()
    except ValueError:
        try:
            with _pillow_limit_off(), Image.open(path) as img:
                tags = getattr(img, "tag_v2", {})
                if any(t in tags for t in _GEO_TAGS):
                    raise ValueError(_MISSING) from None
        except (OSError, SyntaxError):  # not a TIFF Pillow reads: not one we can place on a map
            pass
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as ds:
                return ds.crs is not None or not ds.transform.is_identity
        except rasterio.errors.RasterioIOError:  # the image reader reports what is wrong with it
            return False


@dataclass(frozen=True)
class Georeference:
    """Where a raster's pixels lie on the map.

    crs: the coordinate reference system named in the file ("EPSG:32633", or WKT when it has
        no EPSG code), or None when the file names none.
    transform: (a, b, c, d, e, f) of x_map = a x + b y + c, y_map = d x + e y + f, for x, y
        pixel-edge coordinates.
    """

    crs: str | None
    transform: tuple[float, float, float, float, float, float]

    def crs_urn(self) -> str | None:
        """The OGC URN of an EPSG CRS ("urn:ogc:def:crs:EPSG::32633"), as GDAL, QGIS and old
        GeoJSON readers take it; otherwise the CRS text itself."""
        if self.crs and self.crs.startswith("EPSG:"):
            return f"urn:ogc:def:crs:EPSG::{self.crs[5:]}"
        return self.crs


def georeference(path: str | Path) -> Georeference | None:
    """The CRS and transform of a georeferenced TIFF, None for any other image (pixel coordinates)."""
    if not is_georeferenced(path):
        return None
    with _open_raster(path) as ds:
        t = ds.transform
        if ds.crs is None and t.is_identity:
            return None
        crs = None
        if ds.crs is not None:
            epsg = ds.crs.to_epsg()
            crs = f"EPSG:{epsg}" if epsg else ds.crs.to_wkt()
        return Georeference(crs, (t.a, t.b, t.c, t.d, t.e, t.f))


@contextlib.contextmanager
def _open_raster(path: str | Path) -> Iterator[Any]:
    """``rasterio.open`` for reading, its errors as one-line DatasetErrors naming the file.

    GDAL keeps decoded blocks in a cache of 5% of the machine's memory by default: reading a
    12000 x 12000 RGB raster tile by tile grew the process by 440 MB, the raster's own size.
    ``GDAL_CACHEMAX`` bounds it to a row of tiles, enough to reuse the blocks neighbours share.
    """
    rasterio = _rasterio()
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                ds = rasterio.open(path)
        except rasterio.errors.RasterioIOError as e:
            raise DatasetError(f"cannot read GeoTIFF {path}: {e}") from None
        with ds:
            yield ds


class RasterioTiles:
    """A tiling source reading each tile as a rasterio window of an open dataset.

    Args:
        dataset: an open rasterio dataset (or anything with its ``count``, ``height``,
            ``width``, ``dtypes`` and ``read(indexes, window=)``).
        percentiles: the model's (low, high) (``data.normalize``), or None.
    """

    def __init__(self, dataset: Any, percentiles: tuple[float, float] | None = None) -> None:
        self.dataset = dataset
        self.size = (int(dataset.height), int(dataset.width))
        self.bands = [1, 2, 3] if dataset.count >= 3 else [1]
        # Wide data (32-bit, floats) is scaled by the raster's own maximum, as tiling's Pillow
        # source does: found strip by strip, only when needed.
        wide = np.dtype(dataset.dtypes[0]) not in (np.uint8, np.uint16, np.int16)
        self.peak = max(float(np.nan_to_num(self._strip(y0, y1)).max()) for y0, y1 in self._strips()) if wide else None
        self.value_range = None if percentiles is None else strip_range(self._strip, *self.size, percentiles)

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, path: str | Path, max_pixels: int | None, percentiles: tuple[float, float] | None = None
    ) -> Iterator[RasterioTiles]:
        """The source of a GeoTIFF file, refused above ``max_pixels`` before any pixel is read."""
        with _open_raster(path) as ds:
            if max_pixels is not None and ds.width * ds.height > max_pixels:
                raise DatasetError(
                    f"image {path} is {ds.width}x{ds.height} = {ds.width * ds.height:,} pixels, "
                    f"more than the limit of {max_pixels:,} (raise it with --max-pixels)"
                )
            yield cls(ds, percentiles)

    def _window(self, box: Tile) -> np.ndarray:
        """The selected bands of ``box``: (h, w, C) values in the raster's dtype."""
        from rasterio.windows import Window

        data = self.dataset.read(
            self.bands, window=Window(box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0)
        )  # (C, h, w)
        return np.moveaxis(data, 0, -1)  # (h, w, C)

    def _strip(self, y0: int, y1: int) -> np.ndarray:
        values = self._window(Tile(0, y0, self.size[1], y1))
        return values[:, :, 0] if values.shape[2] == 1 else values

    def _strips(self) -> Iterator[tuple[int, int]]:
        for y in range(0, self.size[0], PREVIEW_STRIP):
            yield y, min(y + PREVIEW_STRIP, self.size[0])

    def read(self, box: Tile) -> np.ndarray:
        """The tile as (h, w, 3) uint8 RGB."""
        values = self._window(box)
        values = values[:, :, 0] if values.shape[2] == 1 else values
        if self.value_range is not None:
            return to_rgb(values, value_range=self.value_range)
        return to_rgb(values, peak=self.peak)  # 8 and 16 bits by their fixed rule, wider by the raster's peak

    def box_values(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """The original values of a box, (h, w) for one band or (h, w, C): for measurements."""
        values = self._window(Tile(x0, y0, x0 + w, y0 + h))
        return values[:, :, 0] if values.shape[2] == 1 else values
