"""Running a model over a COCO-annotated image set to get COCO results entries."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from pycocotools.coco import COCO
from tqdm import tqdm

from ..data.coco import image_path
from ..data.errors import DatasetError
from ..data.images import load_rgb, to_tensor
from ..model.mask_rcnn import MaskRCNN
from ..results import Result

log = logging.getLogger(__name__)


def label_to_category(model: MaskRCNN) -> list[int]:
    """Table label -> dataset category id (index 0 unused); identity without ``category_ids``."""
    ids = model.config.category_ids
    return [0, *ids] if ids else list(range(model.config.num_classes + 1))


@torch.inference_mode()
def coco_results(
    model: MaskRCNN,
    coco: COCO,
    image_dir: str | Path,
    batch_size: int = 1,
    progress: bool = True,
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
    ground truth too.
    """
    model.eval()
    ids = sorted(coco.getImgIds()) if image_ids is None else image_ids
    table = label_to_category(model)
    mask_thresh = model.config.roi_heads.mask_thresh
    entries: list[dict] = []
    for start in tqdm(range(0, len(ids), batch_size), desc="evaluate", unit="batch", disable=not progress, leave=False):
        chunk, arrays = [], []
        for image_id in ids[start : start + batch_size]:
            path = image_path(image_dir, coco.imgs[image_id]["file_name"], allow_outside_root, f"image id {image_id}")
            try:
                arrays.append(load_rgb(path))
                chunk.append(image_id)
            except DatasetError as e:
                if skipped is None:
                    raise
                log.error("skipping %s", e)
                skipped.append(image_id)
        if not chunk:
            continue
        out = model([to_tensor(a).to(model.device) for a in arrays], mask_threshold=mask_thresh)
        for image_id, array, det in zip(chunk, arrays, out.detections or []):
            result = Result.from_detections(det, array.shape[:2])
            entries.extend(result.to_coco(image_id, table))
    return entries
