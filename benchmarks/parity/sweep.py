"""Parity sweep: our model against the real references (torchvision v1 / v2, Detectron2 R50 / R101 /
X101-32x8d FPN) on independently drawn weight calibrations, every padding case and mixed-size batches.

Runs in the reference environment (torchvision and Detectron2 importable; our package from ``src``):

    PYTHONPATH=/work/d2src /work/venv-ref/bin/python benchmarks/parity/sweep.py [--families tv1 r50 ...]
        [--draws 3] [--threads 1] [--quick] [--json OUT.json]

For each family and draw (seed and calibration photo) it draws and calibrates weights with the
fixture generators' recipes (``make_tv2_fixture.draw_and_calibrate``, ``make_d2_fixture.calibrate``),
caches the checkpoint under ``--cache`` and prints the reference's proposals per FPN level
(count and size range: every level must give proposals). Then, per case, it runs the reference
(torchvision's model on a list of float images; Detectron2's model on a list of dicts, as
``DefaultPredictor`` feeds it) and ours (``maskrcnn.load`` of the same file) and compares the final
detections: same label and box IoU >= 0.99, box and score differences, mask IoU. A mask that is
not identical is explained only if every differing pixel has a reference probability within
``NEAR_TIE`` of 0.5; a reference detection without a match only if it sits at a threshold tie
(score within 1e-3 of the 0.05 threshold or of the 100th detection's). Any other difference is
a mismatch, and the case is then compared stage by stage (input, FPN levels, proposals, box head
on the reference's proposals) to locate it. One table is printed; ``--json`` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (HERE, REPO, REPO / "src"):
    sys.path.insert(0, str(p))

import make_d2_fixture as d2gen  # noqa: E402
import make_tv2_fixture as tvgen  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402
from sweep_cases import IMAGES, load_case_image  # noqa: E402

import maskrcnn  # noqa: E402
from maskrcnn.inference.results import Result  # noqa: E402
from maskrcnn.model.transform import to_original_frame  # noqa: E402
from maskrcnn.ops.paste import paste_masks  # noqa: E402
from tests.model.parity import mask_iou, match_detections, matched_fraction, rms_of  # noqa: E402

SHARED = REPO.parent / "shared"
PHOTOS = SHARED / "data" / "kudzu_bug" / "images"
FAMILIES = ["tv1", "tv2", "r50", "r101", "x101"]
DRAWS = [(101, "train_1.jpg"), (102, "train_15.jpg"), (103, "val_30.jpg")]  # (seed, calibration photo)
NEAR_TIE = 2.5e-3  # the mask logit tolerance 1e-2 moves a probability by up to 1e-2 / 4
SCORE_THRESH, DETECTIONS = 0.05, 100

CASES = {name: [name] for name in IMAGES} | {"batch:4:3+3:4+2:1": ["land4:3", "port3:4", "land2:1"]}
# Fewer cases where time is short (2 shared cores, about a minute an R50 case): every R50
# family's first draw runs all cases, its other draws LEAN (a /32-odd clamped size and the
# mixed batch); R101 / X101's first draw runs LEAN + 30:1 + 1:1.9, their others TINY.
LEAN = ["land2:1", "batch:4:3+3:4+2:1"]
TINY = ["land3:2s1333"]


def default_cases(family: str, draw: int, lean: bool = False) -> list[str]:
    if family in ("r101", "x101") or lean:
        return LEAN + ["land30:1", "port1:1.9"] if draw == 0 else TINY
    return list(CASES) if draw == 0 else LEAN


def image_path(cache: Path, name: str) -> Path:
    """The case image as an RGB PNG (made once from the source photo: crop, then resize)."""
    path = cache / "images" / f"{name.replace(':', '_')}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(load_case_image(name)).save(path)
    return path


# ---------------------------------------------------------------- weights


def tv_reference(family: str) -> torch.nn.Module:
    if family == "tv1":
        return tvgen.v1_model().eval()
    return tvgen.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91).eval()


def tv_targets(photo: Path, cache: Path) -> dict[str, float]:
    """The v1 fixture network's output spreads on ``photo`` (the trained-like spread to calibrate to)."""
    path = cache / f"tv_targets_{photo.stem}.json"
    if not path.exists():
        rule = tvgen.load_rule(SHARED / "fixtures" / "tv_parity")
        pth = cache / "tv_parity_v1.pth"
        if not pth.exists():
            rule.write_checkpoint(str(pth), SHARED / "fixtures" / "tv_parity")
        v1 = tvgen.v1_model()
        v1.load_state_dict(torch.load(pth, weights_only=True))
        path.write_text(json.dumps(tvgen.output_spreads(v1.eval(), tvgen.read_image(photo))))
    return json.loads(path.read_text())


def checkpoint(family: str, seed: int, photo: Path, cache: Path) -> Path:
    """Draw and calibrate the family's weights (the fixture generators' recipes), once per cache."""
    suffix = ".pkl" if family in d2gen.FAMILIES else ".pth"
    path = cache / f"{family}-s{seed}-{photo.stem}-bal{suffix}"
    if path.exists():
        return path
    if family in d2gen.FAMILIES:
        cfg = d2gen.d2_cfg(family)
        model = d2gen.build_model(cfg).eval()
        d2gen.calibrate(family, model, photo, cfg, seed=seed, balance_levels=True)
        arrays = {k: v.numpy().copy() for k, v in model.state_dict().items()}
        with open(path.with_suffix(".tmp"), "wb") as f:
            pickle.dump(
                {"model": arrays, "__author__": f"maskrcnn parity sweep (seed {seed}, not trained)"}, f, protocol=3
            )
    else:
        model = tv_reference(family)
        rule = tvgen.load_rule(REPO / "tests" / "fixtures" / "tv2_parity")
        factors = tvgen.SPREAD_FACTOR if family == "tv2" else {}
        tvgen.draw_and_calibrate(
            model, tvgen.read_image(photo), seed, tv_targets(photo, cache), rule, factors=factors, balance_levels=True
        )
        torch.save(model.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return path


def load_reference(family: str, path: Path):  # type: ignore[no-untyped-def]
    if family in d2gen.FAMILIES:
        cfg = d2gen.d2_cfg(family)
        model = d2gen.build_model(cfg).eval()
        d2gen.DetectionCheckpointer(model).load(str(path))
        return model, cfg
    model = tv_reference(family)
    model.load_state_dict(torch.load(path, weights_only=True))
    # torchvision's MultiScaleRoIAlign infers its scales from the first batch it sees and keeps
    # them (``if self.scales is None``). Set them as an ordinary first image (800 x 800) does,
    # 1/4..1/32, so that no case depends on which case ran first: a 30:1 image seen first would
    # freeze 1/2..1/16 for the model's lifetime.
    from torchvision.ops.poolers import _setup_scales

    feats = [torch.zeros(1, 1, 800 // s, 800 // s) for s in (4, 8, 16, 32)]
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        pool.scales, pool.map_levels = _setup_scales(feats, [(800, 800)], pool.canonical_scale, pool.canonical_level)
    return model.eval(), None


# ---------------------------------------------------------------- running


class LevelCapture:
    """Which FPN level each reference proposal came from: the RPN's per-image ``batched_nms``
    call sees every candidate with its level id; a proposal is one of those boxes, bit for bit."""

    def __init__(self, family: str, model) -> None:  # type: ignore[no-untyped-def]
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []
        if family in d2gen.FAMILIES:
            from detectron2.modeling.proposal_generator import proposal_utils

            inner = proposal_utils.batched_nms

            def nms(boxes, scores, idxs, thresh):  # type: ignore[no-untyped-def]
                self.calls.append((boxes.numpy().copy(), idxs.numpy().copy()))
                return inner(boxes, scores, idxs, thresh)

            proposal_utils.batched_nms = nms
        else:
            from torchvision.ops import boxes as box_ops

            filter_proposals = model.rpn.filter_proposals

            def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
                inner = box_ops.batched_nms

                def nms(boxes, scores, idxs, thresh):  # type: ignore[no-untyped-def]
                    self.calls.append((boxes.numpy().copy(), idxs.numpy().copy()))
                    return inner(boxes, scores, idxs, thresh)

                box_ops.batched_nms = nms
                try:
                    return filter_proposals(*args, **kwargs)
                finally:
                    box_ops.batched_nms = inner

            model.rpn.filter_proposals = wrapped

    def levels(self, proposals: list[np.ndarray]) -> list[np.ndarray]:
        calls, self.calls = self.calls[-len(proposals) :], []
        out = []
        for props, (boxes, lvl) in zip(proposals, calls):
            lookup = {row.tobytes(): int(level) for row, level in zip(boxes, lvl)}
            out.append(np.array([lookup.get(row.tobytes(), -1) for row in props]))
        return out


def run_reference(family: str, model, cfg, paths: list[Path]) -> tuple[dict, list]:  # type: ignore[no-untyped-def]
    """The fixture generators' stage recorders: proposals, box head, detections, final boxes, RLEs."""
    if cfg is not None:
        return d2gen.run_case(model, cfg, paths, full=True, check_whole=False)
    return tvgen.record(model, [tvgen.read_image(p) for p in paths])


@torch.no_grad()
def run_ours(model, family: str, paths: list[Path]) -> dict:  # type: ignore[no-untyped-def]
    """Our model, stage by stage (``forward`` is preprocess -> detect -> to_original_frame)."""
    images = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]
    if family not in d2gen.FAMILIES:
        images = [im.float() / 255 for im in images]  # what the torchvision reference is given
    batch, _ = model.preprocess(images)
    feats = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, feats)
    dets = model.roi_heads.detect(feats[:-1], proposals, batch.image_sizes)
    return dict(batch=batch, feats=feats, proposals=proposals, final=to_original_frame(dets, batch))


# ---------------------------------------------------------------- comparing


def compare_image(family: str, ref: dict, rles: list, ours, i: int) -> dict:  # type: ignore[no-untyped-def]
    """Final detections of image ``i``: matches, differences and the explanation of each miss."""
    d2 = family in d2gen.FAMILIES
    mode = "detectron2" if d2 else "torchvision"
    rb = torch.from_numpy(ref[f"final_boxes_{i}"])
    rs = ref[f"final_scores_{i}"]
    rl = torch.from_numpy(ref[f"final_labels_{i}"]).long() + (1 if d2 else 0)  # Detectron2's class c is our c + 1
    fwd = match_detections(ours.boxes, ours.labels, rb, rl)
    back = match_detections(rb, rl, ours.boxes, ours.labels)
    m = fwd >= 0
    r: dict = {"ref": len(rb), "ours": len(ours), "matched": int(m.sum()), "matched_back": int((back >= 0).sum())}
    r["box"] = float(np.abs(ours.boxes[fwd[m]].numpy() - rb[m].numpy()).max()) if m.any() else 0.0
    r["score"] = float(np.abs(ours.scores[fwd[m]].numpy() - rs[m]).max()) if m.any() else 0.0
    # A miss is a tie if the detection sits at the score threshold or at the last kept rank.
    last = float(rs.min()) if len(rs) == DETECTIONS else SCORE_THRESH
    ours_s = ours.scores.numpy()
    last_ours = float(ours_s.min()) if len(ours_s) == DETECTIONS else SCORE_THRESH

    def at_tie(s: float, edge: float) -> bool:
        return abs(s - SCORE_THRESH) <= 1e-3 or abs(s - edge) <= 1e-3

    r["unmatched_ref"] = [[float(rs[j]), at_tie(float(rs[j]), last_ours)] for j in np.where(~m)[0]]
    r["unmatched_ours"] = [[float(ours_s[k]), at_tie(float(ours_s[k]), last)] for k in np.where(back < 0)[0]]
    # Masks, as a user gets them (Result pastes box by box) against the reference's RLEs.
    if len(rb):
        size = tuple(rles[i][0]["size"])
        ref_masks = mask_util.decode(rles[i]).transpose(2, 0, 1).astype(bool)
        our_masks = Result.from_detections(ours, size, paste=mode).masks
        ref_probs = torch.from_numpy(ref[f"dets_mask_logits_{i}"]).sigmoid()
        ious, identical, ties, worst_margin = [], 0, 0, 0.0
        for j in np.where(m)[0]:
            a, b = ref_masks[j], our_masks[fwd[j]]
            iou = mask_iou(a, b)
            ious.append(iou)
            if (a == b).all():
                identical += 1
                continue
            # The reference's own probabilities at its own box (its paste, pixel for pixel: the
            # parity tests' test_pasting_*), at the pixels that differ.
            soft = paste_masks(ref_probs[j : j + 1], rb[j : j + 1], size, mode=mode)[0].numpy()
            margin = float(np.abs(soft[a != b] - 0.5).max())
            worst_margin = max(worst_margin, margin)
            ties += margin <= NEAR_TIE
        r.update(
            masks=len(ious),
            masks_identical=identical,
            masks_near_tie=ties,
            mask_iou_min=min(ious, default=1.0),
            worst_margin=worst_margin,
        )
    else:
        r.update(masks=0, masks_identical=0, masks_near_tie=0, mask_iou_min=1.0, worst_margin=0.0)
    explained_misses = all(t for _, t in r["unmatched_ref"]) and all(t for _, t in r["unmatched_ours"])
    exact = r["matched"] == r["ref"] and r["matched_back"] == r["ours"]
    close = r["box"] <= 0.05 and r["score"] <= 1e-3
    masks_ok = r["masks_identical"] + r["masks_near_tie"] == r["masks"]
    r["verdict"] = ("ok" if exact else "tie") if explained_misses and close and masks_ok else "MISMATCH"
    if r["verdict"] == "ok" and r["masks_near_tie"]:
        r["verdict"] = "ok (mask ties)"
    return r


def compare_stages(family: str, ref: dict, rles: list, ours: dict, model) -> dict:  # type: ignore[no-untyped-def]
    """Where a case differs: each stage against the reference's, our previous stage feeding ours;
    then our heads on the reference's proposals to the end (``heads_on_ref_proposals``: if that is
    ``ok``, the difference is in the proposals alone)."""
    d2 = family in d2gen.FAMILIES
    batch, feats = ours["batch"], ours["feats"]
    st: dict = {
        "batch_shape": [list(batch.tensors.shape), ref["batch_shape"].tolist()],
        "image_sizes_equal": [list(s) for s in batch.image_sizes] == ref["image_sizes"].tolist(),
    }
    if "input_crop" in ref and ref["input_crop"].size:
        st["input_crop"] = float(np.abs(batch.tensors[:, :, 96:160, 96:160].numpy() - ref["input_crop"]).max())
    for i, level in enumerate(["0", "1", "2", "3", "pool"]):
        if f"feature_{level}_crop_corner" not in ref:
            continue
        f, rms = feats[i], rms_of(ref, level)
        h, w = f.shape[-2:]
        corner = np.abs(f[:, :, :8, :8].numpy() - ref[f"feature_{level}_crop_corner"]).max()
        centre = np.abs(
            f[:, :, h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4].numpy() - ref[f"feature_{level}_crop_center"]
        ).max()
        st[f"P{i + 2}_crop_rel"] = float(max(corner, centre) / rms)
    st["proposals_matched"] = [
        matched_fraction(p, torch.from_numpy(ref[f"proposals_{i}"])) for i, p in enumerate(ours["proposals"])
    ]
    if "class_logits_0" in ref:
        props = torch.from_numpy(ref["proposals_0"])[:300]
        with torch.no_grad():
            logits, deltas = model.roi_heads.box_outputs(feats[:-1], [props], batch.image_sizes[:1])
        if d2:
            logits, deltas = torch.cat([logits[:, 1:], logits[:, :1]], 1), deltas[:, 4:]
        st["box_head_on_ref_proposals"] = [
            float(np.abs(logits.numpy() - ref["class_logits_0"]).max()),
            float(np.abs(deltas.numpy() - ref["box_regression_0"]).max()),
        ]
    if batch.tensors.shape[0] == 1:
        with torch.no_grad():
            dets = model.roi_heads.detect(feats[:-1], [torch.from_numpy(ref["proposals_0"])], batch.image_sizes)
        r = compare_image(family, ref, rles, to_original_frame(dets, batch)[0], 0)
        st["heads_on_ref_proposals"] = {
            k: r[k] for k in ("matched", "ref", "box", "score", "masks_identical", "masks_near_tie", "verdict")
        }
    return st


def level_summary(levels: list[np.ndarray], proposals: list[np.ndarray]) -> dict[str, list[float]]:
    """Per FPN level: [count, 10th, 50th, 90th percentile of sqrt(area)] of the reference's proposals."""
    lv = np.concatenate(levels)
    side = np.sqrt(np.concatenate([(p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1]) for p in proposals]).clip(0))
    out = {}
    for level in range(5):
        s = side[lv == level]
        out[f"P{level + 2}"] = [int(len(s))] + (
            [float(np.percentile(s, q)) for q in (10, 50, 90)] if len(s) else [0.0] * 3
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=FAMILIES, choices=FAMILIES)
    ap.add_argument("--draws", type=int, default=len(DRAWS))
    ap.add_argument("--cases", nargs="*", default=None, help="default: default_cases()")
    ap.add_argument("--lean", action="store_true", help="every family as R101 / X101: fewer cases")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("SWEEP_CACHE", "/work/sweep-cache")))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--report", nargs="*", type=Path, help="only print the tables of earlier --json files (markdown)")
    args = ap.parse_args()
    if args.report:
        report(args.report)
        return
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    args.cache.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(meta), flush=True)
    for family in args.families:
        for draw, (seed, photo) in enumerate(DRAWS[: args.draws]):
            cases = args.cases or default_cases(family, draw, args.lean)
            t0 = time.time()
            path = checkpoint(family, seed, PHOTOS / photo, args.cache)
            ref_model, cfg = load_reference(family, path)
            capture = LevelCapture(family, ref_model)
            ours_model = maskrcnn.load(path).eval()
            levels, props = [], []
            print(f"# {family} draw s{seed} (calibrated on {photo}): {path.name}, {time.time() - t0:.0f} s", flush=True)
            for case in cases:
                t1 = time.time()
                paths = [image_path(args.cache, n) for n in CASES[case]]
                ref, rles = run_reference(family, ref_model, cfg, paths)
                n = len(paths)
                ref_props = [ref[f"proposals_{i}"] for i in range(n)]
                levels += capture.levels(ref_props)
                props += ref_props
                ours = run_ours(ours_model, family, paths)
                for i in range(n):
                    r = compare_image(family, ref, rles, ours["final"][i], i)
                    r.update(
                        family=family,
                        draw=f"s{seed}",
                        case=case,
                        image=i,
                        size=list(Image.open(paths[i]).size),
                        resized=list(ours["batch"].image_sizes[i]),
                        padded=list(ours["batch"].tensors.shape[-2:]),
                    )
                    if r["verdict"] == "MISMATCH":
                        r["stages"] = compare_stages(family, ref, rles, ours, ours_model) if n == 1 or i == 0 else {}
                    results.append(r)
                    print(row(r), f"({time.time() - t1:.0f} s)", flush=True)
            summary = level_summary(levels, props)
            results.append({"family": family, "draw": f"s{seed}", "proposals_per_level": summary})
            print(
                f"# {family} s{seed} proposals per level [count, p10, p50, p90 of sqrt(area)]:",
                ", ".join(f"{k} {v[0]} [{v[1]:.0f}, {v[2]:.0f}, {v[3]:.0f}]" for k, v in summary.items()),
                flush=True,
            )
            if args.json:
                args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print()
    print(HEADER)
    for r in results:
        if "verdict" in r:
            print(row(r))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def report(paths: list[Path]) -> None:
    """The results and proposals-per-level tables of earlier runs, as markdown."""
    runs = [json.loads(p.read_text()) for p in paths]
    print(
        "| family | draw | case | size (w x h) | padded (w x h) | matched | max box diff (px) | max score diff | masks same / tie / n | min mask IoU | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for r in run["results"]:
            if "verdict" not in r:
                continue
            case = r["case"] + (f"[{r['image']}]" if r["case"].startswith("batch") else "")
            print(
                f"| {r['family']} | {r['draw']} | {case} | {r['size'][0]}x{r['size'][1]} | {r['padded'][1]}x{r['padded'][0]} | "
                f"{r['matched']}/{r['ref']} | {r['box']:.1e} | {r['score']:.1e} | {r['masks_identical']}/{r['masks_near_tie']}/{r['masks']} | "
                f"{r['mask_iou_min']:.4f} | {r['verdict']} |"
            )
    print()
    print("Reference proposals per FPN level over each draw's cases: count (10th-90th percentile of sqrt(area), px).")
    print()
    print("| family | draw | P2 | P3 | P4 | P5 | P6 |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        for r in run["results"]:
            if "proposals_per_level" in r:
                cells = [f"{v[0]} ({v[1]:.0f}-{v[3]:.0f})" for v in r["proposals_per_level"].values()]
                print(f"| {r['family']} | {r['draw']} | " + " | ".join(cells) + " |")


HEADER = f"{'family':6} {'draw':5} {'case':22} {'size':>10} {'padded':>10} {'matched':>9} {'box px':>8} {'score':>8} {'masks same/tie/n':>16} {'min IoU':>7}  verdict"


def row(r: dict) -> str:
    w, h = r["size"]
    ph, pw = r["padded"]
    case = r["case"] + (f"[{r['image']}]" if r["case"].startswith("batch") else "")
    size, padded = f"{w}x{h}", f"{pw}x{ph}"
    matched, masks = f"{r['matched']}/{r['ref']}", f"{r['masks_identical']}/{r['masks_near_tie']}/{r['masks']}"
    line = (
        f"{r['family']:6} {r['draw']:5} {case:22} {size:>10} {padded:>10} {matched:>9} "
        f"{r['box']:8.1e} {r['score']:8.1e} {masks:>16} {r['mask_iou_min']:7.4f}  {r['verdict']}"
    )
    if r["verdict"] == "MISMATCH" and r.get("stages"):
        line += "  stages: " + json.dumps(r["stages"])
    return line


if __name__ == "__main__":
    main()
