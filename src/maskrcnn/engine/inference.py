"""Running a model over a COCO-annotated image set to get COCO results entries."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from pycocotools.coco import COCO
from tqdm import tqdm

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
) -> list[dict]:
    """Detections of ``model`` on every image of ``coco`` as COCO results entries (RLE masks).

    An image that cannot be read is logged and skipped; the others are still evaluated.
    """
    model.eval()
    ids = sorted(coco.getImgIds()) if image_ids is None else image_ids
    table = label_to_category(model)
    mask_thresh = model.config.roi_heads.mask_thresh
    entries: list[dict] = []
    for start in tqdm(range(0, len(ids), batch_size), desc="evaluate", unit="batch", disable=not progress, leave=False):
        chunk, arrays = [], []
        for image_id in ids[start : start + batch_size]:
            path = Path(image_dir) / coco.imgs[image_id]["file_name"]
            try:
                arrays.append(load_rgb(path))
                chunk.append(image_id)
            except Exception as e:  # one bad image never stops the run
                log.error("skipping %s: %s", path, e)
        if not chunk:
            continue
        out = model([to_tensor(a).to(model.device) for a in arrays], mask_threshold=mask_thresh)
        for image_id, array, det in zip(chunk, arrays, out.detections or []):
            result = Result.from_detections(det, array.shape[:2])
            entries.extend(result.to_coco(image_id, table))
    return entries
