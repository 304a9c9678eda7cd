"""What a model gets wrong, beyond COCO AP: precision / recall / F1 at one score threshold, a
confusion matrix (classes + background) and the images with the most errors, drawn.

Matching at one operating point (``score_thresh``, ``iou_thresh``), as a user looks at
predictions: detections at or above the threshold, best score first, each takes the unmatched
ground-truth instance of its class with the highest IoU if that is at least ``iou_thresh``
(a true positive), else it is a false positive; ground truth left unmatched is missed. Crowd
regions are not instances: a detection whose best overlap is a crowd region is ignored, as in
COCOeval. IoU is mask IoU (``iou_type="segm"``) or box IoU (``"bbox"``), by pycocotools.

The confusion matrix matches the same way but across classes (a detection may take an instance
of another class): rows are the ground-truth class, columns the predicted class, the last row
and column "background" (a false detection: row background; a missed instance: column
background).

Shape shorthand: K classes, D detections and G ground-truth instances of one image.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

logger = logging.getLogger(__name__)


@dataclass
class ErrorAnalysis:
    """Counts at one operating point; class k is ``category_ids[k]``, index K is background."""

    category_ids: list[int]
    class_names: list[str]
    score_thresh: float
    iou_thresh: float
    iou_type: str
    tp: np.ndarray  # (K,) int
    fp: np.ndarray  # (K,) int
    fn: np.ndarray  # (K,) int
    confusion: np.ndarray  # (K + 1, K + 1) int, rows ground truth, columns prediction
    per_image: dict[int, tuple[int, int]] = field(default_factory=dict)  # image id -> (missed, false)

    @property
    def precision(self) -> np.ndarray:
        """(K,) TP / (TP + FP); NaN where the class has no detection."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.tp / (self.tp + self.fp)

    @property
    def recall(self) -> np.ndarray:
        """(K,) TP / (TP + FN); NaN where the class has no ground truth."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.tp / (self.tp + self.fn)

    @property
    def f1(self) -> np.ndarray:
        """(K,) 2 TP / (2 TP + FP + FN); NaN where there is neither."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return 2 * self.tp / (2 * self.tp + self.fp + self.fn)

    def worst(self, n: int) -> list[int]:
        """Ids of the ``n`` images with the most errors (missed + false), most first; none without errors."""
        ranked = sorted(self.per_image, key=lambda i: (-sum(self.per_image[i]), i))
        return [i for i in ranked if sum(self.per_image[i])][:n]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per-class counts and P/R/F1 (None for NaN), the matrix and its labels."""

        def num(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        per_class = {
            name: {
                "tp": int(self.tp[k]),
                "fp": int(self.fp[k]),
                "fn": int(self.fn[k]),
                "precision": num(self.precision[k]),
                "recall": num(self.recall[k]),
                "f1": num(self.f1[k]),
            }
            for k, name in enumerate(self.class_names)
        }
        return {
            "score_thresh": self.score_thresh,
            "iou_thresh": self.iou_thresh,
            "iou_type": self.iou_type,
            "per_class": per_class,
            "confusion_matrix": {
                "labels": [*self.class_names, "background"],
                "rows": "ground truth",
                "columns": "prediction",
                "matrix": self.confusion.tolist(),
            },
        }

    def format(self) -> str:
        """A table of P/R/F1 per class, in percent."""
        width = max([len(n) for n in self.class_names] + [5])
        lines = [
            f"at score >= {self.score_thresh:g}, {self.iou_type} IoU >= {self.iou_thresh:g}:",
            f"{'class':{width}}{'TP':>7}{'FP':>7}{'FN':>7}{'P':>7}{'R':>7}{'F1':>7}",
        ]
        for k, name in enumerate(self.class_names):
            pct = [
                f"{'-':>7}" if np.isnan(v) else f"{100 * v:7.1f}"
                for v in (self.precision[k], self.recall[k], self.f1[k])
            ]
            lines.append(f"{name:{width}}{self.tp[k]:7d}{self.fp[k]:7d}{self.fn[k]:7d}" + "".join(pct))
        return "\n".join(lines)


def _segmentations(entries: list[dict], iou_type: str) -> list[Any]:
    if iou_type == "bbox":
        return [e["bbox"] for e in entries]
    return [
        {
            "size": e["segmentation"]["size"],
            "counts": e["segmentation"]["counts"].encode("ascii")
            if isinstance(e["segmentation"]["counts"], str)
            else e["segmentation"]["counts"],
        }
        for e in entries
    ]


def _greedy(iou: np.ndarray, allowed: np.ndarray, crowd: np.ndarray, thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of D score-sorted detections to G instances.

    Args:
        iou: (D, G) IoU (for a crowd column: the share of the detection inside the region).
        allowed: (D, G) bool, which pairs may match (same class, or any).
        crowd: (G,) bool.

    Returns:
        match: (D,) index of the matched instance, -1 unmatched, -2 ignored (on a crowd region).
        taken: (G,) bool, instances matched.
    """
    d, g = iou.shape
    match, taken = np.full(d, -1), np.zeros(g, dtype=bool)
    for i in range(d):
        candidates = np.where(allowed[i] & ~taken & ~crowd & (iou[i] >= thresh), iou[i], -1.0)
        if g and candidates.max() >= 0:
            match[i] = int(candidates.argmax())
            taken[match[i]] = True
        elif g and (np.where(allowed[i] & crowd, iou[i], -1.0) >= thresh).any():
            match[i] = -2
    return match, taken


def analyse(
    coco_gt: COCO,
    entries: list[dict],
    image_ids: list[int] | None = None,
    score_thresh: float = 0.5,
    iou_thresh: float = 0.5,
    iou_type: str = "segm",
) -> ErrorAnalysis:
    """Match detections to ground truth at one operating point (module docstring).

    Args:
        coco_gt: the ground truth (``CocoFile.to_pycocotools``).
        entries: COCO results (``Result.to_coco``): ``image_id``, ``category_id``, ``bbox``,
            ``score`` and, for ``segm``, ``segmentation`` RLE.
        image_ids: images to count (default all of ``coco_gt``).
        score_thresh: detections below it are left out.
        iou_thresh: the least IoU of a match.
        iou_type: "segm" (mask IoU) or "bbox".
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    if not 0.0 <= score_thresh <= 1.0 or not 0.0 < iou_thresh <= 1.0:
        raise ValueError(f"score_thresh must be in [0, 1] and iou_thresh in (0, 1], got {score_thresh}, {iou_thresh}")
    cat_ids = sorted(coco_gt.getCatIds())
    index = {c: k for k, c in enumerate(cat_ids)}
    bg = len(cat_ids)
    tp, fp, fn = (np.zeros(bg, dtype=np.int64) for _ in range(3))
    confusion = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else list(image_ids)
    by_image: dict[int, list[dict]] = {i: [] for i in image_ids}
    for e in entries:
        if e["score"] >= score_thresh and e["image_id"] in by_image and e["category_id"] in index:
            by_image[e["image_id"]].append(e)
    per_image = {}
    for image_id in image_ids:
        dets = sorted(by_image[image_id], key=lambda e: -e["score"])
        gts = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in gts], dtype=bool)  # (G,)
        gt_seg = [a["bbox"] for a in gts] if iou_type == "bbox" else [coco_gt.annToRLE(a) for a in gts]
        iou = (
            np.asarray(mask_util.iou(_segmentations(dets, iou_type), gt_seg, crowd.astype(np.uint8).tolist()))
            if dets and gts
            else np.zeros((len(dets), len(gts)))
        )  # (D, G)
        det_cls = np.array([index[e["category_id"]] for e in dets], dtype=np.int64)  # (D,)
        gt_cls = np.array([index[a["category_id"]] for a in gts], dtype=np.int64)  # (G,)
        same = det_cls[:, None] == gt_cls[None, :]  # (D, G)
        match, taken = _greedy(iou, same, crowd, iou_thresh)
        missed = ~taken & ~crowd
        np.add.at(tp, det_cls[match >= 0], 1)
        np.add.at(fp, det_cls[match == -1], 1)
        np.add.at(fn, gt_cls[missed], 1)
        per_image[image_id] = (int(missed.sum()), int((match == -1).sum()))
        any_match, any_taken = _greedy(iou, np.ones_like(same), crowd, iou_thresh)
        np.add.at(confusion, (gt_cls[any_match[any_match >= 0]], det_cls[any_match >= 0]), 1)
        np.add.at(confusion, (np.full((any_match == -1).sum(), bg), det_cls[any_match == -1]), 1)
        np.add.at(confusion, (gt_cls[~any_taken & ~crowd], np.full((~any_taken & ~crowd).sum(), bg)), 1)
    names = [coco_gt.cats[c].get("name", str(c)) for c in cat_ids]
    return ErrorAnalysis(cat_ids, names, score_thresh, iou_thresh, iou_type, tp, fp, fn, confusion, per_image)


# ---- pictures ------------------------------------------------------------------------------------


def confusion_png(analysis: ErrorAnalysis) -> bytes:
    """The confusion matrix as a PNG (counts in the cells, rows ground truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [*analysis.class_names, "background"]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(4.5, 2 + 0.6 * n), max(4.0, 1.5 + 0.6 * n)))  # the title fits one class too
    ax.imshow(analysis.confusion, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(f"score >= {analysis.score_thresh:g}, {analysis.iou_type} IoU >= {analysis.iou_thresh:g}", fontsize=10)
    top = analysis.confusion.max() or 1
    for (r, c), v in np.ndenumerate(analysis.confusion):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def side_by_side(image: np.ndarray, gt: list[dict], dets: list[dict], names: dict[int, str], title: str) -> bytes:
    """PNG of ``image`` twice: ground truth (left, each labelled with score 1.00) and detections
    (right), masks and boxes drawn by ``Result.plot``.

    Args:
        image: (H, W, 3) uint8 RGB.
        gt: COCO annotations of the image (``segmentation`` as RLE with bytes counts, ``bbox``).
        dets: COCO results of the image above the threshold.
        names: category id -> name.
    """
    from PIL import Image, ImageDraw

    from ..inference.results import Result

    h, w = image.shape[:2]

    def draw(items: list[dict], scores: list[float]) -> Image.Image:
        boxes = [[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in items)]
        rles = [
            {
                "size": [h, w],
                "counts": a["segmentation"]["counts"]
                if isinstance(a["segmentation"]["counts"], bytes)
                else a["segmentation"]["counts"].encode("ascii"),
            }
            for a in items
        ]
        r = Result(
            np.reshape(boxes, (-1, 4)),
            scores,
            [a["category_id"] for a in items],
            (h, w),
            rles=rles,
            class_names=[names.get(a["category_id"], "") for a in items],
        )
        return r.plot(image, max_size=1024)

    left, right = draw(gt, [1.0] * len(gt)), draw(dets, [e["score"] for e in dets])
    canvas = Image.new("RGB", (left.width + right.width + 8, left.height + 24), "white")
    canvas.paste(left, (0, 24))
    canvas.paste(right, (left.width + 8, 24))
    ImageDraw.Draw(canvas).text((4, 4), title, fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def check_report_out(out: Path) -> None:
    """ValueError before any work if ``out/analysis`` holds a file that no earlier report wrote
    unchanged (its PNGs are replaced by a rerun, a user's own files never)."""
    from ..data.formats.common import ExportFolder

    folder = ExportFolder(Path(out) / "analysis", "maskrcnn evaluate report")
    if folder.root.is_dir():
        folder.check([p for p in folder.root.rglob("*") if p.is_file() and p.name != ExportFolder.MANIFEST])


def write_report(
    out: Path, analysis: ErrorAnalysis, coco_gt: COCO, entries: list[dict], image_dir: Path, worst: int = 6
) -> list[Path]:
    """``out/analysis/confusion_matrix.png`` and ``out/analysis/worst/<rank>_<name>.png`` for the
    ``worst`` images with the most errors (0: none). Files a user changed are not replaced.
    Returns the paths, the confusion matrix first."""
    from ..data.formats.common import ExportFolder
    from ..data.images import load_rgb

    folder = ExportFolder(Path(out) / "analysis", "maskrcnn evaluate report")
    ids = analysis.worst(worst)
    pngs = {folder.root / "confusion_matrix.png": None}
    for rank, i in enumerate(ids, 1):
        pngs[folder.root / "worst" / f"{rank:02d}_{Path(coco_gt.imgs[i]['file_name']).stem}.png"] = i
    folder.check(list(pngs))
    names = {c: coco_gt.cats[c].get("name", str(c)) for c in coco_gt.getCatIds()}
    for path, image_id in pngs.items():
        if image_id is None:
            folder.write(path, confusion_png(analysis))
            continue
        gts = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id])) if not a.get("iscrowd", 0)]
        gts = [{**a, "segmentation": coco_gt.annToRLE(a)} for a in gts]
        dets = [e for e in entries if e["image_id"] == image_id and e["score"] >= analysis.score_thresh]
        missed, false = analysis.per_image[image_id]
        title = f"{coco_gt.imgs[image_id]['file_name']}: ground truth (left), predictions (right): {missed} missed, {false} false"
        folder.write(
            path, side_by_side(load_rgb(image_dir / coco_gt.imgs[image_id]["file_name"]), gts, dets, names, title)
        )
    folder.close()
    return list(pngs)


# ---- precision-recall curves -------------------------------------------------------------------


@dataclass
class PRCurve:
    """Counts of one class at each score threshold ``thresholds[t]`` (detections scoring at least it)."""

    thresholds: np.ndarray  # (T,) increasing, in [0, 1]
    tp: np.ndarray  # (T,) int
    fp: np.ndarray  # (T,) int
    fn: np.ndarray  # (T,) int

    @property
    def precision(self) -> np.ndarray:
        """(T,) TP / (TP + FP); 1 where nothing is detected (no detection is wrong)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.tp + self.fp > 0, self.tp / (self.tp + self.fp), 1.0)

    @property
    def recall(self) -> np.ndarray:
        """(T,) TP / (TP + FN); 0 without ground truth."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.tp + self.fn > 0, self.tp / (self.tp + self.fn), 0.0)


def pr_curves(
    coco_gt: COCO,
    entries: list[dict],
    image_ids: list[int] | None = None,
    iou_thresh: float = 0.5,
    iou_type: str = "segm",
    num_thresholds: int = 101,
) -> dict[str, PRCurve]:
    """Per class name, TP / FP / FN at ``num_thresholds`` score thresholds 0..1, matched as
    ``analyse`` matches (greedy, best score first, so a detection's match does not depend on
    the detections below it: one matching at score 0 gives every threshold's counts)."""
    cat_ids = sorted(coco_gt.getCatIds())
    thresholds = np.arange(num_thresholds) / (
        num_thresholds - 1
    )  # k / n exactly: 0.6, not linspace's 0.6000000000000001
    scored: dict[int, list[tuple[float, bool]]] = {c: [] for c in cat_ids}
    gt_count = dict.fromkeys(cat_ids, 0)
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else list(image_ids)
    wanted = set(image_ids)
    by_image: dict[int, list[dict]] = {i: [] for i in image_ids}
    for e in entries:
        if e["image_id"] in wanted and e["category_id"] in scored:
            by_image[e["image_id"]].append(e)
    for image_id in image_ids:
        dets = sorted(by_image[image_id], key=lambda e: -e["score"])
        gts = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in gts], dtype=bool)
        for a, c in zip(gts, crowd):
            gt_count[a["category_id"]] += int(not c)
        gt_seg = [a["bbox"] for a in gts] if iou_type == "bbox" else [coco_gt.annToRLE(a) for a in gts]
        iou = (
            np.asarray(mask_util.iou(_segmentations(dets, iou_type), gt_seg, crowd.astype(np.uint8).tolist()))
            if dets and gts
            else np.zeros((len(dets), len(gts)))
        )  # (D, G)
        same = np.array([[e["category_id"] == a["category_id"] for a in gts] for e in dets], dtype=bool).reshape(
            len(dets), len(gts)
        )
        match, _ = _greedy(iou, same, crowd, iou_thresh)
        for e, m in zip(dets, match):
            if m != -2:
                scored[e["category_id"]].append((e["score"], bool(m >= 0)))
    curves = {}
    for c in cat_ids:
        s = np.array([v for v, _ in scored[c]], dtype=np.float64)  # (D,)
        hit = np.array([t for _, t in scored[c]], dtype=bool)
        above = s[None, :] >= thresholds[:, None]  # (T, D)
        tp = (above & hit).sum(axis=1)
        curves[coco_gt.cats[c].get("name", str(c))] = PRCurve(
            thresholds, tp, (above & ~hit).sum(axis=1), gt_count[c] - tp
        )
    return curves
