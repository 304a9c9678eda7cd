"""Generate tests/fixtures/d2_parity: what real Detectron2 computes, stage by stage, for Mask
R-CNN checkpoints in its model zoo layout with calibrated random weights.

Runs in a separate reference environment with Detectron2 built from source (never a dependency
of this package or its CI); this package is not imported:

    /work/venv-ref/bin/python benchmarks/parity/make_d2_fixture.py r50 [--calib PHOTO]
    /work/venv-ref/bin/python benchmarks/parity/make_d2_fixture.py r101
    /work/venv-ref/bin/python benchmarks/parity/make_d2_fixture.py x101

For a family it (1) draws every weight from the fixture's ``weights_rule.py`` (name-seeded
normal draws times a multiplier), (2) calibrates: the frozen BatchNorm statistics are taken
from one real photo (each BatchNorm normalises its own input on that photo, set in one forward
pass by pre-hooks), and the output layers (RPN objectness and deltas, class scores, box deltas,
mask logits) are rescaled over a few passes so that their outputs have a trained network's
spread; (3) writes keys.txt, spec.json and bn.npz (the recipe), builds the .pkl from it and
loads it with ``DetectionCheckpointer``; (4) runs the model like ``DefaultPredictor`` on the
tv_parity images (BGR uint8, ``ResizeShortestEdge(800, 1333)``) and records every stage.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers.mask_ops import _do_paste_mask
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from PIL import Image
from pycocotools import mask as mask_util

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "d2_parity"
TV_PARITY = REPO.parent / "shared" / "fixtures" / "tv_parity"
D2_CONFIGS = Path("/work/d2src/configs/COCO-InstanceSegmentation")
FAMILIES = {
    "r50": "mask_rcnn_R_50_FPN_3x.yaml",
    "r101": "mask_rcnn_R_101_FPN_3x.yaml",
    "x101": "mask_rcnn_X_101_32x8d_FPN_3x.yaml",
}
CASES = {"single_a": ["image_a.png"], "single_b": ["image_b.png"], "batch_ab": ["image_a.png", "image_b.png"]}
SEED = 1
# Output layers and the std of their outputs on the calibration photo (a trained network's
# spread: objectness logits of a few units, small RPN deltas, class logits whose softmax gives
# a range of scores, box deltas in the (10, 10, 5, 5)-weighted units, mask logits of +-several).
OUTPUT_TARGETS = {
    "proposal_generator.rpn_head.objectness_logits": 2.5,
    "proposal_generator.rpn_head.anchor_deltas": 0.2,
    "roi_heads.box_predictor.cls_score": 2.0,
    "roi_heads.box_predictor.bbox_pred": 0.5,
    "roi_heads.mask_head.predictor": 3.0,
}

log = logging.getLogger("make_d2_fixture")


def load_rule():
    spec = importlib.util.spec_from_file_location("weights_rule", FIXTURE / "weights_rule.py")
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)
    return rule


def d2_cfg(family: str):
    cfg = get_cfg()
    cfg.merge_from_file(str(D2_CONFIGS / FAMILIES[family]))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def predictor_input(path: Path, cfg) -> dict:
    """What ``DefaultPredictor.__call__`` feeds the model for the image at ``path``."""
    original = np.array(Image.open(path).convert("RGB"))[:, :, ::-1]  # BGR, as cv2.imread
    assert cfg.INPUT.FORMAT == "BGR"
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    h, w = original.shape[:2]
    image = aug.get_transform(original).apply_image(original)
    image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    return {"image": image, "height": h, "width": w}


def fan_in(shape: tuple[int, ...], groups: int = 1) -> int:
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def base_multipliers(model, keys) -> dict[str, float]:
    """He-scaled weights (sqrt(2 / fan_in), grouped convs by their per-group fan-in), biases 0.05."""
    groups = {n + ".weight": m.groups for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    out = {}
    for name, shape in keys:
        if name.endswith(".bias"):
            out[name] = 0.05
        elif name.startswith("roi_heads.mask_head.deconv"):  # (in, out, 2, 2): each output sees `in` inputs
            out[name] = math.sqrt(2.0 / shape[0])
        else:
            out[name] = math.sqrt(2.0 / fan_in(shape, groups.get(name, 1)))
    return out


def is_bn(name: str) -> bool:
    return ".norm." in name


def balance_fpn_levels(model, inp: dict) -> dict[str, float]:
    """Factors for the FPN output convs of P3..P5 (weight and bias) that give every level P2's root
    mean square on the input ``inp``. Why: a trained network proposes objects on every level,
    but with random weights the coarse levels come out weaker (the R50 fixture: P5 and P6 = P5
    subsampled at 0.42x P2's RMS, objectness spread 0.9 against 2.6), so not one P6 proposal
    reaches the top 1000 and the anchors of P6 go untested."""
    with torch.no_grad():
        feats = model.backbone(model.preprocess_image([inp]).tensor)
    rms = {k: float(v.double().pow(2).mean().sqrt()) for k, v in feats.items()}
    return {f"backbone.fpn_output{k}.{p}": rms["p2"] / rms[f"p{k}"] for k in (3, 4, 5) for p in ("weight", "bias")}


def calibrate(
    family: str, model, photo: Path, cfg, seed: int = SEED, balance_levels: bool = False
) -> tuple[list, dict, dict]:
    """Draw the weights with ``seed`` and calibrate them on ``photo``; leaves them in ``model``.
    ``balance_levels``: scale the FPN outputs to one spread first (``balance_fpn_levels``)."""
    rule = load_rule()
    own = {k: v for k, v in model.state_dict().items()}
    keys = [(k, tuple(v.shape)) for k, v in own.items()]
    mult = base_multipliers(model, keys)
    for layer in OUTPUT_TARGETS:
        mult[layer + ".weight"] = 1.0
        mult[layer + ".bias"] = 0.0
    weights = {n: rule.draw(n, s, seed, mult[n]) for n, s in keys if not is_bn(n)}
    # BatchNorm: gamma 1 (0.5 on a residual branch's last conv, so 23 blocks of R101 do not
    # blow the stream up), beta small and name-seeded; statistics from the photo below.
    bn = {}
    for n, s in keys:
        if n.endswith(".norm.weight"):
            bn[n] = np.full(s, 0.5 if ".conv3." in n else 1.0, np.float32)
        elif n.endswith(".norm.bias"):
            bn[n] = rule.draw(n, s, seed, 0.1)
        elif n.endswith(".norm.running_mean"):
            bn[n] = np.zeros(s, np.float32)
        elif n.endswith(".norm.running_var"):
            bn[n] = np.ones(s, np.float32)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in {**weights, **bn}.items()})
    inp = predictor_input(photo, cfg)

    def set_stats(module, args):
        x = args[0].double()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)).float())
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False).float())

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model([inp])
    for h in hooks:
        h.remove()
    for n, v in model.state_dict().items():
        if n.endswith((".norm.running_mean", ".norm.running_var")):
            bn[n] = v.numpy().copy()

    if balance_levels:
        for name, f in balance_fpn_levels(model, inp).items():
            mult[name] *= f
            model.get_parameter(name).data.copy_(
                torch.from_numpy(rule.draw(name, tuple(own[name].shape), seed, mult[name]))
            )
    # Output layers: measure the std of each output with the current multiplier, rescale, repeat
    # (the later heads see proposals and detections that depend on the earlier ones).
    mods = dict(model.named_modules())
    for it in range(3):
        seen: dict[str, list] = {k: [] for k in OUTPUT_TARGETS}
        hooks = [
            mods[k].register_forward_hook(lambda m, a, o, k=k: seen[k].append(o.detach().double().flatten()))
            for k in OUTPUT_TARGETS
        ]
        with torch.no_grad():
            model([inp])
        for h in hooks:
            h.remove()
        for k, target in OUTPUT_TARGETS.items():
            if not seen[k]:
                log.warning("calibration pass %d: %s saw no input", it, k)
                continue
            std = float(torch.cat(seen[k]).std())
            w = mult[k + ".weight"] * target / std
            mult[k + ".weight"], mult[k + ".bias"] = w, target * 0.5
            log.info("pass %d: %s output std %.4g -> multiplier %.4g", it, k, std, w)
            for p in ("weight", "bias"):
                name = f"{k}.{p}"
                getattr(mods[k], p).data.copy_(
                    torch.from_numpy(rule.draw(name, tuple(own[name].shape), seed, mult[name]))
                )
    return keys, mult, bn


def write_recipe(folder: Path, keys, mult, bn) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keys.txt").write_text("".join(f"{n} {','.join(map(str, s))}\n" for n, s in keys))
    np.savez_compressed(folder / "bn.npz", **bn)
    spec = {"seed": SEED, "multipliers": {n: mult[n] for n, _ in keys if n not in bn}}
    (folder / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True))
    rule = load_rule()
    arrays = rule.state_arrays(rule.load_spec(folder))
    spec["sha256"] = rule.digest(arrays)
    (folder / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True))
    return spec["sha256"]


def feature_stats(out: dict, level: str, f: torch.Tensor) -> None:
    fd = f.double()
    h, w = f.shape[-2:]
    out[f"feature_{level}_shape"] = np.array(f.shape)
    out[f"feature_{level}_channel_sum"] = fd.sum(dim=(0, 2, 3)).numpy()
    out[f"feature_{level}_channel_sumsq"] = (fd**2).sum(dim=(0, 2, 3)).numpy()
    out[f"feature_{level}_crop_corner"] = f[:, :, :8, :8].numpy()
    out[f"feature_{level}_crop_center"] = f[:, :, h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4].numpy()


def run_case(model, cfg, images: list[Path], full: bool, check_whole: bool = True) -> tuple[dict, list]:
    """Every stage for one batch of images; ``full=False`` keeps only what the final-detection
    fixture of R101 / X101 needs; ``check_whole=False`` skips the second, whole-model run that
    proves the staged run is the model's own forward."""
    inputs = [predictor_input(p, cfg) for p in images]
    out: dict[str, np.ndarray] = {}
    captured: list[torch.Tensor] = []
    hook = model.roi_heads.mask_head.predictor.register_forward_hook(lambda m, a, o: captured.append(o.detach()))
    with torch.no_grad():
        batch = model.preprocess_image(inputs)
        out["batch_shape"] = np.array(batch.tensor.shape)
        out["image_sizes"] = np.array([list(s) for s in batch.image_sizes])
        feats = model.backbone(batch.tensor)
        if full:
            out["input_crop"] = batch.tensor[:, :, 96:160, 96:160].numpy()
            out["input_channel_sum"] = batch.tensor.double().sum(dim=(2, 3)).numpy()
            for level, key in zip(["0", "1", "2", "3", "pool"], ["p2", "p3", "p4", "p5", "p6"]):
                feature_stats(out, level, feats[key])
        proposals, _ = model.proposal_generator(batch, feats, None)
        for i, p in enumerate(proposals):
            out[f"proposals_{i}"] = p.proposal_boxes.tensor.numpy()
        if full and len(images) == 1:
            rh = model.roi_heads
            pooled = rh.box_pooler(
                [feats[f] for f in rh.box_in_features], [Boxes(proposals[0].proposal_boxes.tensor[:300])]
            )
            scores, deltas = rh.box_predictor(rh.box_head(pooled))
            out["class_logits_0"] = scores.numpy()
            out["box_regression_0"] = deltas.numpy()
        captured.clear()
        dets, _ = model.roi_heads(batch, feats, proposals, None)
        logits = captured[-1]  # (sum N_i, K, 28, 28)
        start = 0
        for i, d in enumerate(dets):
            n = len(d)
            lab = d.pred_classes
            # Copies: detector_postprocess below scales these boxes in place.
            out[f"dets_boxes_{i}"] = d.pred_boxes.tensor.numpy().copy()
            out[f"dets_scores_{i}"] = d.scores.numpy().copy()
            out[f"dets_labels_{i}"] = lab.numpy().copy()
            out[f"dets_mask_logits_{i}"] = logits[start : start + n][torch.arange(n), lab].numpy()
            start += n
        finals = model._postprocess(dets, inputs, batch.image_sizes)
        # The staged run must be what the model's own forward gives.
        whole = model(inputs) if check_whole else finals
        rles = []
        for i, (f, w) in enumerate(zip(finals, whole)):
            inst, other = f["instances"], w["instances"]
            assert torch.equal(inst.pred_boxes.tensor, other.pred_boxes.tensor) and torch.equal(
                inst.pred_masks, other.pred_masks
            )
            out[f"final_boxes_{i}"] = inst.pred_boxes.tensor.numpy()
            out[f"final_scores_{i}"] = inst.scores.numpy()
            out[f"final_labels_{i}"] = inst.pred_classes.numpy()
            # Soft (probability) sums of the pasted masks, as paste_masks_in_image pastes them
            # on the CPU: one mask at a time, over its box's pixel hull.
            probs = dets[i].pred_masks[:, 0]  # (N, 28, 28); postprocess dropped no box (checked)
            assert len(probs) == len(inst), "detector_postprocess dropped an empty box"
            h, w = inputs[i]["height"], inputs[i]["width"]
            sums = [
                float(
                    _do_paste_mask(probs[j : j + 1, None], inst.pred_boxes.tensor[j : j + 1], h, w, skip_empty=True)[0]
                    .double()
                    .sum()
                )
                for j in range(len(inst))
            ]
            out[f"final_mask_soft_sum_{i}"] = np.array(sums)
            enc = [mask_util.encode(np.asfortranarray(m.numpy().astype(np.uint8))) for m in inst.pred_masks]
            rles.append([{"size": list(r["size"]), "counts": r["counts"].decode()} for r in enc])
    hook.remove()
    return out, rles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument(
        "--calib", type=Path, default=REPO.parent / "shared" / "data" / "kudzu_bug" / "images" / "train_1.jpg"
    )
    ap.add_argument(
        "--cases", nargs="*", default=None, help="default: all three for r50, single_a and single_b otherwise"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    cfg = d2_cfg(args.family)
    folder = FIXTURE / args.family
    model = build_model(cfg).eval()
    keys, mult, bn = calibrate(args.family, model, args.calib, cfg)
    digest = write_recipe(folder, keys, mult, bn)
    log.info("recipe written, weights sha256 %s", digest)

    # Build the .pkl from the recipe alone and load it the way Detectron2 loads model zoo files.
    with tempfile.TemporaryDirectory() as tmp:
        pkl = Path(tmp) / "model_final.pkl"
        load_rule().write_checkpoint(str(pkl), folder)
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(str(pkl))
        log.info("pkl sha256 %s (%d bytes)", hashlib.sha256(pkl.read_bytes()).hexdigest(), pkl.stat().st_size)
    full = args.family == "r50"
    cases = args.cases or (list(CASES) if full else ["single_a", "single_b"])
    summary = {}
    for name in cases:
        out, rles = run_case(model, cfg, [TV_PARITY / f for f in CASES[name]], full)
        np.savez_compressed(folder / f"{name}.npz", **out)
        (folder / f"{name}_masks.json").write_text(json.dumps(rles))
        summary[name] = {"images": CASES[name], "detections": [len(r) for r in rles]}
        log.info(
            "%s: detections %s, scores %s",
            name,
            summary[name]["detections"],
            [f"{out[f'final_scores_{i}'].min():.3f}..{out[f'final_scores_{i}'].max():.3f}" for i in range(len(rles))],
        )
    (folder / "cases.json").write_text(json.dumps(summary, indent=1))
    import detectron2

    (folder / "versions.json").write_text(
        json.dumps(
            {
                "detectron2": detectron2.__version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "config": f"COCO-InstanceSegmentation/{FAMILIES[args.family]}",
                "python": sys.version.split()[0],
                "threads": torch.get_num_threads(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
