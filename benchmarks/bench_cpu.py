"""CPU inference against torchvision and Detectron2: interleaved pairs, medians and ratios.

Runs in the reference environment (torchvision, and Detectron2 from source, importable; our
package from ``src``):

    PYTHONPATH=src:/work/d2src /work/venv-ref/bin/python benchmarks/bench_cpu.py \\
        [--pairs 7] [--threads 2] [--images A.png B.png] [--tv-weights W.pth] [--d2-weights W.pkl] \\
        [--only tv|d2] [--no-fold] [--runtime pytorch|onnxruntime|openvino] [--profile] [--json OUT.json]

Two comparisons, each on the same weights in the reference's own layout:
  ours vs torchvision: ``maskrcnn.load(W.pth).predict(image)`` (resize, network, masks pasted
      and RLE-encoded) against torchvision 0.28's ``maskrcnn_resnet50_fpn`` forward on the same
      float image (masks pasted into the image);
  ours vs Detectron2: ``maskrcnn.load(W.pkl).predict`` against Detectron2's model called as
      ``DefaultPredictor`` calls it (BGR, ``ResizeShortestEdge(800, 1333)``, masks pasted).
Defaults: the R50-FPN parity checkpoints the tests build in ``~/.cache/maskrcnn-tests``
(calibrated to give 100 detections on photo-like images at 800 px) and the fixture images.

Each pair runs both models once on every image, alternating which goes first; the first pair
warms up and is not counted. Per pair: wall-clock and process CPU time (``time.process_time``,
all threads; steadier than wall time on a shared machine). Printed: the medians, the median of
the per-pair ratios ours / reference, the detection counts, the CPU, torch's kernel level
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` select the AVX2 kernels) and the load
average before and after. ``--profile`` adds a ``torch.profiler`` table of one ``predict``;
``--no-fold`` loads our model without BatchNorm folding (``maskrcnn.load(fold_bn=False)``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import maskrcnn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_onnx import cpu_model  # noqa: E402

CACHE = Path.home() / ".cache" / "maskrcnn-tests"
FIXTURE = HERE.parent.parent / "shared" / "fixtures" / "tv_parity"


def cached(pattern: str, what: str) -> Path:
    """The parity checkpoint the tests built (``tests/conftest.py``), else a one-line error."""
    found = sorted(p for p in CACHE.glob(pattern) if "levels" not in p.name)
    if not found:
        raise SystemExit(f"error: no {what} in {CACHE}; run tests/model/test_parity*.py once or pass the file")
    return found[0]


def torchvision_runner(weights: Path) -> Callable[[np.ndarray], int]:
    """torchvision's Mask R-CNN R50-FPN with ``weights``, built as its COCO_V1 loader builds it
    (frozen BatchNorm, eps 0); one call = one forward on a float image, masks pasted."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.models.detection._utils import overwrite_eps

    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    overwrite_eps(model, 0.0)
    model.eval()

    @torch.inference_mode()
    def run(rgb: np.ndarray) -> int:
        image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255  # (3, H, W) in 0..1
        return len(model([image])[0]["boxes"])

    return run


def detectron2_runner(weights: Path) -> Callable[[np.ndarray], int]:
    """Detectron2's R50-FPN (``mask_rcnn_R_50_FPN_3x.yaml``) with ``weights``, fed as
    ``DefaultPredictor`` feeds it; one call = one forward, masks pasted into the image."""
    sys.path.insert(0, str(HERE / "parity"))
    import detectron2.data.transforms as T
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from make_d2_fixture import d2_cfg

    cfg = d2_cfg("r50")
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(weights))
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)

    @torch.inference_mode()
    def run(rgb: np.ndarray) -> int:
        bgr = rgb[:, :, ::-1]
        h, w = bgr.shape[:2]
        image = torch.as_tensor(aug.get_transform(bgr).apply_image(bgr).astype("float32").transpose(2, 0, 1))
        return len(model([{"image": image, "height": h, "width": w}])[0]["instances"])

    return run


def ours_runner(weights: Path, fold_bn: bool, runtime: str = "pytorch") -> Callable[[np.ndarray], int]:
    """Our ``predict`` with the PyTorch model, or with its export run by ONNX Runtime or OpenVINO."""
    if runtime == "pytorch":
        model = maskrcnn.load(weights, fold_bn=fold_bn)
    else:
        import tempfile

        from maskrcnn.weights.export import export

        folder = Path(tempfile.mkdtemp(prefix="bench-cpu-"))  # left for the OS: the runtime maps its files
        suffix = ".onnx" if runtime == "onnxruntime" else ".xml"
        model = maskrcnn.load(export(weights, folder / f"model{suffix}"))

    def run(rgb: np.ndarray) -> int:
        return len(model.predict(rgb, keep_images=False))

    return run


def timed(run: Callable[[np.ndarray], int], images: list[np.ndarray]) -> tuple[float, float, list[int]]:
    """Wall and process-CPU milliseconds of ``run`` on every image, and the detection counts."""
    t, c = time.perf_counter(), time.process_time()
    counts = [run(im) for im in images]
    return (time.perf_counter() - t) * 1000, (time.process_time() - c) * 1000, counts


def compare(name: str, ours: Callable, ref: Callable, images: list[np.ndarray], pairs: int) -> dict[str, Any]:
    """``pairs`` interleaved (ours, reference) pairs after one warm-up pair."""
    rows = []
    for i in range(pairs + 1):
        order = [("ours", ours), (name, ref)] if i % 2 == 0 else [(name, ref), ("ours", ours)]
        row = {who: timed(run, images) for who, run in order}
        if i:
            rows.append(row)
            print(
                f"  pair {i}: ours {row['ours'][0]:7.0f} ms, {name} {row[name][0]:7.0f} ms wall; "
                f"CPU {row['ours'][1]:7.0f} / {row[name][1]:7.0f} ms",
                flush=True,
            )
    out: dict[str, Any] = {
        "reference": name,
        "pairs": pairs,
        "detections": {"ours": rows[0]["ours"][2], name: rows[0][name][2]},
    }
    for k, label in ((0, "wall"), (1, "cpu")):
        out[f"ours_{label}_ms"] = statistics.median(r["ours"][k] for r in rows)
        out[f"{name}_{label}_ms"] = statistics.median(r[name][k] for r in rows)
        out[f"ratio_{label}"] = statistics.median(r["ours"][k] / r[name][k] for r in rows)
    return out


def profile(run: Callable[[np.ndarray], int], image: np.ndarray, rows: int = 25) -> str:
    """torch.profiler's table of one call, by self CPU time, one row per op and input shapes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run(image)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run(image)
    ops = prof.key_averages(group_by_input_shape=True)
    lines = [
        f"{e.self_cpu_time_total / 1000:8.1f} ms {e.count:4d}x  {e.key:36s} {str(e.input_shapes)[:100]}"
        for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:rows]
    ]
    total = sum(e.self_cpu_time_total for e in ops) / 1000
    return "\n".join(["self CPU time of one predict, by op and input shapes:", *lines, f"total {total:.0f} ms"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=7, help="counted pairs (one more warms up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", nargs="+", default=[str(FIXTURE / "image_a.png"), str(FIXTURE / "image_b.png")])
    p.add_argument("--tv-weights", type=Path, default=None, help="torchvision-layout R50-FPN .pth")
    p.add_argument("--d2-weights", type=Path, default=None, help="Detectron2-layout R50-FPN .pkl")
    p.add_argument("--only", choices=("tv", "d2"), default=None)
    p.add_argument("--no-fold", action="store_true", help="our model without BatchNorm folding")
    p.add_argument(
        "--runtime",
        choices=("pytorch", "onnxruntime", "openvino"),
        default="pytorch",
        help="run ours as the PyTorch model or as its export (maskrcnn export: .onnx, or .xml for OpenVINO)",
    )
    p.add_argument("--profile", action="store_true", help="also profile one predict of ours")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = [np.array(Image.open(path).convert("RGB")) for path in args.images]
    info = {
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "torch": torch.__version__,
        "images": args.images,
        "fold_bn": not args.no_fold,
        "runtime": args.runtime,
        "load_before": os.getloadavg()[0],
    }
    print(
        f"CPU: {info['cpu']} ({info['capability']} kernels), {args.threads} threads, torch {torch.__version__}; "
        f"{len(images)} images per run, ours on {args.runtime}, BatchNorm {'folded' if not args.no_fold else 'not folded'}",
        flush=True,
    )
    results = []
    if args.only in (None, "tv"):
        weights = args.tv_weights or cached("tv_parity_r50*.pth", "torchvision-layout parity checkpoint")
        ours = ours_runner(weights, not args.no_fold, args.runtime)
        if args.profile:
            print(profile(ours, images[0]))
        print(f"ours vs torchvision ({weights.name}):", flush=True)
        results.append(compare("torchvision", ours, torchvision_runner(weights), images, args.pairs))
    if args.only in (None, "d2"):
        weights = args.d2_weights or cached("d2_parity_r50*.pkl", "Detectron2-layout parity checkpoint")
        print(f"ours vs Detectron2 ({weights.name}):", flush=True)
        results.append(
            compare(
                "detectron2",
                ours_runner(weights, not args.no_fold, args.runtime),
                detectron2_runner(weights),
                images,
                args.pairs,
            )
        )
    info["load_after"] = os.getloadavg()[0]
    print(f"load average {info['load_before']:.1f} -> {info['load_after']:.1f}")
    for r in results:
        ref = r["reference"]
        print(
            f"{ref:>12}: ours {r['ours_wall_ms']:.0f} ms, {ref} {r[f'{ref}_wall_ms']:.0f} ms wall, ratio {r['ratio_wall']:.2f}; "
            f"CPU {r['ours_cpu_ms']:.0f} / {r[f'{ref}_cpu_ms']:.0f} ms, ratio {r['ratio_cpu']:.2f}; "
            f"detections {r['detections']['ours']} / {r['detections'][ref]}"
        )
    if args.json:
        args.json.write_text(json.dumps({**info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
