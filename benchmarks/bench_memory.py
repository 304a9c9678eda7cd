"""Peak memory of ``maskrcnn predict`` against image size: one subprocess per size.

    python benchmarks/bench_memory.py [--weights W.pth] [--sizes 0.4 12 24] [--json FILE]

Each size is the parity fixture's photo (768x576, ../shared/fixtures/tv_parity/image_a.png)
upscaled to about that many megapixels and saved as a JPEG; ``maskrcnn predict`` then runs on
it in a fresh Python process (overlay, results JSON and all) and the process's peak resident
set size is read from ``wait4``. With no --weights the parity checkpoint is used (R50-FPN
in torchvision's layout, calibrated to give about 100 detections on such photos), so the
detections scale with the image as real ones do. The aim: a 24 MP photo within 1.5x of a
0.4 MP one, i.e. no memory that grows with detections x pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import FIXTURE, parity_checkpoint  # noqa: E402


def make_image(megapixels: float, path: Path) -> tuple[int, int]:
    """The fixture photo resized (bicubic) to about ``megapixels``; returns (h, w)."""
    with Image.open(FIXTURE / "image_a.png") as src:
        w0, h0 = src.size
        scale = math.sqrt(megapixels * 1e6 / (w0 * h0))
        size = (w0, h0) if abs(scale - 1) < 0.1 else (round(w0 * scale), round(h0 * scale))
        src.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(path, quality=95)
    return size[1], size[0]


def measure(weights: Path, image: Path, out: Path, threads: int) -> dict:
    """Run ``maskrcnn predict`` in a child process; its peak RSS (MB), wall time and detections."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)
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
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not every child's maximum
    seconds = time.perf_counter() - t0
    stdout, stderr = child.stdout.read().decode(), child.stderr.read().decode()  # type: ignore[union-attr]
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"predict failed ({child.returncode}) on {image}:\n{stdout}\n{stderr}")
    index = json.loads((out / "images.json").read_text())
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "seconds": round(seconds, 1),
        "detections": index[0]["detections"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="checkpoint (default: the parity fixture's R50-FPN)")
    p.add_argument("--sizes", type=float, nargs="+", default=[0.4, 12, 24], help="megapixels")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the children (0 = default)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    weights = Path(args.weights) if args.weights else parity_checkpoint()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mp in args.sizes:
            image = Path(tmp) / f"photo_{mp:g}mp.jpg"
            h, w = make_image(mp, image)
            row = {
                "megapixels": round(h * w / 1e6, 2),
                "size_hw": [h, w],
                **measure(weights, image, Path(tmp) / f"out_{mp:g}", args.threads),
            }
            rows.append(row)
            print(
                f"{row['megapixels']:>6.2f} MP  {h}x{w}: peak RSS {row['peak_rss_mb']} MB, {row['detections']} detections, {row['seconds']} s",
                file=sys.stderr,
            )
    base = rows[0]["peak_rss_mb"]
    print("| image | pixels (h x w) | detections | peak RSS (MB) | vs first | time (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['megapixels']:.1f} MP | {r['size_hw'][0]} x {r['size_hw'][1]} | {r['detections']} | {r['peak_rss_mb']} | {r['peak_rss_mb'] / base:.2f}x | {r['seconds']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
