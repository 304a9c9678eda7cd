"""OpenVINO against ONNX Runtime and PyTorch on the CPU: the same exported file, image and predict.

    python benchmarks/bench_openvino.py [--weights W.pth] [--onnx model.onnx] [--image IMG] [--runs 7] [--threads N]

The same checkpoint as PyTorch, as its ``maskrcnn export`` ONNX file in ONNX Runtime and as its
``--out model.xml`` export in OpenVINO (``OpenVinoModel``, float32), through the same predict.
Prints the three medians of interleaved runs and how far OpenVINO's detections are from ONNX
Runtime's. Needs ``pip install 'maskrcnn[openvino]'``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import maskrcnn
from maskrcnn.data.images import load_rgb
from maskrcnn.weights.export import export
from maskrcnn.weights.onnx_model import OnnxModel
from maskrcnn.weights.openvino_model import OpenVinoModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import FIXTURE, parity_checkpoint  # noqa: E402
from bench_onnx import cpu_model, timed  # noqa: E402


def agreement(a: Any, b: Any, box_tol: float = 0.05, score_tol: float = 1e-3) -> str:
    """How many of ``b``'s detections one of ``a``'s matches: same label, box within ``box_tol``
    px, score within ``score_tol`` (docs/parity.md's rule; the order of near-equal scores may differ)."""
    boxes_a, boxes_b = np.asarray(a.boxes), np.asarray(b.boxes)
    gap = np.abs(boxes_b[:, None, :] - boxes_a[None, :, :]).max(-1)  # (Nb, Na)
    same = (
        (np.asarray(b.labels)[:, None] == np.asarray(a.labels)[None, :])
        & (gap <= box_tol)
        & (np.abs(np.asarray(b.scores)[:, None] - np.asarray(a.scores)[None, :]) <= score_tol)
    )
    closest = np.where(np.asarray(b.labels)[:, None] == np.asarray(a.labels)[None, :], gap, np.inf).min(1)
    return (
        f"{len(a)} vs {len(b)} detections, {int(same.any(1).sum())} matched (label, box within {box_tol} px, "
        f"score within {score_tol}); largest gap to the closest box of the same label {closest.max():.2e} px"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None)
    p.add_argument("--onnx", default=None, help="an exported file of --weights (default: export one now)")
    p.add_argument("--image", default=str(FIXTURE / "image_a.png"))
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="threads for all three (0: PyTorch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    weights = args.weights or parity_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(args.onnx) if args.onnx else export(weights, Path(tmp) / "model.onnx")
        models = {
            "pytorch": maskrcnn.load(weights),
            "onnxruntime": OnnxModel(onnx_path, threads=threads),
            "openvino": OpenVinoModel(export(weights, Path(tmp) / "model.xml"), threads=threads),  # maskrcnn export
        }
        image = load_rgb(args.image)
        ort_result = models["onnxruntime"].predict(image, keep_images=False)
        ov_result = models["openvino"].predict(image, keep_images=False)
        load_before = os.getloadavg()[0]
        wall: dict[str, list[float]] = {k: [] for k in models}
        cpu: dict[str, list[float]] = {k: [] for k in models}
        for i in range(args.runs + 1):
            for name, model in models.items():
                ms, cpu_ms, _ = timed(model, image)
                if i:  # the first round warms up
                    wall[name].append(ms)
                    cpu[name].append(cpu_ms)
        load_after = os.getloadavg()[0]
    import openvino

    print(f"CPU: {cpu_model()}, {threads} threads; torch {torch.__version__}, openvino {openvino.__version__}")
    print(
        f"image {args.image}, median of {args.runs} interleaved rounds (load average {load_before:.1f} -> {load_after:.1f})"
    )
    med = {k: statistics.median(v) for k, v in wall.items()}
    for name in models:
        print(f"  {name:<12} {med[name]:8.0f} ms wall, {statistics.median(cpu[name]):8.0f} ms CPU")
    print(
        f"  openvino / onnxruntime {med['openvino'] / med['onnxruntime']:.2f}, openvino / pytorch {med['openvino'] / med['pytorch']:.2f}"
    )
    print(f"  openvino against onnxruntime: {agreement(ort_result, ov_result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
