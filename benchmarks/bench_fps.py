"""Frames per second of R50-FPN at 800, 640 and 512 px short side (PyTorch and ONNX Runtime),
and the mask AP each size costs.

    python benchmarks/bench_fps.py [--accuracy-weights runs/demo/best.pth] [--threads 2] [--json FILE]

Speed: each frame is ``model.predict(photo)`` as ``predict_video`` runs it (resize, network,
masks pasted as RLE), on real photos (``--images``, default the first three kudzu_bug photos
of ../shared), after one warm-up frame per size and runtime; PyTorch and ONNX Runtime are
interleaved so that the machine's load hits both alike; PyTorch in bf16 too where the CPU
has it natively (AVX512-BF16, AMX). Weights (``--weights``): torchvision's
COCO R50-FPN from the download cache (``maskrcnn download``) when it is there, else the parity
checkpoint of ``bench_inference`` (the same R50-FPN, calibrated to give a trained model's 100
detections at 800 px: the same work per frame). The ONNX file is exported from them once
(``--onnx`` to reuse one). With CUDA available the PyTorch model is also timed on the GPU.

Accuracy: mask AP on the val split of the built-in shapes dataset of ``--accuracy-weights``,
a model trained with ``maskrcnn demo`` (128 px short side), at its own size and at 0.8x and
0.64x of it: the ratios of 640 and 512 to 800. A COCO model's AP needs COCO val images, which
this benchmark does not assume (the lead can add them with ``--coco-val``, images and JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import maskrcnn
from maskrcnn.data.images import load_rgb
from maskrcnn.inference.input_size import with_input_size
from maskrcnn.weights.download import cache_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import parity_checkpoint
from bench_onnx import cpu_model

REPO = Path(__file__).resolve().parents[1]
KUDZU = REPO.parent / "shared" / "data" / "kudzu_bug"
SIZES = (800, 640, 512)
COCO_R50 = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"


def default_weights() -> tuple[Path, str]:
    coco = cache_dir() / COCO_R50
    if coco.is_file():
        return coco, "torchvision COCO R50-FPN"
    return parity_checkpoint(), "R50-FPN parity checkpoint (COCO layout, calibrated weights: COCO's file is not cached)"


def frame_ms(model, image, precision: str = "fp32") -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """Wall and CPU milliseconds (all threads of this process) of one ``predict``, and its
    detection count. On a shared machine the CPU time moves less with the others' load."""
    t, c = time.perf_counter(), time.process_time()
    result = model.predict(image, keep_images=False, precision=precision)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1000, (time.process_time() - c) * 1000, len(result)


def default_runtimes() -> list[str]:
    """PyTorch and ONNX Runtime; PyTorch in bf16 where the CPU has it natively; on CUDA if there."""
    from maskrcnn.precision import cpu_has_native_bf16

    return [
        "pytorch",
        "onnxruntime",
        *(["pytorch-bf16"] if cpu_has_native_bf16() else []),
        *(["pytorch-cuda"] if torch.cuda.is_available() else []),
    ]


def build(name: str, weights: Path, onnx_path: Path | None, threads: int, heads: dict):  # type: ignore[no-untyped-def]
    """(model, precision) of a runtime name; ``heads``: RoI head overrides (the ONNX file has them)."""
    if name == "onnxruntime":
        return maskrcnn.OnnxModel(onnx_path, threads=threads), "fp32"
    return maskrcnn.load(
        weights, device="cuda" if name == "pytorch-cuda" else "cpu", **heads
    ), "bf16" if name == "pytorch-bf16" else "fp32"


def speed(
    weights: Path,
    onnx_path: Path | None,
    images: list,
    threads: int,
    sizes: tuple[int, ...],
    names: list[str],
    heads: dict,
) -> list[dict]:
    """One row per size and runtime: median ms per frame, fps, detections per frame."""
    runtimes = {name: build(name, weights, onnx_path, threads, heads) for name in names}
    rows = []
    for size in sizes:
        times: dict[str, list[float]] = {k: [] for k in runtimes}
        cpu: dict[str, list[float]] = {k: [] for k in runtimes}
        found: dict[str, list[int]] = {k: [] for k in runtimes}
        for model, precision in runtimes.values():
            with_input_size(model, size)
            frame_ms(model, images[0], precision)  # warm-up: allocator and kernels at this size
        for image in images:
            for name, (model, precision) in runtimes.items():
                ms, cpu_ms, n = frame_ms(model, image, precision)
                times[name].append(ms)
                cpu[name].append(cpu_ms)
                found[name].append(n)
        for name in runtimes:
            med = statistics.median(times[name])
            cpu_med = statistics.median(cpu[name])
            rows.append(
                {
                    "size": size,
                    "runtime": name,
                    "ms": round(med),
                    "fps": round(1000 / med, 2),
                    "cpu_ms": round(cpu_med),
                    "range_ms": [round(min(times[name])), round(max(times[name]))],
                    "detections": round(statistics.mean(found[name]), 1),
                }
            )
            print(
                f"  {size:4d} px  {name:<12} {med:7.0f} ms/frame  {1000 / med:5.2f} fps  {cpu_med:7.0f} CPU ms  "
                f"({rows[-1]['detections']:.0f} detections)",
                flush=True,
            )
    return rows


def accuracy(weights: Path, work: Path, ratios: tuple[float, ...], coco_val: tuple[str, str] | None) -> list[dict]:
    """Mask and box AP of ``weights`` at its own short side times each ratio."""
    from pycocotools.coco import COCO

    from maskrcnn.data.synthetic import ensure_dataset
    from maskrcnn.evaluation.coco import coco_evaluate, coco_results
    from maskrcnn.train.config import load_training_config

    model = maskrcnn.load(weights)
    if coco_val is not None:
        images, ann = coco_val
    else:  # the demo's val split, generated as ``maskrcnn demo`` generates it
        d = load_training_config("demo_shapes").data
        split = ensure_dataset(
            d.synthetic,
            work / "shapes",
            num_train=d.synthetic_train,
            num_val=d.synthetic_val,
            image_size=tuple(d.synthetic_size),
        )["val"]
        images, ann = str(split.image_dir), str(split.ann_file)
    native = max(model.config.transform.min_size)
    rows = []
    for ratio in ratios:
        size = max(32, round(native * ratio))
        with_input_size(model, size)
        gt = COCO(ann)
        metrics = coco_evaluate(gt, coco_results(model, gt, images))
        rows.append(
            {
                "ratio": ratio,
                "size": size,
                "segm_AP": round(metrics["segm"]["AP"], 3),
                "bbox_AP": round(metrics["bbox"]["AP"], 3),
            }
        )
        print(
            f"  {ratio:.2f} x {native} = {size:4d} px  mask AP {rows[-1]['segm_AP']:.3f}  box AP {rows[-1]['bbox_AP']:.3f}",
            flush=True,
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="an R50-FPN checkpoint (default: see above)")
    p.add_argument("--onnx", default=None, help="an export of --weights (default: export one now)")
    p.add_argument("--images", nargs="*", default=None, help="photos to time (default: 3 kudzu_bug photos)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both runtimes (default 2)")
    p.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    p.add_argument(
        "--runtimes",
        nargs="*",
        default=None,
        choices=["pytorch", "onnxruntime", "pytorch-bf16", "pytorch-cuda"],
        help="default: pytorch, onnxruntime, pytorch-bf16 on a CPU with native bf16, pytorch-cuda with a GPU",
    )
    p.add_argument(
        "--accuracy-weights", default="runs/demo/best.pth", help="a trained model for the AP column; none: no AP column"
    )
    p.add_argument(
        "--coco-val",
        nargs=2,
        default=None,
        metavar=("IMAGES", "JSON"),
        help="evaluate --accuracy-weights on this COCO set instead of the demo's val split",
    )
    p.add_argument(
        "--max-detections",
        type=int,
        default=None,
        help="roi_heads.detections_per_img (default the model's, 100): the mask head's work",
    )
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    weights, what = (Path(args.weights), args.weights) if args.weights else default_weights()
    paths = args.images or sorted(str(f) for f in (KUDZU / "images").glob("*.jpg"))[:3]
    images = [load_rgb(f) for f in paths]
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    print(
        f"CPU: {cpu_model()}, {args.threads} threads, load average {load_before:.1f}; torch {torch.__version__}, "
        f"onnxruntime {__import__('onnxruntime').__version__}"
        + (f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    print(
        f"weights: {weights} ({what}), detections per frame at most {args.max_detections or 'the model default'}; "
        f"{len(images)} photos {images[0].shape[1]}x{images[0].shape[0]}: " + ", ".join(Path(f).name for f in paths),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        names = args.runtimes or default_runtimes()
        heads = {"detections_per_img": args.max_detections} if args.max_detections else {}
        onnx_path = None
        if args.onnx:
            onnx_path = Path(args.onnx)
        elif "onnxruntime" in names:
            from maskrcnn.weights.export import export_model

            t = time.monotonic()
            onnx_path = export_model(maskrcnn.load(weights, **heads), Path(tmp) / "model.onnx")
            print(f"exported to ONNX in {time.monotonic() - t:.0f} s", flush=True)
        rows = speed(weights, onnx_path, images, args.threads, tuple(args.sizes), names, heads)
        acc = []
        if args.accuracy_weights == "none":
            print("no accuracy column (--accuracy-weights none)")
        elif Path(args.accuracy_weights).is_file():
            print(f"mask AP of {args.accuracy_weights}:", flush=True)
            ratios = tuple(s / args.sizes[0] for s in args.sizes)
            acc = accuracy(Path(args.accuracy_weights), Path(tmp), ratios, args.coco_val)
        else:
            print(f"no accuracy column: {args.accuracy_weights} not found (make one with `maskrcnn demo`)")
    out = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "max_detections": args.max_detections,
        "load_average": [load_before, os.getloadavg()[0]],
        "weights": str(weights),
        "photos": paths,
        "speed": rows,
        "accuracy": acc,
        "seconds": round(time.monotonic() - started),
    }
    print(f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; {out['seconds']} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
