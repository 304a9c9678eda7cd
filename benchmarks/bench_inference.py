"""Inference speed: per-stage milliseconds (median of several runs) and peak memory.

    python benchmarks/bench_inference.py --weights W.pth [--image IMG] [--runs 5] [--device cpu]

With no --weights it builds the torchvision-format parity checkpoint from ../shared (R50-FPN,
calibrated so an 800-pixel image yields 100 detections, as trained weights do).
Stages: preprocess, backbone (ResNet + FPN), rpn (head + proposal selection), box head
(+ postprocessing), mask head, paste (each mask into its box in the original image, as RLE).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import maskrcnn
from maskrcnn.data.images import load_rgb, to_tensor
from maskrcnn.inference.results import Result
from maskrcnn.model.transform import to_original_frame

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "tv_parity"


def parity_checkpoint() -> Path:
    path = Path.home() / ".cache" / "maskrcnn-tests" / "tv_parity_r50.pth"
    if not path.exists():
        spec = importlib.util.spec_from_file_location("weights_rule", FIXTURE / "weights_rule.py")
        rule = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rule)  # type: ignore[union-attr]
        path.parent.mkdir(parents=True, exist_ok=True)
        rule.write_checkpoint(str(path), FIXTURE)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_once(model: maskrcnn.MaskRCNN, image: torch.Tensor) -> tuple[dict[str, float], int]:
    device = model.device
    times: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        sync(device)
        t1 = time.perf_counter()
        times[name] = (t1 - t0) * 1000
        return t1

    sync(device)
    t = time.perf_counter()
    batch, _ = model.preprocess([image])
    t = lap("preprocess", t)
    feats = model.backbone(batch.tensors)
    t = lap("backbone", t)
    proposals, _ = model.rpn(batch, feats)
    t = lap("rpn", t)
    heads = model.roi_heads
    logits, deltas = heads.box_outputs(feats[:-1], proposals, batch.image_sizes)
    dets = heads.postprocess(logits, deltas, proposals, batch.image_sizes)
    t = lap("box_head", t)
    mask_logits = heads.mask_logits(feats[:-1], [d.boxes for d in dets], batch.image_sizes)
    labels = torch.cat([d.labels for d in dets])
    probs = mask_logits[torch.arange(len(labels), device=device), labels].sigmoid()
    dets[0].masks = probs
    t = lap("mask_head", t)
    final = to_original_frame(dets, batch)
    Result.from_detections(final[0], batch.original_sizes[0], mask_thresh=0.5)  # paste box by box, RLE
    lap("paste", t)
    times["total"] = sum(times.values())
    return times, len(final[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None)
    p.add_argument("--image", default=str(FIXTURE / "image_a.png"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = maskrcnn.load(args.weights or parity_checkpoint(), device=device)
    image = to_tensor(load_rgb(args.image)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [run_once(model, image) for _ in range(args.runs + 1)][1:]  # first run warms up
    stages = runs[0][0].keys()
    med = {s: statistics.median(r[0][s] for r in runs) for s in stages}
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "image": args.image,
        "size_hw": list(image.shape[-2:]),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "detections": runs[0][1],
        "runs": args.runs,
        "median_ms": {k: round(v, 1) for k, v in med.items()},
        "peak_rss_mb": round(peak_rss_mb),
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(
        f"image {out['size_hw']} on {device} ({out['threads']} threads), {out['detections']} detections, median of {args.runs} runs"
    )
    for k, v in out["median_ms"].items():
        print(f"  {k:<11} {v:9.1f} ms")
    print(
        f"  peak RSS    {out['peak_rss_mb']:9d} MB"
        + (f", peak CUDA {out['peak_cuda_mb']} MB" if "peak_cuda_mb" in out else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
