"""TensorBoard logging of a training run, as a training hook (``log.tensorboard: true``).

Writes ``<run folder>/tensorboard/`` (``tensorboard --logdir runs/``): every step's losses
(``train/<name>``) and learning rate (``train/lr``); at every validation the validation numbers
(``val/<name>``), AP per class (``val_AP_per_class/<iou type>/<class>``), a precision-recall
curve per class at IoU 0.5 (``val_pr/<class>``) and the first ``num_images`` validation images
with ground truth and predictions side by side (``val_images/<k>``).

The hook reads from the trainer only ``iteration``, ``lr``, ``model``, ``cfg``, ``out`` (the run
folder) and ``val_data`` (the validation dataset, a ``CocoDataset`` or a ``Subset`` of one). The
validation detections come from ``metrics["results"]`` (COCO results entries) when the loop
passes them, else the hook predicts the validation images itself (one more pass). A resumed
run drops the events logged after its checkpoint (``purge_step``), so curves do not fold back.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from .hooks import HookBase

logger = logging.getLogger(__name__)


def _summary_writer(log_dir: str, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError naming tensorboard when the package is absent
        raise ImportError(
            "TensorBoard logging needs the tensorboard package: pip install 'maskrcnn[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)


class TensorBoardHook(HookBase):
    """Training hook writing TensorBoard events (module docstring).

    Args:
        num_images: validation images drawn at each validation (0: none).
        score_thresh: detections drawn only at or above this score.
    """

    def __init__(self, num_images: int = 4, score_thresh: float = 0.5) -> None:
        self.num_images, self.score_thresh = num_images, score_thresh
        self.writer: Any = None
        self.last_logged = -1  # iteration of the last event, saved for resume

    def before_train(self, trainer: Any) -> None:
        resumed = self.last_logged >= 0
        self.writer = _summary_writer(str(trainer.out / "tensorboard"), trainer.iteration + 1 if resumed else None)

    def after_step(self, trainer: Any, losses: dict[str, float]) -> None:
        it = trainer.iteration
        for name, value in losses.items():
            if math.isfinite(value):
                self.writer.add_scalar(f"train/{name}", value, it)
        self.writer.add_scalar("train/lr", trainer.lr, it)
        self.last_logged = it

    def after_validation(self, trainer: Any, metrics: dict) -> None:
        from ..evaluation.analysis import pr_curves
        from ..evaluation.coco import coco_evaluate
        from .datasets import coco_and_indices

        it = trainer.iteration
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"val/{name.removeprefix('val_')}", value, it)
        coco_ds, indices = coco_and_indices(trainer.val_data)
        image_ids = [coco_ds.image_ids[i] for i in indices]
        entries = metrics.get("results")
        if entries is None:
            entries = self._predict(trainer, coco_ds, image_ids)
        masks = bool(getattr(trainer.model.config, "masks", True))
        iou_types = ("bbox", "segm") if masks else ("bbox",)
        full = coco_evaluate(coco_ds.coco, entries, iou_types=iou_types, image_ids=image_ids)
        for iou_type in iou_types:
            for name, ap in full[iou_type]["per_class"].items():
                if not math.isnan(ap):
                    self.writer.add_scalar(f"val_AP_per_class/{iou_type}/{name}", ap, it)
        for name, c in pr_curves(coco_ds.coco, entries, image_ids, iou_type=iou_types[-1]).items():
            # add_pr_curve_raw wants thresholds from high recall to low: its arrays run over
            # increasing thresholds, as ours do. True negatives do not exist in detection.
            self.writer.add_pr_curve_raw(
                f"val_pr/{name}",
                c.tp,
                c.fp,
                np.zeros_like(c.tp),
                c.fn,
                c.precision,
                c.recall,
                it,
                num_thresholds=len(c.thresholds),
            )
        self._images(coco_ds, image_ids[: self.num_images], entries, it)
        self.writer.flush()
        self.last_logged = it

    def _predict(self, trainer: Any, coco_ds: Any, image_ids: list[int]) -> list[dict]:
        from ..evaluation.coco import coco_results

        model = trainer.model
        was_training = model.training
        try:
            return coco_results(model, coco_ds.coco, coco_ds.image_dir, image_ids=image_ids)
        finally:
            model.train(was_training)

    def _images(self, coco_ds: Any, image_ids: list[int], entries: list[dict], it: int) -> None:
        import io

        from PIL import Image

        from ..data.images import load_rgb
        from ..evaluation.analysis import side_by_side

        coco = coco_ds.coco
        names = {c: coco.cats[c].get("name", str(c)) for c in coco.getCatIds()}
        for k, image_id in enumerate(image_ids):
            gts = [
                {**a, "segmentation": coco.annToRLE(a)}
                for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
                if not a.get("iscrowd", 0)
            ]
            dets = [e for e in entries if e["image_id"] == image_id and e["score"] >= self.score_thresh]
            file_name = coco.imgs[image_id]["file_name"]
            png = side_by_side(load_rgb(coco_ds.image_dir / file_name), gts, dets, names, file_name)
            with Image.open(io.BytesIO(png)) as im:
                self.writer.add_image(f"val_images/{k}", np.asarray(im.convert("RGB")), it, dataformats="HWC")

    def after_train(self, trainer: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def state_dict(self) -> dict[str, Any]:
        return {"last_logged": self.last_logged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_logged = int(state.get("last_logged", -1))
