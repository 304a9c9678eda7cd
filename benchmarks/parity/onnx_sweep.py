"""ONNX Runtime against our PyTorch model: every weight family, every padding case and aspect
ratio, dense scenes.

    python benchmarks/parity/onnx_sweep.py [--families tv1 tv2 r50 r101 x101] [--threads 2] [--json OUT]

Runs in the package's own environment (the ``onnx`` extra): each family's parity checkpoint
(torchvision v1 and v2 layouts, Detectron2 R50 / R101 / X101-32x8d .pkl; built from the test
fixtures' recipes into the test cache) is exported once with ``maskrcnn export`` and both
runtimes predict the same images through the same ``predict``. The images are the reference
sweep's (``sweep_cases.py``: short sides from 44 to 1333 px after resizing, padded sides odd and
even on P5 and P6, 30:1 both ways, objects cut by the borders) plus dense scenes (scikit-image's
``hubble_deep_field``, a kudzu photo with 100 detections), the 2000 x 10 .. 60 strips of issue 17
and a mixed-size batch.

A detection matches when one of the other runtime's has the same label, boxes within 0.05 px,
scores within 1e-3; a pasted mask below IoU 0.98 is explained only by one differing pixel (a
threshold tie) or, for torchvision's paste, where the two boxes truncate to different integer
grids (it grows a box by (M + 2) / M and truncates it, so float noise on a corner within a few
thousandths of an integer moves the whole mask by a pixel). Anything else is a mismatch. One
table is printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (HERE, REPO, REPO / "src"):
    sys.path.insert(0, str(p))

from pycocotools import mask as mask_util  # noqa: E402
from sweep_cases import IMAGES, load_case_image  # noqa: E402

import maskrcnn  # noqa: E402
from maskrcnn.ops.boxes import box_iou  # noqa: E402
from maskrcnn.ops.paste import _expand_boxes  # noqa: E402
from maskrcnn.weights.export import export  # noqa: E402
from tests.helpers import TV2_PARITY, TV_PARITY, build_checkpoint, d2_checkpoint  # noqa: E402

BOX_TOL, SCORE_TOL, MASK_IOU = 0.05, 1e-3, 0.98
FAMILIES = ["tv1", "tv2", "r50", "r101", "x101"]
EXTRA = {"strip2000x10": (2000, 10), "strip2000x30": (2000, 30), "strip2000x60": (2000, 60), "strip10x2000": (10, 2000)}
DENSE = ["hubble", "kudzu_dense"]


def checkpoint(family: str) -> Path:
    if family == "tv1":
        return build_checkpoint(TV_PARITY, "tv_parity_r50")
    if family == "tv2":
        return build_checkpoint(TV2_PARITY, "tv2_parity_r50")
    return d2_checkpoint(family)


def case_images(names: list[str]) -> dict[str, np.ndarray]:
    """(H, W, 3) uint8 RGB of every case: the reference sweep's crops, strips and dense scenes."""
    from PIL import Image

    out = {}
    for name in names:
        if name in EXTRA:
            w, h = EXTRA[name]
            photo = Image.open(REPO.parent / "shared" / "data" / "kudzu_bug" / "images" / "train_1.jpg").convert("RGB")
            out[name] = np.array(photo.resize((w, h), Image.BILINEAR))
        elif name == "hubble":
            from skimage import data

            out[name] = np.ascontiguousarray(data.hubble_deep_field())
        elif name == "kudzu_dense":
            out[name] = np.array(
                Image.open(REPO.parent / "shared" / "data" / "kudzu_bug" / "images" / "val_30.jpg").convert("RGB")
            )
        else:
            out[name] = load_case_image(name)
    return out


def grids_differ(a: np.ndarray, b: np.ndarray, m: int = 28) -> bool:
    grown = _expand_boxes(torch.tensor(np.stack([a, b])), (m + 2) / m).to(torch.int64)  # (2, 4)
    return bool((grown[0] != grown[1]).any())


def compare(ours, onnx, paste: str) -> dict:
    """Greedy one-to-one matching of PyTorch's detections (best first) to ONNX Runtime's;
    ``paste``: the model's paste rule (only torchvision's truncates to an integer grid)."""
    row = {
        "n_ours": len(ours),
        "n_onnx": len(onnx),
        "matched": 0,
        "box": 0.0,
        "score": 0.0,
        "masks_same": 0,
        "mask_iou_min": 1.0,
        "one_pixel": 0,
        "grid": 0,
        "unexplained": 0,
    }
    if not len(ours) or not len(onnx):
        return row
    iou = box_iou(torch.from_numpy(ours.boxes), torch.from_numpy(onnx.boxes))  # (N, M)
    iou[torch.from_numpy(ours.labels)[:, None] != torch.from_numpy(onnx.labels)[None, :]] = -1
    taken: set[int] = set()
    for i in np.argsort(-ours.scores, kind="stable").tolist():
        r = iou[i].clone()
        r[list(taken)] = -1
        j = int(r.argmax())
        box = float(np.abs(onnx.boxes[j] - ours.boxes[i]).max())
        score = abs(float(onnx.scores[j] - ours.scores[i]))
        if r[j] <= 0 or box > BOX_TOL or score > SCORE_TOL:
            continue
        taken.add(j)
        row["matched"] += 1
        row["box"], row["score"] = max(row["box"], box), max(row["score"], score)
        if ours.rles is None:
            continue
        differing = int(np.count_nonzero(mask_util.decode(onnx.rles[j]) != mask_util.decode(ours.rles[i])))
        # pycocotools gives IoU 0 for two empty masks: equal masks are IoU 1 here
        m_iou = 1.0 if differing == 0 else float(mask_util.iou([onnx.rles[j]], [ours.rles[i]], [0])[0, 0])
        row["mask_iou_min"] = min(row["mask_iou_min"], m_iou)
        row["masks_same"] += differing == 0
        if m_iou < MASK_IOU:  # explained by one threshold-tie pixel, or by torchvision's integer paste grid
            grid = paste == "torchvision" and grids_differ(onnx.boxes[j], ours.boxes[i])
            kind = "one_pixel" if differing <= 1 else "grid" if grid else "unexplained"
            row[kind] += 1
    return row


def verdict(row: dict) -> str:
    full = row["matched"] == row["n_ours"] == row["n_onnx"]
    return "ok" if full and not row["unexplained"] else "MISMATCH"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    p.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.cases or [*IMAGES, *EXTRA, *DENSE]
    images = case_images(names)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            weights = checkpoint(family)
            onnx_path = export(weights, Path(tmp) / f"{family}.onnx")
            ours, theirs = maskrcnn.load(weights), maskrcnn.load(onnx_path)
            paste = ours.config.roi_heads.paste
            for name in names:
                t0 = time.perf_counter()
                row = {
                    "family": family,
                    "case": name,
                    "size": list(images[name].shape[:2]),
                    **compare(ours.predict(images[name]), theirs.predict(images[name]), paste),
                }
                row["verdict"], row["seconds"] = verdict(row), round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(
                    f"{family:5s} {name:16s} {row['size'][1]:>5d}x{row['size'][0]:<5d} {row['matched']:>3d}/{row['n_ours']:<3d}"
                    f" (onnx {row['n_onnx']:>3d})  box {row['box']:.4f}  score {row['score']:.1e}"
                    f"  masks same {row['masks_same']:>3d}  IoU min {row['mask_iou_min']:.3f}"
                    f"  <0.98: 1px {row['one_pixel']} grid {row['grid']}  {row['verdict']}",
                    flush=True,
                )
            batch = [images[n] for n in names[:3]]  # a mixed-size batch through both runtimes
            for n, a, b in zip(names[:3], ours.predict(batch, batch_size=3), theirs.predict(batch, batch_size=3)):
                row = {
                    "family": family,
                    "case": f"batch[{n}]",
                    "size": list(images[n].shape[:2]),
                    **compare(a, b, paste),
                }
                row["verdict"] = verdict(row)
                rows.append(row)
                print(f"{family:5s} batch[{n}] {row['matched']}/{row['n_ours']} {row['verdict']}", flush=True)
    bad = [r for r in rows if r["verdict"] != "ok"]
    print(
        f"{len(rows)} cases, {len(bad)} mismatches; CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
