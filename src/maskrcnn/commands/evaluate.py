"""``maskrcnn evaluate``: a model over an annotated image set, COCO box and mask AP.

The ground truth is read with the training parser and every image file checked (headers
only) before the model is loaded: a missing or mis-sized image would score its ground truth
against no detections, or against masks drawn at the wrong size.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..data.coco import CocoDataset, describe_problems
from ..data.errors import DatasetError
from ..evaluation.analysis import analyse, check_report_out, write_report
from ..evaluation.coco import coco_evaluate, coco_results, format_metrics
from ..files import refuse_overwriting_inputs, write_json
from ..inference.options import PredictOptions
from ..inference.results import write_coco_results
from ..weights.checkpoint import load

log = logging.getLogger(__name__)

# How ``evaluate``'s files begin (results.json: a compact COCO results list, metrics.json:
# indented metrics), or the whole file when empty: an earlier evaluation's output is replaced,
# a user's own file of that name is not.
_EVALUATE_OPENINGS = {"results.json": (b'[{"image_id": ', b"[]"), "metrics.json": (b'{\n "bbox": {', None)}


def evaluate_files(
    weights: str,
    data: str,
    images: str,
    options: PredictOptions,
    *,
    out: str | None = None,
    device: str = "cpu",
    skip_bad_images: bool = False,
    check_names: bool = True,
    allow_outside_root: bool = False,
    report_score: float = 0.5,
    worst: int = 6,
) -> dict[str, Any]:
    """COCO AP of the model in ``weights`` on the annotated set ``data`` (images in ``images``),
    per class, and what it gets wrong at the score ``report_score`` (``analysis.analyse``:
    precision, recall, F1 per class, a confusion matrix); printed, and with ``out`` written as
    ``out/results.json``, ``out/metrics.json`` and ``out/analysis/`` (the confusion matrix and
    the ``worst`` images drawn with ground truth and detections side by side).

    Returns:
        The metrics (``coco_evaluate``), with ``excluded_images`` naming the images that
        ``skip_bad_images`` left out of both the ground truth and the detections.

    Raises:
        DatasetError: bad ground truth or images (nothing evaluated), or no category the
            model predicts, or a category id naming another class than in the model (unless
            ``check_names`` is False); ValueError: an ``out`` that would replace an input or a user's file.
    """
    if not 0.0 <= report_score <= 1.0:
        raise ValueError(f"--report-score is a score in [0, 1], got {report_score}")
    if worst < 0:
        raise ValueError(f"--worst is a number of images (0: none), got {worst}")
    if out:  # before any work: never an input, never a user's own file, and writable
        check_evaluate_out(Path(out), [Path(data), Path(weights)])
        check_report_out(Path(out))
    gt = CocoDataset(data, images, allow_outside_root=allow_outside_root)
    bad = gt.bad_images(decode=False)
    if len(bad) == len(gt):
        raise DatasetError(describe_problems(data, len(gt), bad) + f"\n  is --images {images} the right folder?")
    if bad and not skip_bad_images:
        raise DatasetError(
            describe_problems(data, len(gt), bad) + "\n  (--skip-bad-images leaves them out of "
            "both the ground truth and the detections)"
        )
    model = load(weights, device=device)
    model_ids, gt_ids = set(model.config.label_categories()[1:]), {a.category_id for a in gt.file.annotations}
    if not model_ids & gt_ids:
        raise DatasetError(
            f"{data}: none of its category ids {sorted(gt_ids)[:10]} is one the model predicts "
            f"{sorted(model_ids)[:10]}; every AP would be 0"
        )
    if check_names:
        check_class_names(data, gt.file.categories, model.config)
    skipped: list[int] = []
    keep = [i for i in gt.image_ids if i not in bad]
    entries = coco_results(
        model,
        gt.coco,
        images,
        options,
        image_ids=keep,
        allow_outside_root=allow_outside_root,
        skipped=skipped if skip_bad_images else None,
    )
    excluded = [*bad, *skipped]
    keep = [i for i in keep if i not in skipped]
    if not keep:
        raise DatasetError(f"{data}: no image could be read; nothing to evaluate")
    iou_types = ("bbox", "segm") if model.config.masks else ("bbox",)
    metrics = coco_evaluate(gt.coco, entries, iou_types=iou_types, image_ids=keep)
    print(format_metrics(metrics, per_class=True))
    analysis = analyse(gt.coco, entries, keep, score_thresh=report_score, iou_type=iou_types[-1])
    print(analysis.format())
    metrics["analysis"] = analysis.to_dict()
    if excluded:
        names = [gt.file.images[i].file_name for i in excluded]
        metrics["excluded_images"] = names
        shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
        print(
            f"{len(excluded)} of {len(gt)} images left out of both the ground truth and the detections: {shown}",
            file=sys.stderr,
        )
    if out:
        write_coco_results(entries, Path(out) / "results.json")
        write_json(metrics, Path(out) / "metrics.json", indent=1)
        drawn = len(write_report(Path(out), analysis, gt.coco, entries, Path(images), worst=worst)) - 1
        worst_files = f" and analysis/worst/ ({drawn} images)" if drawn else ""
        print(f"results.json, metrics.json, analysis/confusion_matrix.png{worst_files} -> {out}/")
    return metrics


def check_class_names(data: str | Path, categories: dict[int, str], config: ModelConfig) -> None:
    """DatasetError when a category id names one class in ``data`` and another in the model:
    COCO evaluation pairs classes by id, so the AP would score one class's detections against
    another's objects and look like a bad model (a round trip through a tool that numbers
    classes by first appearance did this). Names the model does not know ("") are not compared."""
    model_names = dict(zip(config.label_categories()[1:], config.label_names()[1:]))
    differ = [
        (cid, name, model_names[cid])
        for cid, name in sorted(categories.items())
        if model_names.get(cid) and model_names[cid].strip().lower() != name.strip().lower()
    ]
    if differ:
        cid, name, theirs = differ[0]
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        order = ",".join(n for n in config.label_names()[1:])
        raise DatasetError(
            f"{data}: category {cid} is {name!r} there but {theirs!r} to the model{more}; AP pairs classes by id, so "
            f"it would score the wrong class: number the categories as the model does (maskrcnn convert ... --classes {order})"
        )


def check_evaluate_out(out: Path, inputs: list[Path]) -> None:
    """ValueError before any work if ``evaluate`` writing ``out/results.json`` and
    ``out/metrics.json`` would replace an input (``--data``, ``--weights``) or a file that an
    earlier ``evaluate`` did not write, or if ``out`` cannot be written (found only after an
    evaluation that may take hours, otherwise)."""
    outputs = [out / name for name in _EVALUATE_OPENINGS]
    refuse_overwriting_inputs(inputs, outputs)
    for path in outputs:
        if not (path.exists() or path.is_symlink()):
            continue
        prefix, empty = _EVALUATE_OPENINGS[path.name]
        try:
            with open(path, "rb") as f:
                head = f.read(len(prefix) + 1)
        except OSError:
            head = b""
        if not (head.startswith(prefix) or head == empty):
            raise ValueError(
                f"{path} exists and was not written by maskrcnn evaluate, so it is not replaced; "
                "choose another --out folder"
            )
    # Writable, told now rather than after the work, and nothing created on the way (the folder
    # is made when the results are written): the nearest existing folder must take new files.
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} cannot be written (read-only or no permission)")
