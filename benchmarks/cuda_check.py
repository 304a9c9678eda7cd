"""One-shot device check: tests, torchvision parity, inference and training speed, in one run.

    python benchmarks/cuda_check.py --device cuda --fixtures .devcarry/tv_parity --out OUT [--quick]
    python benchmarks/cuda_check.py --device cpu --fixtures ../shared/fixtures/tv_parity --out /tmp/cc --quick

Written for a borrowed GPU with a hard time limit: every section runs in its own process with
its own time budget (a crash, a poisoned CUDA context or a hang costs that section only), and
results are written as they come. OUT receives at most four files:

    cuda_check.log      everything printed, sections' output included, with timestamps
    results.json        env + one entry per section: status, seconds, numbers (rewritten as
                        each section ends; a section writes its partial numbers as it goes)
    junit_device.xml    pytest on the device-parametrised tests (``-k DEVICE``)
    junit_rest.xml      the rest of the suite on the same machine, if time remains

Sections, in order:
    pytest      the tests parametrised on DEVICE: ops (values and gradients), the parity
                fixture stage by stage, a training step, resume, bf16/fp16 autocast training
    parity      the model on DEVICE against the fixture's final detections with the fixture's
                tolerances, in float32 and (CUDA) with PyTorch's default TF32 convolutions
    inference   images/s and peak memory, R50-FPN with the parity checkpoint at 800 px: our
                forward (masks pasted) and ``predict`` (``Result`` objects), batch 1 and 8,
                fp32 / fp32 without TF32 / bf16 / fp16 autocast; torchvision's Mask R-CNN with
                the same weights, interleaved; AMP's drift from fp32 (ours and torchvision's);
                per-stage times; NMS block sizes; NCHW vs NHWC; frozen BN returning bf16/fp16
    training    images/s and peak memory of SGD steps (frozen BN, 3 trainable stages as
                coco_r50), 2 and 8 images of 800 px with synthetic targets, fp32 / bf16 /
                fp16 with a gradient scaler, as ``Trainer.step`` does them; bf16 once more
                with frozen BN returning bf16
    pytest_rest the rest of the suite (CPU tests; ``device=auto`` picks the GPU there)

``--quick`` shrinks everything (320 px images, 100 proposals, 20 detections, batches 1-2, one
timed run, fewer tests) into a smoke test of every section: about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's package, not an installed one

SECTIONS = ("pytest", "parity", "inference", "training", "pytest_rest")
# Seconds each section may take at most (full run, quick run). The whole run also has --budget.
CAPS = {
    "pytest": (150, 150),
    "parity": (60, 90),
    "inference": (150, 150),
    "training": (120, 120),
    "pytest_rest": (120, 60),
}
FLOOR = 40  # seconds kept for each later section when an earlier one runs long
CASES = ("single_a", "single_b", "batch_ab")


# ----------------------------------------------------------------------------------------
# Shared helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


class Part:
    """A section's numbers, rewritten to its JSON file after every measurement."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        write_json(self.path, self.data)

    def add(self, key: str, entry: dict) -> None:
        self.data.setdefault(key, []).append(entry)
        write_json(self.path, self.data)


@contextlib.contextmanager
def guarded(part: Part, key: str) -> Iterator[None]:
    """A failing measurement is recorded under ``<key>_error``; the section goes on."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        part[f"{key}_error"] = f"{type(e).__name__}: {e}"[:500]
        log(f"{key} failed: {part.data[f'{key}_error']}")
        traceback.print_exc()


def checkpoint_path(cache: Path, fixtures: Path) -> Path:
    """The torchvision-layout parity checkpoint, built from the fixture's recipe if absent (the
    same file tests/conftest.py builds, so pytest reuses it)."""
    path = cache / "tv_parity_r50.pth"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        spec = importlib.util.spec_from_file_location("weights_rule", fixtures / "weights_rule.py")
        rule = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rule)  # type: ignore[union-attr]
        tmp = path.with_suffix(".tmp")
        rule.write_checkpoint(str(tmp), fixtures)  # raises if the weights' digest differs
        tmp.replace(path)
    return path


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: Any) -> tuple[float, float | None]:
    """Seconds of one call (device work included) and its peak device memory in MiB (CUDA)."""
    import torch

    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t
    del out  # before the next call, so two outputs never count in one peak
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def summary(times: list[float], peaks: list[float | None], images: int) -> dict:
    med = statistics.median(times)
    out = {
        "median_s": round(med, 5),
        "min_s": round(min(times), 5),
        "runs": len(times),
        "images_per_s": round(images / med, 2),
    }
    if peaks and peaks[0] is not None:
        out["peak_mib"] = round(max(p for p in peaks if p is not None))
    return out


@contextlib.contextmanager
def tf32(enabled: bool | None) -> Iterator[None]:
    """TF32 for cuDNN convolutions and matmuls on (True), off (False), or as PyTorch left it (None)."""
    import torch

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if enabled is not None:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def autocast(device: Any, precision: str) -> contextlib.AbstractContextManager:
    import torch

    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def frozen_bn_in_input_dtype() -> Iterator[None]:
    """A variant to measure, not the library's behaviour: ``FrozenBatchNorm2d`` returning its
    input's dtype. As written (like torchvision's), its float32 scale promotes a bf16/fp16
    activation to float32, so under autocast every BatchNorm writes float32 and every
    following convolution casts back."""
    from maskrcnn.model.backbone import FrozenBatchNorm2d

    original = FrozenBatchNorm2d.forward

    def forward(self: Any, x: Any) -> Any:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]

    FrozenBatchNorm2d.forward = forward
    try:
        yield
    finally:
        FrozenBatchNorm2d.forward = original


def precision_flags(precision: str) -> bool | None:
    """fp32_strict: float32 without TF32; everything else with PyTorch's default flags."""
    return False if precision == "fp32_strict" else None


def shrink(model: Any, quick: bool) -> None:
    """--quick: 320 px images, fewer proposals and detections; otherwise the model as loaded
    (torchvision's settings: 800 px, 1000 proposals, 100 detections)."""
    if quick:
        model.preprocess.min_size, model.preprocess.max_size = (320,), 533
        model.rpn.pre_nms_top_n, model.rpn.post_nms_top_n = {"train": 500, "test": 300}, {"train": 200, "test": 100}
        model.roi_heads.detections_per_img = 20


def fixture_images(fixtures: Path) -> dict[str, Any]:
    from maskrcnn.data.images import load_rgb

    return {"a": load_rgb(fixtures / "image_a.png"), "b": load_rgb(fixtures / "image_b.png")}


def env_info(device_name: str) -> dict:
    import numpy
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device_name,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception as e:  # noqa: BLE001
        info["torchvision"] = f"unavailable: {type(e).__name__}: {e}"[:200]
    if device_name.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
    return info


# ----------------------------------------------------------------------------------------
# Detection comparison (the fixture README's tolerances)


def compare_detections(
    ours: Any, ref_boxes: Any, ref_scores: Any, ref_labels: Any, ref_masks: Any | None = None, iou: float = 0.99
) -> dict:
    """Matching in both directions (same label, box IoU >= ``iou``), box and score differences
    of the matched pairs, the share of matched masks with IoU >= 0.98, and whether all of it is
    within the parity fixture's tolerances (with the default ``iou``)."""
    import numpy as np
    import torch

    from maskrcnn.ops.boxes import box_iou

    def match(boxes: Any, labels: Any, to_boxes: Any, to_labels: Any) -> Any:
        if len(boxes) == 0 or len(to_boxes) == 0:
            return np.full(len(to_boxes), -1)
        overlap = box_iou(to_boxes, boxes)
        overlap[to_labels[:, None] != labels[None, :]] = 0
        best, idx = overlap.max(dim=1)
        return np.where(best.numpy() >= iou, idx.numpy(), -1)

    boxes, scores, labels = ours.boxes.float().cpu(), ours.scores.float().cpu(), ours.labels.cpu()
    fwd = match(boxes, labels, ref_boxes, ref_labels)
    back = match(ref_boxes, ref_labels, boxes, labels)
    m = fwd >= 0
    out = {
        "ours": len(boxes),
        "reference": len(ref_boxes),
        "matched": float(m.mean()) if len(m) else 1.0,
        "matched_back": float((back >= 0).mean()) if len(back) else 1.0,
    }
    if m.any():
        out["max_box_diff"] = float((boxes[fwd[m]] - ref_boxes[m]).abs().max())
        out["max_score_diff"] = float((scores[fwd[m]] - ref_scores[m]).abs().max())
    if ref_masks is not None and ours.masks is not None and m.any():
        our_masks = (ours.masks > 0.5).cpu().numpy() if ours.masks.dtype != torch.bool else ours.masks.cpu().numpy()
        ious = []
        for j in np.where(m)[0]:
            a, b = ref_masks[j], our_masks[fwd[j]]
            union = np.logical_or(a, b).sum()
            ious.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
        out["masks_iou_ge_0.98"] = float(np.mean(np.array(ious) >= 0.98))
    out["within_tolerance"] = bool(
        iou >= 0.99
        and out["matched"] >= 0.98
        and out["matched_back"] >= 0.98
        and out.get("max_box_diff", 0) <= 0.05
        and out.get("max_score_diff", 0) <= 1e-3
        and out.get("masks_iou_ge_0.98", 1.0) >= 0.98
    )
    return out


# ----------------------------------------------------------------------------------------
# Section: parity


def section_parity(args: argparse.Namespace, part: Part) -> None:
    import numpy as np
    import torch
    from pycocotools import mask as mask_util

    import maskrcnn
    from maskrcnn.data.images import load_rgb, to_tensor

    device = torch.device(args.device)
    cases = json.loads((args.fixtures / "cases.json").read_text())
    names = CASES[:1] if args.quick else CASES
    modes = {"float32": False} if device.type != "cuda" else {"float32": False, "tf32_default": None}
    model = maskrcnn.load(checkpoint_path(args.cache, args.fixtures), device=device)
    for mode, flag in modes.items():
        for name in names:
            if time.time() > args.deadline - 10:
                part["truncated"] = True
                return
            with guarded(part, f"{mode}_{name}"):
                ref = np.load(args.fixtures / f"{name}.npz")
                rles = json.loads((args.fixtures / f"{name}_masks.json").read_text())
                images = [to_tensor(load_rgb(args.fixtures / f)).to(device) for f in cases[name]["images"]]
                with tf32(flag), torch.inference_mode():
                    t = time.perf_counter()
                    dets = model(images).detections
                    sync(device)
                    seconds = time.perf_counter() - t
                for i, det in enumerate(dets):
                    ref_masks = mask_util.decode(rles[i]).transpose(2, 0, 1).astype(bool)
                    entry = compare_detections(
                        det,
                        *(torch.from_numpy(ref[f"final_{k}_{i}"]) for k in ("boxes", "scores", "labels")),
                        ref_masks=ref_masks,
                    )
                    entry.update(mode=mode, case=name, image=i, seconds=round(seconds, 3))
                    part.add("results", entry)
                    log(f"parity {mode} {name}[{i}]: {entry}")
    results = [r for r in part.data.get("results", []) if r["mode"] == "float32"]
    part["float32_within_tolerance"] = bool(results) and all(r["within_tolerance"] for r in results)


# ----------------------------------------------------------------------------------------
# Section: inference


def torchvision_model(checkpoint: Path, device: Any) -> Any:
    """torchvision's Mask R-CNN R50-FPN with the same weights, built as its COCO loader builds it
    (frozen BatchNorm with eps 0; the 2019 key names are upgraded by its own state-dict hooks)."""
    import torch
    from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    model = TorchvisionMaskRCNN(backbone, num_classes=91)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    overwrite_eps(model, 0.0)
    return model.eval().to(device)


def staged_forward(model: Any, images: list, device: Any) -> dict[str, float]:
    """Milliseconds of each stage of one forward (fp32), synchronised between stages."""
    import torch

    from maskrcnn.model.transform import to_original_frame

    times: dict[str, float] = {}
    t = [time.perf_counter()]

    def lap(name: str) -> None:
        sync(device)
        t.append(time.perf_counter())
        times[name] = round((t[-1] - t[-2]) * 1000, 2)

    sync(device)
    t[0] = time.perf_counter()
    batch, _ = model.preprocess(images)
    lap("preprocess")
    feats = model.backbone(batch.tensors)
    lap("backbone")
    proposals, _ = model.rpn(batch, feats)
    lap("rpn")
    heads = model.roi_heads
    logits, deltas = heads.box_outputs(feats[:-1], proposals, batch.image_sizes)
    dets = heads.postprocess(logits, deltas, proposals, batch.image_sizes)
    lap("box_head")
    mask_logits = heads.mask_logits(feats[:-1], [d.boxes for d in dets], batch.image_sizes)
    labels = torch.cat([d.labels for d in dets])
    probs = mask_logits[torch.arange(len(labels), device=labels.device), labels].sigmoid()
    for d, p in zip(dets, probs.split([len(d) for d in dets])):
        d.masks = p
    lap("mask_head")
    to_original_frame(dets, batch)
    lap("paste")
    times["total"] = round(sum(times.values()), 2)
    return times


def nms_calls(model: Any, images: list) -> list[tuple[str, tuple]]:
    """The (boxes, scores, groups, threshold) of every batched_nms call of one forward."""
    import torch

    # import_module: the packages re-export functions named like some of their modules
    rpn_module = importlib.import_module("maskrcnn.model.rpn")
    roi_heads_module = importlib.import_module("maskrcnn.model.roi_heads")
    calls = []
    originals = rpn_module.batched_nms, roi_heads_module.batched_nms

    def recorder(where: str, fn: Callable) -> Callable:
        def wrapped(boxes, scores, idxs, thresh, **kw):  # type: ignore[no-untyped-def]
            calls.append((where, (boxes.clone(), scores.clone(), idxs.clone(), thresh)))
            return fn(boxes, scores, idxs, thresh, **kw)

        return wrapped

    rpn_module.batched_nms = recorder("rpn", originals[0])
    roi_heads_module.batched_nms = recorder("box_head", originals[1])
    try:
        with torch.inference_mode():
            model(images)
    finally:
        rpn_module.batched_nms, roi_heads_module.batched_nms = originals
    return calls


def nms_block_sizes(model: Any, images: list, device: Any, runs: int, tv_nms: Callable | None) -> list[dict]:
    """Time of the batched NMS calls of one forward (RPN per level, box head per class) for
    several GPU block sizes, and torchvision's batched_nms on the same input."""
    nms_module = importlib.import_module("maskrcnn.ops.nms")
    calls = nms_calls(model, images)
    out = []
    saved = nms_module._BLOCK_GPU, nms_module._BLOCK
    sizes = (256, 1024, 2048, 4096) if device.type == "cuda" else (256,)
    for where in ("rpn", "box_head"):
        mine = [c for w, c in calls if w == where]
        entry: dict[str, Any] = {
            "where": where,
            "calls": len(mine),
            "boxes": [int(c[0].shape[0]) for c in mine][:4],
            "groups": [int(c[2].unique().numel()) for c in mine][:4],
        }
        reference = [nms_module.batched_nms(*c).cpu() for c in mine]
        for size in sizes:
            nms_module._BLOCK_GPU = nms_module._BLOCK = size
            try:
                times = [
                    measure(lambda: [nms_module.batched_nms(*c) for c in mine], device)[0] for _ in range(runs + 1)
                ][1:]
                entry[f"ms_block_{size}"] = round(statistics.median(times) * 1000, 3)
            finally:
                nms_module._BLOCK_GPU, nms_module._BLOCK = saved
        if tv_nms is not None:
            times = [measure(lambda: [tv_nms(*c) for c in mine], device)[0] for _ in range(runs + 1)][1:]
            entry["ms_torchvision"] = round(statistics.median(times) * 1000, 3)
            same = [tv_nms(*c).cpu().tolist() == r.tolist() for c, r in zip(mine, reference)]
            entry["same_as_torchvision"] = f"{sum(same)}/{len(same)}"
        out.append(entry)
    return out


def section_inference(args: argparse.Namespace, part: Part) -> None:
    import torch

    import maskrcnn
    from maskrcnn.data.images import to_tensor
    from maskrcnn.structures import Detections

    device = torch.device(args.device)
    part["env"] = env_info(str(device))
    ckpt = checkpoint_path(args.cache, args.fixtures)
    model = maskrcnn.load(ckpt, device=device)
    shrink(model, args.quick)
    pics = fixture_images(args.fixtures)
    batches = (1, 2) if args.quick else (1, 8)
    precisions = ("fp32", "bf16") if args.quick else ("fp32", "fp32_strict", "bf16", "fp16")
    warmup, runs = (1, 1) if args.quick else (2, 5)
    part["setup"] = {
        "min_size": model.preprocess.min_size[-1],
        "max_size": model.preprocess.max_size,
        "precisions": "fp32: PyTorch's defaults (cuDNN convolutions may use TF32); fp32_strict: TF32 off; "
        "bf16/fp16: autocast",
        "peak_mib": "torch.cuda.max_memory_allocated over one call; includes both models' weights (~0.35 GB)",
        "proposals": model.rpn.post_nms_top_n["test"],
        "detections": model.roi_heads.detections_per_img,
        "images": "fixture image_a / image_b alternating",
        "warmup": warmup,
        "runs": runs,
        "original_sizes": {k: list(v.shape[:2]) for k, v in pics.items()},
    }

    tv = None
    try:
        tv = torchvision_model(ckpt, device)
        tv.transform.min_size, tv.transform.max_size = model.preprocess.min_size, model.preprocess.max_size
        tv.rpn._pre_nms_top_n["testing"] = model.rpn.pre_nms_top_n["test"]
        tv.rpn._post_nms_top_n["testing"] = model.rpn.post_nms_top_n["test"]
        tv.roi_heads.detections_per_img = model.roi_heads.detections_per_img
    except Exception as e:  # noqa: BLE001
        part["torchvision"] = f"not measured: {type(e).__name__}: {e}"[:300]
        log(part.data["torchvision"])

    def out_of_time() -> bool:
        if time.time() > args.deadline - 15:
            part["truncated"] = True
            return True
        return False

    # Per-stage times, batch 1 and the largest batch, fp32.
    for n in batches:
        with guarded(part, f"stages_batch{n}"):
            tensors = [to_tensor(pics["ab"[i % 2]]).to(device) for i in range(n)]
            with torch.inference_mode():
                staged = [staged_forward(model, tensors, device) for _ in range(warmup + runs)][warmup:]
            stages = {k: round(statistics.median(s[k] for s in staged), 2) for k in staged[0]}
            part.add("stages_ms_fp32", {"batch": n, **stages})
            log(f"stages fp32 batch {n}: {stages}")
    if out_of_time():
        return

    # Agreement with torchvision on the same input (is it the same detector?), and AMP vs fp32.
    tensors1 = [to_tensor(pics["a"]).to(device)]
    theirs = None
    with guarded(part, "torchvision_agreement"), torch.inference_mode():
        if tv is not None:
            ours32 = model(tensors1).detections[0]
            theirs = tv(tensors1)[0]
            part["torchvision_agreement_fp32"] = compare_detections(
                ours32, theirs["boxes"].cpu(), theirs["scores"].cpu(), theirs["labels"].cpu()
            )
            log(f"torchvision agreement: {part.data['torchvision_agreement_fp32']}")
    # The parity checkpoint is calibrated, not trained: its scores crowd together, so AMP
    # reorders and replaces many detections, in torchvision as in ours; compare the two drifts.
    with guarded(part, "amp_agreement"), torch.inference_mode():
        ours32 = model(tensors1).detections[0]
        for precision in ("bf16", "fp16") if device.type == "cuda" else ("bf16",):
            with autocast(device, precision):
                low = model(tensors1).detections[0]
                tv_low = tv(tensors1)[0] if tv is not None and theirs is not None else None
            for iou in (0.9, 0.5):
                entry = {
                    "ours": compare_detections(
                        low, ours32.boxes.cpu(), ours32.scores.cpu(), ours32.labels.cpu(), iou=iou
                    )
                }
                if tv_low is not None:
                    entry["torchvision"] = compare_detections(
                        Detections(tv_low["boxes"], tv_low["scores"], tv_low["labels"]),
                        theirs["boxes"].cpu(),
                        theirs["scores"].cpu(),
                        theirs["labels"].cpu(),
                        iou=iou,
                    )
                part[f"{precision}_agreement_with_fp32_iou{iou}"] = entry
                log(f"{precision} vs fp32 (same label, box IoU >= {iou}): {entry}")

    # Throughput: ours (forward, masks pasted), ours via predict (Results), torchvision; interleaved.
    for n in batches:
        arrays = [pics["ab"[i % 2]] for i in range(n)]
        tensors = [to_tensor(a).to(device) for a in arrays]
        for precision in precisions:
            if out_of_time():
                return
            fns = {"ours_forward": lambda: model(tensors), "ours_predict": lambda: model.predict(arrays, batch_size=n)}
            if tv is not None:
                fns["torchvision"] = lambda: tv(tensors)
            names = list(fns)
            times: dict[str, list[float]] = {k: [] for k in names}
            peaks: dict[str, list[float | None]] = {k: [] for k in names}
            entry: dict[str, Any] = {"batch": n, "precision": precision}
            with tf32(precision_flags(precision)), autocast(device, precision), torch.inference_mode():
                for r in range(warmup + runs):
                    for k in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
                        if k in entry:  # failed before
                            continue
                        try:
                            seconds, peak = measure(fns[k], device)
                        except Exception as e:  # noqa: BLE001
                            entry[k] = {"error": f"{type(e).__name__}: {e}"[:500]}
                            traceback.print_exc()
                            continue
                        if r >= warmup:
                            times[k].append(seconds)
                            peaks[k].append(peak)
            for k in names:
                if k not in entry:
                    entry[k] = summary(times[k], peaks[k], n)
            if "median_s" in entry.get("torchvision", {}) and "median_s" in entry["ours_forward"]:
                entry["speedup_vs_torchvision"] = round(
                    entry["torchvision"]["median_s"] / entry["ours_forward"]["median_s"], 3
                )
            part.add("throughput", entry)
            log(f"inference {entry}")
    if device.type != "cuda":
        part["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    # NMS: the block size on the GPU, against torchvision's kernel.
    if out_of_time():
        return
    with guarded(part, "nms"):
        tv_nms = None
        if tv is not None:
            from torchvision.ops import batched_nms as tv_nms  # noqa: N811
        part["nms"] = nms_block_sizes(model, tensors1, device, runs, tv_nms)
        log(f"nms: {part.data['nms']}")

    # Backbone memory layout: NHWC (what the model does; faster with oneDNN on CPU) vs NCHW.
    if out_of_time():
        return
    n = batches[-1]
    with torch.inference_mode():
        batch, _ = model.preprocess([to_tensor(pics["ab"[i % 2]]).to(device) for i in range(n)])
    layouts = {"nhwc": batch.tensors.contiguous(memory_format=torch.channels_last), "nchw": batch.tensors.contiguous()}
    for precision in ("fp32", "bf16"):
        with guarded(part, f"backbone_layout_{precision}"):
            entry = {"batch": n, "precision": precision}
            with autocast(device, precision), torch.inference_mode():
                for name, x in layouts.items():
                    times = [
                        measure(lambda: model.backbone.fpn(model.backbone.body(x)), device)[0]
                        for _ in range(warmup + runs)
                    ][warmup:]
                    entry[f"{name}_ms"] = round(statistics.median(times) * 1000, 2)
            part.add("backbone_layout", entry)
            log(f"backbone layout {entry}")

    # Frozen BatchNorm under autocast: float32 outputs (as now) vs the input's dtype.
    x = layouts["nhwc"]
    for precision in ("bf16", "fp16") if device.type == "cuda" else ("bf16",):
        if out_of_time():
            return
        with guarded(part, f"backbone_frozen_bn_dtype_{precision}"):
            entry = {"batch": n, "precision": precision}
            for variant, ctx in (
                ("float32_out", contextlib.nullcontext),
                ("input_dtype_out", frozen_bn_in_input_dtype),
            ):
                with ctx(), autocast(device, precision), torch.inference_mode():
                    got = [
                        measure(lambda: model.backbone.fpn(model.backbone.body(x)), device)
                        for _ in range(warmup + runs)
                    ][warmup:]
                entry[variant] = summary([t for t, _ in got], [m for _, m in got], n)
            part.add("backbone_frozen_bn_dtype", entry)
            log(f"frozen BN dtype {entry}")


# ----------------------------------------------------------------------------------------
# Section: training


def synthetic_targets(image: Any, objects: int, generator: Any) -> Any:
    """Rectangles and ellipses with full-image masks on one (H, W, 3) image; labels in 1..90."""
    import torch

    from maskrcnn.structures import Targets

    h, w = image.shape[:2]
    boxes, masks = [], torch.zeros((objects, h, w), dtype=torch.uint8)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for k in range(objects):
        bw = int(torch.randint(w // 12, w // 3, (1,), generator=generator))
        bh = int(torch.randint(h // 12, h // 3, (1,), generator=generator))
        x1 = int(torch.randint(0, w - bw, (1,), generator=generator))
        y1 = int(torch.randint(0, h - bh, (1,), generator=generator))
        if k % 2:  # ellipse inscribed in the box
            inside = ((xs - (x1 + bw / 2)) / (bw / 2)) ** 2 + ((ys - (y1 + bh / 2)) / (bh / 2)) ** 2 <= 1
            masks[k][inside] = 1
        else:
            masks[k, y1 : y1 + bh, x1 : x1 + bw] = 1
        boxes.append([x1, y1, x1 + bw, y1 + bh])
    labels = torch.randint(1, 91, (objects,), generator=generator)
    return Targets(boxes=torch.tensor(boxes, dtype=torch.float32), labels=labels, masks=masks)


def train_step(
    model: Any, optimizer: Any, scaler: Any, params: list, images: list, targets: list, precision: str
) -> dict:
    """One SGD step the way ``Trainer.step`` takes it: autocast forward, float32 loss terms,
    (scaled) backward, unscale, gradient norm, (scaler) step; loss values read back."""
    import torch

    device = images[0].device
    with autocast(device, precision):
        out = model(images, targets)
    losses = {k: v.float() for k, v in out.losses.items()}
    loss = sum(losses.values())
    finite = bool(torch.isfinite(loss))
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, math.inf))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif finite and math.isfinite(grad_norm):
        optimizer.step()
    return {"loss": float(loss.detach()), "grad_norm": grad_norm, "finite": finite}


def section_training(args: argparse.Namespace, part: Part) -> None:
    import torch

    import maskrcnn
    from maskrcnn.data.images import to_tensor

    device = torch.device(args.device)
    part["env"] = env_info(str(device))
    # The parity checkpoint: R50-FPN, frozen BatchNorm, 91 class slots; the default config
    # trains the top 3 ResNet stages (coco_r50's model section, with one training scale).
    model = maskrcnn.load(checkpoint_path(args.cache, args.fixtures), device=device).train()
    shrink(model, args.quick)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    part["setup"] = {
        "min_size": model.preprocess.min_size[-1],
        "max_size": model.preprocess.max_size,
        "trainable_tensors": len(params),
        "trainable_params": sum(p.numel() for p in params),
        "frozen_params": frozen,
        "optimizer": "SGD lr 1e-3 momentum 0.9 wd 1e-4",
        "targets": "6 synthetic objects per image",
        "data_loading": "excluded (images and targets already on the device)",
    }
    pics = fixture_images(args.fixtures)
    g = torch.Generator().manual_seed(0)
    batches = (1, 2) if args.quick else (2, 8)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    warmup, runs = (1, 1) if args.quick else (2, 5)
    for n in batches:
        arrays = [pics["ab"[i % 2]] for i in range(n)]
        images = [to_tensor(a).to(device) for a in arrays]
        targets = [synthetic_targets(a, 6, g).to(device) for a in arrays]
        for precision in precisions:
            if time.time() > args.deadline - 20:
                part["truncated"] = True
                return
            try:
                model.load_state_dict(initial)  # every configuration starts from the same weights
                optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
                scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
                times, peaks, steps = [], [], []
                for r in range(warmup + runs):
                    holder: dict = {}
                    seconds, peak = measure(
                        lambda: holder.update(train_step(model, optimizer, scaler, params, images, targets, precision)),
                        device,
                    )
                    if r >= warmup:
                        times.append(seconds)
                        peaks.append(peak)
                    steps.append(holder)
                    if time.time() > args.deadline - 20:
                        break
                entry = {
                    "images": n,
                    "precision": precision,
                    **summary(times or [seconds], peaks or [peak], n),
                    "losses": [round(s["loss"], 4) for s in steps],
                    "all_finite": all(s["finite"] for s in steps),
                }
                if scaler is not None:
                    entry["grad_scale"] = float(scaler.get_scale())
            except Exception as e:  # noqa: BLE001
                entry = {"images": n, "precision": precision, "error": f"{type(e).__name__}: {e}"[:500]}
                traceback.print_exc()
            part.add("throughput", entry)
            log(f"training {entry}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # The largest batch in bf16 once more, with frozen BatchNorm returning bf16 (a variant).
    if time.time() < args.deadline - 30:
        try:
            with frozen_bn_in_input_dtype():
                model.load_state_dict(initial)
                optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
                got = [
                    measure(lambda: train_step(model, optimizer, None, params, images, targets, "bf16"), device)
                    for _ in range(warmup + runs)
                ][warmup:]
            entry = {
                "images": n,
                "precision": "bf16",
                "variant": "frozen BN returns bf16",
                **summary([t for t, _ in got], [m for _, m in got], n),
            }
        except Exception as e:  # noqa: BLE001
            entry = {"variant": "frozen BN returns bf16", "error": f"{type(e).__name__}: {e}"[:500]}
        part.add("throughput_variants", entry)
        log(f"training variant {entry}")
    if device.type != "cuda":
        part["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# ----------------------------------------------------------------------------------------
# Section: pytest (run by the parent, in a subprocess)


def pytest_command(args: argparse.Namespace, junit: Path, rest: bool) -> list[str]:
    # -v: one line per test in the log, so a run cut short still shows what passed
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={junit}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append("--timeout=120")
    if rest:
        return cmd + ["-k", f"not {args.device}"] + (["tests/model", "tests/test_api.py"] if args.quick else [])
    if args.quick:
        return cmd + [
            "-k",
            args.device,
            "tests/ops",
            "tests/train/test_train.py::test_one_step_reaches_every_trainable_parameter",
            "tests/train/test_train.py::test_autocast_training",
        ]
    return cmd + ["-k", args.device, "tests/ops", "tests/model/test_parity.py", "tests/train/test_train.py"]


def junit_summary(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["seconds"] = float(suite.get("time", 0))
    bad = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                first = (node.get("message") or "").splitlines()[:1]
                bad.append(f"{case.get('classname')}::{case.get('name')} [{kind}] {first[0] if first else ''}"[:300])
    out["not_passed"] = bad
    return out


# ----------------------------------------------------------------------------------------
# The parent: runs each section in a subprocess with its budget, merges the results


def run_parent(args: argparse.Namespace) -> int:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "cuda_check.log"
    results_path = out / "results.json"
    started = time.time()
    end = started + args.budget
    sections = [s for s in SECTIONS if not args.only or s in args.only.split(",")]
    results: dict[str, Any] = {
        "command": sys.argv,
        "device": args.device,
        "quick": args.quick,
        "budget_s": args.budget,
        "sections": {},
    }
    work = Path(tempfile.mkdtemp(prefix="cuda_check_"))
    # pytest reads the fixture from $MASKRCNN_SHARED/fixtures/tv_parity
    shared = work / "shared"
    (shared / "fixtures").mkdir(parents=True)
    (shared / "fixtures" / "tv_parity").symlink_to(args.fixtures.resolve())
    env = {
        **os.environ,
        "MASKRCNN_SHARED": str(shared),
        "MASKRCNN_TEST_CACHE": str(args.cache),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }

    with open(log_path, "a", buffering=1) as logf:

        def say(msg: str) -> None:
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            print(line, flush=True)
            logf.write(line + "\n")

        say(f"cuda_check: device {args.device}, quick {args.quick}, budget {args.budget} s, sections {sections}")
        try:
            import torch

            results["env"] = env_info(args.device)
            if args.device.startswith("cuda") and not torch.cuda.is_available():
                say("CUDA is not available here")
            t = time.time()
            checkpoint_path(args.cache, args.fixtures)
            results["checkpoint_build_s"] = round(time.time() - t, 1)
        except Exception as e:  # noqa: BLE001
            results["setup_error"] = f"{type(e).__name__}: {e}"
            say(f"setup error: {results['setup_error']}")
        write_json(results_path, results)

        for i, name in enumerate(sections):
            later = len(sections) - i - 1
            timeout = min(CAPS[name][1 if args.quick else 0], end - time.time() - FLOOR * later)
            if timeout < 20:
                results["sections"][name] = {"status": "skipped: out of time"}
                write_json(results_path, results)
                say(f"--- {name}: skipped, out of time")
                continue
            say(f"--- {name}: up to {timeout:.0f} s")
            part_path = work / f"{name}.json"
            if name.startswith("pytest"):
                junit = out / ("junit_rest.xml" if name == "pytest_rest" else "junit_device.xml")
                cmd = pytest_command(args, junit, rest=name == "pytest_rest")
            else:
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--section",
                    name,
                    "--device",
                    args.device,
                    "--fixtures",
                    str(args.fixtures),
                    "--out",
                    str(out),
                    "--cache",
                    str(args.cache),
                    "--part",
                    str(part_path),
                    "--deadline",
                    str(time.time() + timeout),
                ] + (["--quick"] if args.quick else [])
            t = time.time()
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout)
                status = "ok" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {timeout:.0f} s"
            entry: dict[str, Any] = {"status": status, "seconds": round(time.time() - t, 1)}
            if name.startswith("pytest"):
                try:
                    entry.update(junit_summary(junit))
                except Exception as e:  # noqa: BLE001
                    entry["junit"] = f"unreadable: {type(e).__name__}: {e}"
            elif part_path.exists():
                entry.update(json.loads(part_path.read_text()))
            results["sections"][name] = entry
            results["elapsed_s"] = round(time.time() - started, 1)
            write_json(results_path, results)
            say(f"--- {name}: {status} in {entry['seconds']} s")
        say(f"done in {time.time() - started:.0f} s; results in {results_path}")
        try:
            for line in headlines(results):
                say(line)
        except Exception as e:  # noqa: BLE001
            say(f"(summary failed: {type(e).__name__}: {e}; see results.json)")
    return 0 if all(e.get("status") == "ok" for e in results["sections"].values()) else 1


def headlines(results: dict) -> list[str]:
    """The numbers that matter, one line each, for the end of the console output."""
    lines = []
    for name, e in results["sections"].items():
        lines.append(f"{name}: {e.get('status')}, {e.get('seconds', 0)} s")
        if "tests" in e:
            lines.append(
                f"  {e['tests']} tests, {e['failures']} failures, {e['errors']} errors, {e['skipped']} skipped"
            )
            lines += [f"  NOT PASSED {t}" for t in e.get("not_passed", [])[:8]]
        for r in e.get("results", []):  # parity
            lines.append(
                f"  {r['mode']} {r['case']}[{r['image']}]: within tolerance {r['within_tolerance']}, matched "
                f"{r['matched']:.2f}/{r['matched_back']:.2f}, box {r.get('max_box_diff', 0):.4f} px, "
                f"score {r.get('max_score_diff', 0):.1e}, masks {r.get('masks_iou_ge_0.98', 0):.2f}"
            )
        for r in e.get("stages_ms_fp32", []):
            lines.append(
                f"  stages ms, batch {r['batch']} fp32: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "batch")
            )
        if "torchvision_agreement_fp32" in e:
            a = e["torchvision_agreement_fp32"]
            lines.append(
                f"  same detections as torchvision (fp32): {a['matched']:.2f}/{a['matched_back']:.2f}, box {a.get('max_box_diff', 0):.4f} px"
            )
        for r in e.get("throughput", []):
            if "error" in r:
                lines.append(f"  {r} ")
            elif "ours_forward" in r:
                fwd, pred, tv = (r.get(k, {}) for k in ("ours_forward", "ours_predict", "torchvision"))
                lines.append(
                    f"  infer b{r['batch']} {r['precision']}: forward {fwd.get('images_per_s', fwd.get('error'))} img/s "
                    f"({fwd.get('peak_mib', '-')} MiB), predict {pred.get('images_per_s', pred.get('error'))} img/s, "
                    f"torchvision {tv.get('images_per_s', tv.get('error', '-'))} img/s ({tv.get('peak_mib', '-')} MiB), "
                    f"speed-up {r.get('speedup_vs_torchvision', '-')}"
                )
            else:
                lines.append(
                    f"  train {r.get('images')} img {r.get('precision')}: {r.get('images_per_s')} img/s, "
                    f"{r.get('peak_mib', '-')} MiB, finite {r.get('all_finite')}"
                )
        if e.get("truncated"):
            lines.append("  (cut short by its time budget)")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--fixtures", type=Path, required=True, help="the tv_parity fixture folder")
    p.add_argument("--out", type=Path, required=True, help="folder for the log, results.json and junit files")
    p.add_argument("--quick", action="store_true", help="small sizes and few runs: a smoke test of every section")
    p.add_argument("--budget", type=float, default=400, help="seconds for the whole run")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("MASKRCNN_TEST_CACHE", Path.home() / ".cache" / "maskrcnn-tests")),
        help="where the parity checkpoint is built (shared with the tests)",
    )
    p.add_argument("--section", default="", help=argparse.SUPPRESS)
    p.add_argument("--part", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.fixtures = args.fixtures.resolve()
    args.cache = args.cache.resolve()
    if not args.section:
        return run_parent(args)
    part = Part(args.part)
    if args.quick and args.device == "cpu":
        import torch

        torch.set_num_threads(1)  # two OpenMP threads on 2 shared cores can be 10x slower than one
    fn = {"parity": section_parity, "inference": section_inference, "training": section_training}[args.section]
    fn(args, part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
