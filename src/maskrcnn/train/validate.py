"""Validation during training: the stage's losses and COCO AP in one pass over the validation set.

In a distributed run each process predicts its own contiguous share of the images
(``distributed.shard``: nothing padded, so no image is counted twice), process 0 gathers the
loss sums and the COCO entries and runs COCO eval once, and every process gets its numbers
(they decide early stopping and the best checkpoint in each).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..data import collate
from ..evaluation.coco import coco_evaluate, flatten_metrics
from ..inference.options import PredictOptions
from ..inference.predictor import Predictor
from ..inference.results import Result
from ..model.mask_rcnn import MaskRCNN
from ..structures import Targets
from . import distributed
from .config import TrainConfig
from .datasets import coco_and_indices
from .schedules import Stage, stage_loss
from .state import preserved_rng


@torch.no_grad()
def validate(
    model: MaskRCNN, stage: Stage, dataset: Dataset, cfg: TrainConfig, device: torch.device
) -> tuple[dict[str, float], list[Result]]:
    """Validation losses and COCO AP in one pass through the package's one inference loop
    (``Predictor.batches``): eval mode with targets gives both the losses and the
    detections.
    The RNG streams are left as they were, so validating never changes how training goes on.

    Returns:
        ``{"val_loss": sum of the stage's terms, "val_loss_<term>": ... (means over the
        batches), "bbox_AP": ..., "segm_AP": ...}`` and ``Result``s (with pixels) of this
        process's first ``eval.num_visualize`` images (process 0 has the set's first ones).
    """
    coco_ds, indices = coco_and_indices(dataset)
    loader = DataLoader(
        Subset(coco_ds, distributed.shard(indices)),
        batch_size=cfg.data.batch_size,
        collate_fn=collate,
        num_workers=cfg.data.workers,
    )
    sums: dict[str, float] = {}
    batches, entries, pictures = 0, [], []
    with preserved_rng():
        # The loader's batches stream through Predictor.batches: images in one argument, their
        # targets in the other, each batch's infos kept aside until its results come back.
        pending: collections.deque = collections.deque()

        def image_batches() -> Iterator[list[Tensor]]:
            for images, targets, infos in tqdm(
                loader, desc="validate", unit="batch", leave=False, disable=not cfg.progress or distributed.rank() != 0
            ):
                pending.append((targets, infos))
                yield images

        def target_batches() -> Iterator[list[Targets]]:
            while True:
                yield pending[0][0]

        predictor = Predictor(model, PredictOptions(precision=cfg.solver.amp))
        stream = predictor.batches(image_batches(), target_batches())
        for results, out_losses in stream:
            _, infos = pending.popleft()
            losses = {k: float(v) for k, v in out_losses.items()}
            losses["loss"] = float(stage_loss(stage, out_losses))
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
            for info, result in zip(infos, results):
                entries.extend(result.to_coco(info["image_id"]))
                if len(pictures) < cfg.eval.num_visualize:
                    pictures.append(result[result.scores >= cfg.eval.visualize_score])
    shares = distributed.gather((sums, batches, entries))
    metrics: dict[str, float] = {}
    if shares is not None:  # process 0
        total: dict[str, float] = {}
        for part, _, _ in shares:
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
        n = max(sum(b for _, b, _ in shares), 1)
        metrics = {"val_" + k: v / n for k, v in total.items()}
        iou_types = ("bbox", "segm") if model.config.masks else ("bbox",)
        image_ids = [coco_ds.image_ids[i] for i in indices]
        all_entries = [e for _, _, part in shares for e in part]
        metrics.update(
            flatten_metrics(coco_evaluate(coco_ds.coco, all_entries, iou_types=iou_types, image_ids=image_ids))
        )
    return distributed.from_first(metrics), pictures
