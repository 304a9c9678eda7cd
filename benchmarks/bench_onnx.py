"""ONNX Runtime against PyTorch on the CPU: the same image and checkpoint, end to end.

    python benchmarks/bench_onnx.py [--weights W.pth] [--onnx model.onnx] [--image IMG] [--runs 7] [--threads N]

Each run is ``model.predict(image)`` (resize, network, masks pasted into the image as RLE),
once with the PyTorch model and once with the exported ONNX file, interleaved so that a change
in the machine's load hits both alike; the first pair warms up and is not counted. With no
--weights it uses the parity checkpoint built from ../shared (R50-FPN, 100 detections on the
fixture image); with no --onnx it exports one into a temporary folder first. Both run with the
same number of threads (default: PyTorch's).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import maskrcnn
from maskrcnn.data.images import load_rgb
from maskrcnn.weights.export import export

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import FIXTURE, parity_checkpoint  # noqa: E402


def cpu_model() -> str:
    """The processor's model name, as ``lscpu`` shows it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(model, image) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """Wall-clock and CPU milliseconds (all threads of this process) of one predict, and its
    detection count. On a shared machine the CPU time moves less with the others' load."""
    t, c = time.perf_counter(), time.process_time()
    result = model.predict(image, keep_images=False)
    return (time.perf_counter() - t) * 1000, (time.process_time() - c) * 1000, len(result)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None)
    p.add_argument("--onnx", default=None, help="an exported file of --weights (default: export one now)")
    p.add_argument("--image", default=str(FIXTURE / "image_a.png"))
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="threads for both (0: PyTorch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    weights = args.weights or parity_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(args.onnx) if args.onnx else export(weights, Path(tmp) / "model.onnx")
        ours = maskrcnn.load(weights)
        runtime = maskrcnn.OnnxModel(onnx_path, threads=threads)
        image = load_rgb(args.image)
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
        cpu: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
        counts = {}
        for i in range(args.runs + 1):
            for name, model in (("pytorch", ours), ("onnxruntime", runtime)):
                ms, cpu_ms, counts[name] = timed(model, image)
                if i:  # the first pair warms up
                    times[name].append(ms)
                    cpu[name].append(cpu_ms)
        load_after = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        f"CPU: {cpu_model()}, {threads} threads; torch {torch.__version__}, "
        f"onnxruntime {__import__('onnxruntime').__version__}"
    )
    print(
        f"image {args.image} {image.shape[1]}x{image.shape[0]}, {counts['pytorch']} / {counts['onnxruntime']} "
        f"detections, median of {args.runs} interleaved runs of predict (load average {load_before:.1f} -> {load_after:.1f})"
    )
    for name in times:
        spread = f"{min(times[name]):.0f}-{max(times[name]):.0f}"
        print(f"  {name:<12} {med[name]:8.0f} ms wall (range {spread} ms), {med_cpu[name]:8.0f} ms CPU")
    print(
        f"  onnxruntime / pytorch: {med['onnxruntime'] / med['pytorch']:.2f} wall, "
        f"{med_cpu['onnxruntime'] / med_cpu['pytorch']:.2f} CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
