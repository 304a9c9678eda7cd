"""Write tests/fixtures/tv2_parity: what torchvision's ``maskrcnn_resnet50_fpn_v2`` computes, stage
by stage, for a checkpoint in the published v2 layout with calibrated random weights.

Runs in a reference environment of its own, never the package's (torchvision is no dependency
of the package or of CI; the regular index build of torch runs on the CPU):

    python -m venv /work/venv-ref
    /work/venv-ref/bin/pip install "torch===2.13.0" torchvision==0.28.0 pycocotools Pillow
    /work/venv-ref/bin/python benchmarks/parity/make_tv2_fixture.py --calibrate   # new weights + cases
    /work/venv-ref/bin/python benchmarks/parity/make_tv2_fixture.py               # cases only
    /work/venv-ref/bin/python benchmarks/parity/make_tv2_fixture.py --check-v1    # see below

The two images and the v1 weights come from ``../shared/fixtures/tv_parity`` (``--shared``).

Weights (``--calibrate``, written to keys.txt, spec.json, bn.npz; rebuilt by weights_rule.py):
- The ResNet-50 body is the v1 fixture's: the same key names, seed and multipliers, and its
  BatchNorm arrays (calibrated on a real photo there).
- Every other conv and linear weight is N(0, 2 / fan_in) (He), biases N(0, 0.05^2), as v1.
- BatchNorm in the FPN and the heads: weight 1 + 0.1 N(0, 1), bias 0.1 N(0, 1); running mean
  and variance are the statistics of the layer's input on a real photo (a kudzu_bug training
  image, ``--photo``), taken layer by layer in one pass so each sees calibrated layers before it.
- Output layers (RPN objectness and deltas, class scores, box deltas, mask logits) are rescaled
  so that their outputs' spread on that photo equals the v1 fixture network's (a quarter of it
  for box deltas, half for mask logits, see ``SPREAD_FACTOR``): scores and masks then have a trained
  network's spread (v1's README), and both fixtures are alike to read.

``--check-v1`` runs this script's stage recorder on torchvision's v1 model with the v1 fixture's
checkpoint and compares with the v1 fixture's files: proof that the recorded stages mean what
the v1 README says they mean.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from pycocotools import mask as mask_util
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "tv2_parity"
CASES = {"single_a": ["image_a.png"], "single_b": ["image_b.png"], "batch_ab": ["image_a.png", "image_b.png"]}
SEED = 1  # the v1 fixture's, so the body's convolutions are drawn identically
BN_STEPS = 1000  # num_batches_tracked in the file, as a trained file has some count
# Box regression (RPN and box head) at a quarter of v1's spread, mask logits at half. The deeper
# v2 heads (2 RPN convs, 4 conv+BatchNorm+ReLU box and mask heads) amplify float32 rounding more
# than v1's do at random weights, and random features are rough at the pixel scale, so the mask
# head reacts to sub-pixel box moves. Measured at v1's spread: torchvision's own detections moved
# by 0.035 px and scores by 5e-4 between 1 and 2 threads (v1's fixture: 0.005 px, 2e-4), too close
# to the README's 0.05 px and 1e-3 to test anything; a box moved by 0.006 px (a float32
# difference) moved a small detection's mask logits by 0.011, over the README's 1e-2. At half the
# regression spread, boxes still moved by up to 0.028 px and mask logits at them by 0.027.
SPREAD_FACTOR = {
    "rpn.head.bbox_pred": 0.25,
    "roi_heads.box_predictor.bbox_pred": 0.25,
    "roi_heads.mask_predictor.mask_fcn_logits": 0.5,
}
OUTPUT_LAYERS = {  # module path -> its weight / bias key prefixes
    "rpn.head": ("rpn.head.cls_logits", "rpn.head.bbox_pred"),
    "roi_heads.box_predictor": ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"),
    "roi_heads.mask_predictor": ("roi_heads.mask_predictor.mask_fcn_logits",),
}


def load_rule(folder: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(f"rule_{folder.name}", folder / "weights_rule.py")
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)  # type: ignore[union-attr]
    return rule


def v1_model() -> nn.Module:
    """torchvision's v1 Mask R-CNN as ``maskrcnn_resnet50_fpn(weights=COCO_V1)`` builds it: frozen
    BatchNorm with eps 0 in the body (without ``weights`` torchvision would use trainable
    BatchNorm with eps 1e-5)."""
    body = resnet50(norm_layer=FrozenBatchNorm2d)
    model = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=91)
    overwrite_eps(model, 0.0)
    return model


def read_image(path: Path) -> torch.Tensor:
    """RGB uint8 file -> (3, H, W) float in 0..1, as the fixtures' README says."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def flat_outputs(name: str, out) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """The output tensors of an output layer group, one per key prefix, flattened over all levels."""
    if name == "rpn.head":
        logits, deltas = out
        return [torch.cat([x.flatten() for x in logits]), torch.cat([x.flatten() for x in deltas])]
    if name == "roi_heads.box_predictor":
        return [out[0].flatten(), out[1].flatten()]
    return [out.flatten()]


def output_spreads(model: nn.Module, image: torch.Tensor) -> dict[str, float]:
    """Standard deviation of every output layer's outputs on ``image`` (one eval forward)."""
    spreads: dict[str, float] = {}

    def hook(name):  # type: ignore[no-untyped-def]
        def record(module, inputs, out):  # type: ignore[no-untyped-def]
            for prefix, t in zip(OUTPUT_LAYERS[name], flat_outputs(name, out)):
                spreads[prefix] = float(t.double().std())

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in OUTPUT_LAYERS]
    with torch.no_grad():
        model([image])
    for h in handles:
        h.remove()
    return spreads


def balance_fpn_levels(model: nn.Module, image: torch.Tensor) -> dict[str, float]:
    """Factors for the FPN output layers of P3..P5 (weight and bias of each level's last conv, or
    of its BatchNorm) that give every level P2's root mean square on ``image``.

    Why: a trained network proposes objects on every level, but with random weights the coarse
    levels come out weaker (Detectron2 R50 fixture: P5 and P6 = P5 subsampled at 0.42x P2's RMS,
    objectness spread 0.9 against 2.6), so not one P6 proposal reaches the top 1000 and the
    anchors of P6 go untested.
    """
    with torch.no_grad():
        feats = list(model.backbone(model.transform([image])[0].tensors).values())
    rms = [float(f.double().pow(2).mean().sqrt()) for f in feats[:4]]
    out = {}
    for i in range(1, 4):
        block = model.backbone.fpn.layer_blocks[i]
        last = [n for n, m in block.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, FrozenBatchNorm2d))][
            -1
        ]
        for p in ("weight", "bias"):
            out[f"backbone.fpn.layer_blocks.{i}.{last}.{p}"] = rms[0] / rms[i]
    return out


def draw_and_calibrate(
    model: nn.Module,
    image: torch.Tensor,
    seed: int,
    target: dict[str, float],
    rule,  # type: ignore[no-untyped-def]
    given_bn: dict[str, np.ndarray] | None = None,
    given_mult: dict[str, float] | None = None,
    factors: dict[str, float] | None = None,
    balance_levels: bool = False,
) -> tuple[list, dict[str, float], dict[str, np.ndarray]]:
    """Draw a torchvision Mask R-CNN's weights (``rule.draw``, seeded by ``seed`` and the name) and
    calibrate them on ``image``; loads them into ``model`` and returns (keys, multipliers, bn).

    ``given_bn`` / ``given_mult``: arrays and multipliers taken as they are (the v2 fixture's body
    is v1's). Every other BatchNorm (``nn.BatchNorm2d`` or ``FrozenBatchNorm2d``): weight
    1 + 0.1 N(0, 1) (halved on a bottleneck's last BatchNorm, ``bn3``, so 16 blocks do not blow
    the stream up), bias 0.1 N(0, 1), running statistics of its input on ``image``; every other
    conv and linear weight He, biases 0.05; output layers rescaled to ``target`` spreads times
    ``factors`` (default ``SPREAD_FACTOR``). ``balance_levels``: see ``balance_fpn_levels``.
    """
    given_bn, given_mult = given_bn or {}, given_mult or {}
    factors = SPREAD_FACTOR if factors is None else factors
    state = model.state_dict()
    keys = [(k, tuple(v.shape)) for k, v in state.items()]
    norms = (nn.BatchNorm2d, FrozenBatchNorm2d)
    bn_names = {
        f"{n}.{p}"
        for n, m in model.named_modules()
        if isinstance(m, norms)
        for p in ("weight", "bias", "running_mean", "running_var")
    }
    multipliers: dict[str, float] = {}
    bn: dict[str, np.ndarray] = {}
    for name, shape in keys:
        if name.endswith("num_batches_tracked"):
            continue
        if name in given_bn:
            bn[name] = given_bn[name]
        elif name in given_mult:
            multipliers[name] = given_mult[name]
        elif name in bn_names:
            kind = name.rsplit(".", 1)[1]
            if kind == "weight":
                bn[name] = (1 + rule.draw(name, shape, seed, 0.1)) * (0.5 if ".bn3." in name else 1.0)
            elif kind == "bias":
                bn[name] = rule.draw(name, shape, seed, 0.1)
            else:  # calibrated below
                bn[name] = np.zeros(shape, np.float32) if kind == "running_mean" else np.ones(shape, np.float32)
        elif name.endswith(".bias"):
            multipliers[name] = 0.05
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            if "conv5_mask" in name:  # ConvTranspose2d weights are (in, out, kh, kw)
                fan_in = shape[0] * shape[2] * shape[3]
            multipliers[name] = math.sqrt(2.0 / fan_in)
    spec = {"seed": seed, "bn_steps": BN_STEPS, "multipliers": multipliers, "bn": bn, "keys": keys}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in rule.state_arrays(spec).items()})

    # One pass: each BatchNorm outside the body takes its input's statistics the first time it
    # runs, so every later layer sees calibrated layers before it; each output layer group is
    # rescaled to v1's spread as it runs (and what it returns is rescaled likewise).
    def take_statistics(module, inputs):  # type: ignore[no-untyped-def]
        x = inputs[0].double()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
        module._calibrated.remove()

    for n, m in model.named_modules():
        if isinstance(m, norms) and f"{n}.running_mean" not in given_bn:
            m._calibrated = m.register_forward_pre_hook(take_statistics)

    def rescale(name):  # type: ignore[no-untyped-def]
        def hook(module, inputs, out):  # type: ignore[no-untyped-def]
            scales = []
            for prefix, t in zip(OUTPUT_LAYERS[name], flat_outputs(name, out)):
                s = target[prefix] * factors.get(prefix, 1.0) / float(t.double().std())
                scales.append(s)
                for p in ("weight", "bias"):
                    multipliers[f"{prefix}.{p}"] *= s
                    model.get_parameter(f"{prefix}.{p}").data.mul_(s)
            if name == "rpn.head":
                return [x * scales[0] for x in out[0]], [x * scales[1] for x in out[1]]
            if name == "roi_heads.box_predictor":
                return out[0] * scales[0], out[1] * scales[1]
            return out * scales[0]

        return hook

    def rescale_outputs() -> None:
        handles = [model.get_submodule(n).register_forward_hook(rescale(n)) for n in OUTPUT_LAYERS]
        with torch.no_grad():
            model([image])
        for h in handles:
            h.remove()

    rescale_outputs()
    for n, m in model.named_modules():
        if isinstance(m, norms) and f"{n}.running_mean" not in given_bn:
            assert not m._forward_pre_hooks, f"{n} never ran"
            bn[f"{n}.running_mean"] = m.running_mean.numpy().copy()
            bn[f"{n}.running_var"] = m.running_var.numpy().copy()
    if balance_levels:
        for name, s in balance_fpn_levels(model, image).items():
            if name in bn:
                bn[name] = bn[name] * np.float32(s)
            else:
                multipliers[name] *= s
        model.load_state_dict({k: torch.from_numpy(v) for k, v in rule.state_arrays(spec).items()})
        rescale_outputs()  # the RPN and heads see the rescaled levels
    return keys, multipliers, bn


def calibrate(shared: Path, photo: Path) -> None:
    """Draw and calibrate the v2 weights; write keys.txt, spec.json, bn.npz into OUT."""
    torch.manual_seed(0)
    v1_rule = load_rule(shared)
    v1_spec = v1_rule.load_spec(shared)
    image = read_image(photo)

    with tempfile.TemporaryDirectory() as tmp:
        v1_path = Path(tmp) / "v1.pth"
        v1_rule.write_checkpoint(str(v1_path), shared)
        v1 = v1_model()
        v1.load_state_dict(torch.load(v1_path, weights_only=True))
        target = output_spreads(v1.eval(), image)
        del v1
    print("v1 output spreads on the photo:", json.dumps(target, indent=1))

    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91).eval()
    body = {n for n, _ in model.state_dict().items() if n.startswith("backbone.body.")}
    given_bn = {n: v.astype(np.float32) for n, v in v1_spec["bn"].items() if n in body}
    given_mult = {n: v for n, v in v1_spec["multipliers"].items() if n in body}
    rule = load_rule(OUT)
    keys, multipliers, bn = draw_and_calibrate(model, image, SEED, target, rule, given_bn, given_mult)
    spec = {"seed": SEED, "bn_steps": BN_STEPS, "multipliers": multipliers, "bn": bn, "keys": keys}
    spec["sha256"] = rule.digest(rule.state_arrays(spec))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "keys.txt").write_text("".join(f"{k} {','.join(map(str, s))}\n" for k, s in keys))
    np.savez_compressed(OUT / "bn.npz", **bn)
    (OUT / "spec.json").write_text(
        json.dumps({"seed": SEED, "bn_steps": BN_STEPS, "sha256": spec["sha256"], "multipliers": multipliers}, indent=1)
        + "\n"
    )
    print("calibrated; spreads now:", json.dumps(output_spreads(model, image), indent=1))


def channel_stats(prefix: str, f: torch.Tensor, out: dict[str, np.ndarray]) -> None:
    h, w = f.shape[-2:]
    fd = f.double()
    out[f"{prefix}_shape"] = np.array(f.shape)
    out[f"{prefix}_channel_sum"] = fd.sum(dim=(0, 2, 3)).numpy()
    out[f"{prefix}_channel_sumsq"] = (fd**2).sum(dim=(0, 2, 3)).numpy()
    out[f"{prefix}_crop_corner"] = f[:, :, :8, :8].numpy().copy()
    out[f"{prefix}_crop_center"] = f[:, :, h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4].numpy().copy()


@torch.no_grad()
def record(model: nn.Module, images: list[torch.Tensor]) -> tuple[dict[str, np.ndarray], list[list[dict]]]:
    """Every stage of the fixture README's table for one case, and the final masks as RLEs."""
    out: dict[str, np.ndarray] = {}
    batch, _ = model.transform(images)
    sizes = batch.image_sizes
    out["batch_shape"] = np.array(batch.tensors.shape)
    out["image_sizes"] = np.array(sizes)
    out["input_crop"] = batch.tensors[:, :, 96:160, 96:160].numpy().copy()
    out["input_channel_sum"] = batch.tensors.double().sum(dim=(2, 3)).numpy()
    feats = model.backbone(batch.tensors)
    for level, f in feats.items():
        channel_stats(f"feature_{level}", f, out)
    proposals, _ = model.rpn(batch, feats)
    rh = model.roi_heads
    for i, p in enumerate(proposals):
        out[f"proposals_{i}"] = p.numpy().copy()
        # The box head on image i's first 300 proposals alone (the other images get none).
        boxes = [p[:300] if j == i else p[:0] for j in range(len(images))]
        logits, deltas = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, boxes, sizes)))
        out[f"class_logits_{i}"], out[f"box_regression_{i}"] = logits.numpy(), deltas.numpy()
    dets, _ = rh(feats, proposals, sizes)
    mask_logits = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, [d["boxes"] for d in dets], sizes)))
    labels = torch.cat([d["labels"] for d in dets])
    own = mask_logits[torch.arange(len(labels)), labels].split([len(d["boxes"]) for d in dets])
    for i, d in enumerate(dets):
        out[f"dets_boxes_{i}"], out[f"dets_scores_{i}"] = d["boxes"].numpy(), d["scores"].numpy()
        out[f"dets_labels_{i}"], out[f"dets_mask_logits_{i}"] = d["labels"].numpy(), own[i].numpy()
        assert torch.allclose(own[i].sigmoid(), d["masks"][:, 0], atol=1e-6)  # the logits roi_heads used
    final = model.transform.postprocess(dets, sizes, [tuple(im.shape[-2:]) for im in images])
    rles = []
    for i, d in enumerate(final):
        out[f"final_boxes_{i}"], out[f"final_scores_{i}"] = d["boxes"].numpy(), d["scores"].numpy()
        out[f"final_labels_{i}"] = d["labels"].numpy()
        out[f"final_mask_soft_sum_{i}"] = d["masks"].double().sum(dim=(1, 2, 3)).numpy()
        hard = np.asfortranarray((d["masks"][:, 0] > 0.5).numpy().transpose(1, 2, 0).astype(np.uint8))
        rles.append([{"size": r["size"], "counts": r["counts"].decode()} for r in mask_util.encode(hard)])
    return out, rles


def write_cases(shared: Path) -> None:
    rule = load_rule(OUT)
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tv2.pth"
        rule.write_checkpoint(str(path), OUT)  # digest-checked
        model.load_state_dict(torch.load(path, weights_only=True))  # strict: every key of the layout
    model.eval()
    cases = {}
    for name, files in CASES.items():
        arrays, rles = record(model, [read_image(shared / f) for f in files])
        np.savez_compressed(OUT / f"{name}.npz", **arrays)
        (OUT / f"{name}_masks.json").write_text(json.dumps(rles))
        cases[name] = {"images": files, "detections": [len(r) for r in rles]}
        scores = [arrays[f"final_scores_{i}"] for i in range(len(files))]
        print(
            name, "detections", cases[name]["detections"], "scores", [f"{s.min():.3f}..{s.max():.3f}" for s in scores]
        )
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    (OUT / "generated_with.json").write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "python": platform.python_version(),
                "command": "python benchmarks/parity/make_tv2_fixture.py " + " ".join(sys.argv[1:]),
            },
            indent=1,
        )
        + "\n"
    )


def check_v1(shared: Path) -> None:
    """This recorder on torchvision v1 with the v1 fixture's checkpoint == the v1 fixture's files."""
    rule = load_rule(shared)
    model = v1_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v1.pth"
        rule.write_checkpoint(str(path), shared)
        model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    worst, worst_key = 0.0, ""
    for name, files in CASES.items():
        arrays, rles = record(model, [read_image(shared / f) for f in files])
        ref = np.load(shared / f"{name}.npz")
        assert sorted(ref.files) == sorted(arrays), set(ref.files) ^ set(arrays)
        for k in ref.files:
            a, b = arrays[k], ref[k]
            assert a.shape == b.shape, (name, k, a.shape, b.shape)
            if k.startswith(("proposals", "dets", "final")):
                continue  # orders may differ at near-ties across machines: compare the values below only
            scale = max(float(np.abs(b).max()), 1e-6)
            rel = float(np.abs(a.astype(np.float64) - b).max()) / scale
            if rel > worst:
                worst, worst_key = rel, f"{name}/{k}"
        for i in range(len(files)):
            for k in ("dets_boxes", "dets_scores", "final_boxes", "final_mask_soft_sum"):
                a, b = arrays[f"{k}_{i}"], ref[f"{k}_{i}"]
                print(f"{name} {k}_{i}: max abs diff {np.abs(a - b).max():.2e}")
        same = sum(r1 == r2 for r1, r2 in zip(rles[0], json.loads((shared / f"{name}_masks.json").read_text())[0]))
        print(f"{name}: {same} of {len(rles[0])} RLEs of image 0 identical")
    print(f"worst max abs diff relative to the array's max (inputs, features, box head): {worst:.2e} ({worst_key})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "fixtures" / "tv_parity")
    parser.add_argument(
        "--photo", type=Path, default=REPO.parent / "shared" / "data" / "kudzu_bug" / "images" / "train_10.jpg"
    )
    parser.add_argument("--calibrate", action="store_true", help="draw and calibrate new weights first")
    parser.add_argument("--check-v1", action="store_true", help="only check the recorder against the v1 fixture")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    if args.check_v1:
        check_v1(args.shared)
        return
    if args.calibrate:
        calibrate(args.shared, args.photo)
    write_cases(args.shared)


if __name__ == "__main__":
    main()
