"""COCO box and mask AP with pycocotools, returned as numbers instead of printed.

The numbers are pycocotools' own (``COCOeval.stats`` and ``eval["precision"]``), so they
match published COCO results computed the same way. A ground-truth file is read with the
training parser (``data.coco.read_coco``): a malformed record is a ``DatasetError`` naming the
file and the record, never a pycocotools traceback or a silently wrong number.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from ..data.coco import image_path, read_coco
from ..data.errors import DatasetError
from ..inference.options import PredictOptions
from ..inference.predictor import Predictor
from ..model.mask_rcnn import MaskRCNN
from ..weights.onnx_model import OnnxModel

logger = log = logging.getLogger(__name__)

# Names of the 12 entries of COCOeval.stats, in order.
STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def coco_evaluate(
    gt: str | Path | COCO,
    results: list[dict] | str | Path,
    iou_types: Sequence[str] = ("bbox", "segm"),
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Run COCOeval for each IoU type and collect its numbers.

    Args:
        gt: COCO annotation json path (checked by ``read_coco``) or a loaded ``COCO``.
            pycocotools converts the ground-truth polygons of a loaded ``COCO`` to RLE in
            place during "segm" eval.
        results: COCO results entries (``Result.to_coco``) or a json file holding them.
            Not modified. An empty list evaluates to zero AP.
        iou_types: any of "bbox", "segm".
        image_ids: images to evaluate; all images of ``gt`` when None.

    Returns:
        ``{iou_type: {"AP", "AP50", ..., "ARl": float, "per_class": {name: AP}}, ...,
        "summary": str}``. The 12 stats are ``COCOeval.stats`` unchanged: in [0, 1], and
        -1 where no ground truth falls in that area range. ``per_class`` holds AP at
        IoU .50:.95, area "all", 100 detections per image, NaN for a class with no
        ground truth among ``image_ids``. ``summary`` is pycocotools' printed table.
    """
    coco_gt = _load_gt(gt)
    entries = _load_results(results)
    img_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    unknown = {int(e["image_id"]) for e in entries} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(
            f"results name {len(unknown)} image ids absent from the ground truth, e.g. {sorted(unknown)[:5]}"
        )

    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"unknown iou type {iou_type!r}; expected 'bbox' or 'segm'")
    if "segm" in iou_types and any("segmentation" not in e for e in entries):
        raise ValueError("segm evaluation needs a 'segmentation' in every result; use iou_types=('bbox',)")

    metrics: dict[str, Any] = {}
    summaries: list[str] = []
    for iou_type in iou_types:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            # loadRes writes id/area/iscrowd (and a box polygon) into each entry: give it copies
            coco_dt = _load_dt(coco_gt, [dict(e) for e in entries])
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            evaluator.params.imgIds = img_ids
            evaluator.evaluate()
            evaluator.accumulate()
            print(f"IoU metric: {iou_type}")
            evaluator.summarize()
        summary = text.getvalue()
        summaries.append(summary[summary.index(f"IoU metric: {iou_type}") :])
        stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
        stats["per_class"] = _per_class_ap(evaluator, coco_gt)
        metrics[iou_type] = stats
        logger.info("%s AP %.4f AP50 %.4f", iou_type, stats["AP"], stats["AP50"])
    metrics["summary"] = "".join(summaries)
    return metrics


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"bbox_AP": .., "bbox_AP50": .., "segm_AP": ..}`` for logging; drops per-class and summary."""
    flat = {}
    for iou_type, stats in metrics.items():
        if isinstance(stats, dict):
            flat.update({f"{iou_type}_{k}": v for k, v in stats.items() if k in STAT_NAMES})
    return flat


def format_metrics(metrics: dict[str, Any], per_class: bool = False) -> str:
    """A fixed-width table of the 12 stats per IoU type, in percent; optionally per-class AP."""
    types = [t for t, v in metrics.items() if isinstance(v, dict)]
    lines = [f"{'':6}" + "".join(f"{name:>7}" for name in STAT_NAMES)]
    for t in types:
        lines.append(f"{t:6}" + "".join(_pct(metrics[t][name]) for name in STAT_NAMES))
    if per_class and types:
        names = list(metrics[types[0]]["per_class"])
        width = max([len(n) for n in names] + [5])
        lines += ["", f"{'class':{width}}" + "".join(f"{t + ' AP':>9}" for t in types)]
        for n in names:
            row = "".join(f"{_pct(metrics[t]['per_class'].get(n, math.nan)):>9}" for t in types)
            lines.append(f"{n:{width}}" + row)
    return "\n".join(lines)


def _pct(value: float) -> str:
    if value is None or math.isnan(value) or value < 0:
        return f"{'-':>7}"
    return f"{100.0 * value:7.1f}"


def _load_gt(gt: str | Path | COCO) -> COCO:
    if isinstance(gt, COCO):
        return gt
    file = read_coco(gt)
    dropped = [a.ann_id for a in file.annotations if a.degenerate]
    if dropped:  # the same words as CocoDataset's warning
        logger.warning("%s: dropped %d degenerate annotation(s): %s", gt, len(dropped), dropped[:10])
    return file.to_pycocotools()


def _load_results(results: list[dict] | str | Path) -> list[dict]:
    if isinstance(results, (str, Path)):
        with open(results) as f:
            results = json.load(f)
    if not isinstance(results, list):
        raise ValueError(f"COCO results must be a list of dicts, got {type(results).__name__}")
    return results


def _load_dt(coco_gt: COCO, entries: list[dict]) -> COCO:
    if entries:
        return coco_gt.loadRes(entries)
    # loadRes indexes entries[0]; an empty result set is a valid (all-zero) submission
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def _per_class_ap(evaluator: COCOeval, coco_gt: COCO) -> dict[str, float]:
    """AP at IoU .50:.95, area "all", maxDets 100 per category, as summarize() averages it."""
    precision = evaluator.eval["precision"]  # (T iou, R recall, K class, A area, M maxDets)
    area = evaluator.params.areaRngLbl.index("all")
    max_dets = evaluator.params.maxDets.index(100)
    out = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, area, max_dets]  # (T, R)
        p = p[p > -1]
        out[coco_gt.cats[cat_id]["name"]] = float(np.mean(p)) if p.size else math.nan
    return out


@torch.inference_mode()
def coco_results(
    model: MaskRCNN | OnnxModel,
    coco: COCO,
    image_dir: str | Path,
    options: PredictOptions | None = None,
    image_ids: list[int] | None = None,
    *,
    allow_outside_root: bool = False,
    skipped: list[int] | None = None,
) -> list[dict]:
    """Detections of ``model`` on every image of ``coco`` as COCO results entries (RLE masks).

    File names must stay inside ``image_dir`` unless ``allow_outside_root`` (as in
    ``CocoDataset``). An image that cannot be read raises ``DatasetError`` naming it, since
    evaluating without its detections would still count its ground truth; with a ``skipped``
    list it is logged and its id appended there instead, for the caller to leave out of the
    ground truth too. ``options``: how the model runs (pixels are never kept); with
    ``progress`` a bar counts the images.
    """
    options = options or PredictOptions()
    ids = sorted(coco.getImgIds()) if image_ids is None else image_ids
    paths = [image_path(image_dir, coco.imgs[i]["file_name"], allow_outside_root, f"image id {i}") for i in ids]
    entries: list[dict] = []
    stream = Predictor(model, options, keep_images=False).stream(paths)
    for image_id, result in tqdm(
        zip(ids, stream), total=len(ids), desc="evaluate", unit="img", disable=not options.progress, leave=False
    ):
        if result.error is not None:
            if skipped is None:
                raise DatasetError(result.error)
            log.error("skipping %s", result.error)
            skipped.append(image_id)
            continue
        entries.extend(result.to_coco(image_id))
    return entries
