"""Time and peak memory of ``maskrcnn predict`` against image size, tiled and not.

    python benchmarks/bench_tiles.py [--weights W.pth] [--sides 1024 4096 10000 20000]
                                     [--tile 1024] [--overlap 0.2] [--max-untiled 10000] [--json FILE]

Each image is the parity fixture's photo (768 x 576, ../shared/fixtures/tv_parity/image_a.png)
repeated at its native resolution over a square canvas of the given side, saved as an
uncompressed TIFF, so every tile holds photo-sized objects. ``maskrcnn predict`` runs on it in a
fresh Python process, once with ``--tile`` and once without (up to ``--max-untiled`` px a side:
an untiled run of a larger image is left out, not tried, on a machine shared with others), and
the process's peak resident set size is read from ``wait4``. With no --weights the parity
checkpoint is used (R50-FPN in torchvision's layout, about 100 detections per photo-sized
input). The aim: a 20000 x 20000 image under 4 GiB peak, its COCO results JSON written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import FIXTURE, parity_checkpoint  # noqa: E402


def make_image(side: int, path: Path) -> None:
    """The fixture photo repeated over a ``side`` x ``side`` canvas, as an uncompressed TIFF."""
    with Image.open(FIXTURE / "image_a.png") as src:
        photo = np.asarray(src.convert("RGB"))  # (576, 768, 3)
    reps = (-(-side // photo.shape[0]), -(-side // photo.shape[1]), 1)
    canvas = np.tile(photo, reps)[:side, :side]  # (side, side, 3)
    Image.fromarray(canvas).save(path)


def measure(weights: Path, image: Path, out: Path, tile: int | None, overlap: float) -> dict:
    """Run ``maskrcnn predict`` in a child process; its peak RSS (MB), wall time and detections."""
    cmd = [
        sys.executable,
        "-m",
        "maskrcnn",
        "predict",
        "--weights",
        str(weights),
        str(image),
        "--out",
        str(out),
        "--quiet",
    ]
    if tile:
        cmd += ["--tile", str(tile), "--tile-overlap", str(overlap)]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not every child's maximum
    seconds = time.perf_counter() - t0
    stdout, stderr = child.stdout.read().decode(), child.stderr.read().decode()  # type: ignore[union-attr]
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"predict failed ({code}) on {image}:\n{stdout}\n{stderr}")
    index = json.loads((out / "images.json").read_text())
    results = out / "predictions.json"
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "seconds": round(seconds, 1),
        "detections": index[0]["detections"],
        "results_json_mb": round(results.stat().st_size / 2**20, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="checkpoint (default: the parity fixture's R50-FPN)")
    p.add_argument("--sides", type=int, nargs="+", default=[1024, 4096, 10000, 20000], help="image sides in pixels")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--overlap", type=float, default=0.2)
    p.add_argument("--max-untiled", type=int, default=10000, help="largest side run untiled")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--make", nargs=2, metavar=("SIDE", "PATH"), help=argparse.SUPPRESS)  # the canvas, then exit
    args = p.parse_args()
    if args.make:
        make_image(int(args.make[0]), Path(args.make[1]))
        return 0
    weights = Path(args.weights) if args.weights else parity_checkpoint()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
            image = Path(tmp) / f"canvas_{side}.tif"
            # In a process of its own: on Linux a child's ru_maxrss starts from the parent's
            # high-water mark (vfork + exec), so a 4 GB canvas built here would show in every run.
            subprocess.run([sys.executable, __file__, "--make", str(side), str(image)], check=True)
            for tile in (None, args.tile):
                row = {"side": side, "tiled": bool(tile)}
                if not tile and side > args.max_untiled:
                    row["skipped"] = f"untiled runs are capped at {args.max_untiled} px a side (--max-untiled)"
                else:
                    row.update(measure(weights, image, Path(tmp) / f"out_{side}_{bool(tile)}", tile, args.overlap))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            image.unlink()
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; tile {args.tile}, overlap {args.overlap}"
    )
    print("| side (px) | mode | detections | peak RSS (MB) | time (s) | predictions.json (MB) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        mode = f"tiles of {args.tile}" if r["tiled"] else "whole image"
        if "skipped" in r:
            print(f"| {r['side']} | {mode} | - | - | - | not run: {r['skipped']} |")
        else:
            print(
                f"| {r['side']} | {mode} | {r['detections']} | {r['peak_rss_mb']} | {r['seconds']} | {r['results_json_mb']} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
