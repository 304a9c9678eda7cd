"""Peak memory of reading a large GeoTIFF tile by tile (``inference.geotiff.RasterioTiles``)
against the raster's own size: the windows keep it to a few tiles.

    python benchmarks/applications/bench_geotiff_windows.py /tmp/big.tif --side 12000 --tile 1024

Writes a 3-band uint8 GeoTIFF of SIDE x SIDE pixels (deflate, 512-px blocks) if the file is
absent, then reads every tile of a ``tile_grid`` with 20% overlap and reports the peak resident
memory of the process before and after.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def write(path: Path, side: int) -> None:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=side,
        width=side,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500_000, 4_650_000, 0.5, 0.5),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
    ) as ds:
        for y in range(0, side, 512):  # strip by strip: the writer never holds the raster either
            h = min(512, side - y)
            ds.write(rng.integers(0, 255, (3, h, side), dtype=np.uint8), window=Window(0, y, side, h))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--side", type=int, default=12000)
    p.add_argument("--tile", type=int, default=1024)
    args = p.parse_args()
    if not args.path.exists():
        write(args.path, args.side)
    from maskrcnn.inference.geotiff import RasterioTiles
    from maskrcnn.inference.tiling import tile_grid

    before = peak_mb()
    start = time.perf_counter()
    with RasterioTiles.open(args.path, None) as source:
        h, w = source.size
        tiles = tile_grid(h, w, args.tile, 0.2)
        checksum = sum(int(source.read(t)[::97, ::89].sum()) for t in tiles)
    seconds = time.perf_counter() - start
    print(
        f"{w} x {h} x 3 raster ({h * w * 3 / 1e6:.0f} MB as uint8), {len(tiles)} tiles of {args.tile}: "
        f"{seconds:.1f} s, peak RSS {before:.0f} MB before reading, {peak_mb():.0f} MB after (checksum {checksum})"
    )


if __name__ == "__main__":
    main()
