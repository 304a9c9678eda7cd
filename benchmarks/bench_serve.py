"""Load test of ``maskrcnn serve`` on 127.0.0.1: N concurrent clients for a while, against
one-at-a-time ``model.predict`` in one process.

    python benchmarks/bench_serve.py [--weights W] [--clients 8] [--seconds 120] [--image IMG]

Starts ``maskrcnn serve`` as a subprocess (default weights: a tiny R18 model with random
weights, written to a temp folder), sends the image from ``--clients`` threads as fast as
answers come back, and reports: requests, errors, p50 / p95 latency, throughput, and the
server's resident memory sampled every second (first and last 10 % of the run, the peak of
each quarter, and the overall peak: flat means no leak). The baseline runs ``model.predict`` on the same image back to back
for the same number of images, in this process, with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# R18-FPN at 320 px with random weights; score_thresh 0 keeps all 100 detections (masks pasted
# and encoded, as a trained model's), so the answer is as heavy as a busy real image's.
TINY = [
    "num_classes=3",
    "class_names=[circle,square,triangle]",
    "backbone.name=resnet18",
    "backbone.fpn_channels=64",
    "transform.min_size=[320]",
    "transform.max_size=512",
    "rpn.post_nms_top_n_test=300",
    "roi_heads.representation_size=256",
    "roi_heads.mask_channels=[64,64]",
    "roi_heads.score_thresh=0.0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None)
    p.add_argument("--image", default=None, help="default: a 480x640 random image")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--max-batch", type=int, default=4)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    import maskrcnn
    from maskrcnn.config import ModelConfig, apply_overrides

    weights = args.weights
    if weights is None:
        weights = str(tmp / "tiny.pth")
        maskrcnn.save_checkpoint(weights, maskrcnn.build_model(apply_overrides(ModelConfig(), TINY)))
    image = Path(args.image) if args.image else tmp / "image.png"
    if not args.image:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(image)
    data = image.read_bytes()

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "maskrcnn.cli",
            "serve",
            "--weights",
            weights,
            "--port",
            str(port),
            "--max-batch",
            str(args.max_batch),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                requests.get(f"{url}/health", timeout=1).raise_for_status()
                break
            except requests.RequestException:
                time.sleep(0.1)
        requests.post(f"{url}/predict", data=data, headers={"Content-Type": "image/png"}).raise_for_status()  # warm-up

        latencies: list[float] = []
        errors: list[str] = []
        memory: list[float] = []
        stop = time.monotonic() + args.seconds
        lock = threading.Lock()

        def client() -> None:
            session = requests.Session()
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = session.post(f"{url}/predict", data=data, headers={"Content-Type": "image/png"}, timeout=120)
                    ok = r.status_code == 200 and "results" in r.json()
                    problem = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except requests.RequestException as e:
                    problem = str(e)
                with lock:
                    (errors.append(problem) if problem else latencies.append(time.perf_counter() - t0))

        def sample() -> None:
            while time.monotonic() < stop:
                memory.append(rss_mb(server.pid))
                time.sleep(1.0)

        threads = [threading.Thread(target=client) for _ in range(args.clients)] + [threading.Thread(target=sample)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        health = requests.get(f"{url}/health").json()
    finally:
        server.terminate()
        server.wait(timeout=30)

    model = maskrcnn.load(weights)
    n = max(1, min(len(latencies), 200))
    model.predict(str(image))  # warm-up
    single = []
    for _ in range(n):
        t = time.perf_counter()
        model.predict(str(image))
        single.append(time.perf_counter() - t)

    tenth = max(1, len(memory) // 10)
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    report = {
        "clients": args.clients,
        "seconds": round(wall, 1),
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "server_batches": health["batches"],
        "server_images": health["images"],
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(q[18], 3),
        "throughput_img_s": round(len(latencies) / wall, 2),
        "rss_mb_first10pct": round(statistics.mean(memory[:tenth]), 1),
        "rss_mb_last10pct": round(statistics.mean(memory[-tenth:]), 1),
        "rss_mb_by_quarter": [
            round(max(memory[i * len(memory) // 4 : (i + 1) * len(memory) // 4] or [0]), 1) for i in range(4)
        ],
        "rss_mb_peak": round(max(memory), 1),
        "predict_one_at_a_time": {
            "images": n,
            "latency_p50_s": round(statistics.median(single), 3),
            "throughput_img_s": round(n / sum(single), 2),
        },
        "torch_threads": __import__("torch").get_num_threads(),
    }
    print(json.dumps(report, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
