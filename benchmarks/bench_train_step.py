"""Training-step speed: forward + backward + SGD step of R50-FPN Mask R-CNN on a fixed batch.

    python benchmarks/bench_train_step.py [--images 2] [--size 512] [--runs 5] [--amp auto|fp32|bf16]

The setting torchvision was measured in: 2 images of 512x512 resized to 512 (min_size 512),
frozen BatchNorm, the 3 top ResNet stages trainable, 91 class slots, a few objects per
image with masks. Reports the median step time and its parts, and the CPU it ran on (with
``--amp auto``, what ``maskrcnn.precision`` picks there).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import maskrcnn
from maskrcnn import precision
from maskrcnn.config import ModelConfig, apply_overrides
from maskrcnn.model.fuse import fold_batchnorm
from maskrcnn.structures import Targets


def make_batch(n: int, size: int, objects: int = 5, seed: int = 0) -> tuple[list[torch.Tensor], list[Targets]]:
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g)
        boxes, masks = [], torch.zeros(objects, size, size, dtype=torch.uint8)
        for k in range(objects):
            x1, y1 = torch.randint(0, size - 96, (2,), generator=g).tolist()
            w, h = torch.randint(24, 96, (2,), generator=g).tolist()
            boxes.append([x1, y1, x1 + w, y1 + h])
            masks[k, y1 : y1 + h, x1 : x1 + w] = 1
            img[:, y1 : y1 + h, x1 : x1 + w] = torch.rand(3, 1, 1, generator=g)
        targets.append(
            Targets(torch.tensor(boxes, dtype=torch.float32), torch.randint(1, 91, (objects,), generator=g), masks)
        )
        images.append(img)
    return images, targets


def torchvision_step(images: list[torch.Tensor], targets: list[Targets], size: int, amp: str):  # type: ignore[no-untyped-def]
    """One training step of torchvision's Mask R-CNN as ``references/detection/train.py`` runs it."""
    from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    model = TorchvisionMaskRCNN(backbone, num_classes=91, min_size=size, max_size=size).train()
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3, momentum=0.9, weight_decay=1e-4)
    tv_targets = [{"boxes": t.boxes, "labels": t.labels, "masks": t.masks} for t in targets]

    def step() -> None:
        with precision.autocast("cpu", amp):
            loss = sum(model(images, tv_targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--amp", default="fp32", choices=["auto", "fp32", "bf16"], help="autocast on the CPU (default fp32)")
    p.add_argument("--json", default=None)
    p.add_argument("--torchvision", action="store_true", help="also time torchvision's step, interleaved")
    args = p.parse_args()
    amp = precision.resolve(args.amp, "cpu")
    torch.manual_seed(0)
    cfg = apply_overrides(ModelConfig(), [f"transform.min_size=[{args.size}]", f"transform.max_size={args.size}"])
    model = maskrcnn.build_model(cfg).train()
    fold_batchnorm(model)  # as the trainer does
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    images, targets = make_batch(args.images, args.size)
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "step": [], "total": []}
    tv_step = torchvision_step(images, targets, args.size, amp) if args.torchvision else None
    ratios: dict[str, list[float]] = {"wall": [], "cpu": []}
    for i in range(args.runs + 1):
        c0 = time.process_time()
        t0 = time.perf_counter()
        with precision.autocast("cpu", amp):
            loss = model(images, targets).total_loss
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        c3 = time.process_time()
        if tv_step is not None:
            tv_step()
            t4, c4 = time.perf_counter(), time.process_time()
            if i:
                ratios["wall"].append((t3 - t0) / (t4 - t3))
                ratios["cpu"].append((c3 - c0) / (c4 - c3))
        if i:  # the first step warms up allocators and kernels
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                parts[k].append(v * 1000)
    med = {k: round(statistics.median(v), 1) for k, v in parts.items()}
    out = {
        "images": args.images,
        "size": args.size,
        "amp": amp,
        "cpu": cpu_model(),
        "kernels": precision.describe("cpu"),
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "median_ms": med,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(f"train step, {args.images} images {args.size}px, {amp}, {out['threads']} threads, median of {args.runs}")
    print(f"  on {out['cpu']}, kernels {out['kernels']}")
    for k, v in med.items():
        print(f"  {k:<9} {v:9.1f} ms")
    print(f"  peak RSS  {out['peak_rss_mb']:9d} MB")
    if tv_step is not None:
        out["ratio_to_torchvision"] = {k: round(statistics.median(v), 3) for k, v in ratios.items()}
        print(
            f"  ours / torchvision, median of per-step ratios: {out['ratio_to_torchvision']['wall']:.2f} wall, "
            f"{out['ratio_to_torchvision']['cpu']:.2f} CPU"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
