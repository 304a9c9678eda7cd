"""The datasets of a training run, as its config names them."""

from __future__ import annotations

import logging

from torch.utils.data import Dataset, Subset

from ..data import CocoDataset, ensure_dataset
from ..data.normalize import check_percentiles
from .config import TrainConfig

log = logging.getLogger(__name__)


def build_datasets(cfg: TrainConfig) -> tuple[CocoDataset, Dataset, Dataset | None]:
    """(full training CocoDataset, training subset used, validation subset or None).

    ``data.synthetic`` generates the built-in dataset first (or reuses it); the subsets are the
    first ``data.max_train_images`` and ``eval.max_images`` images (0 = all).
    """
    d = cfg.data
    train_ann, train_images, val_ann, val_images = d.train_ann, d.train_images, d.val_ann, d.val_images
    if d.synthetic:
        paths = ensure_dataset(
            d.synthetic,
            d.synthetic_dir,
            num_train=d.synthetic_train,
            num_val=d.synthetic_val,
            image_size=tuple(d.synthetic_size),
        )
        train_ann, train_images = str(paths["train"].ann_file), str(paths["train"].image_dir)
        val_ann, val_images = str(paths["val"].ann_file), str(paths["val"].image_dir)
    percentiles = check_percentiles(cfg.model.transform.percentiles)  # read as predict will read them
    train = CocoDataset(train_ann, train_images, allow_outside_root=d.allow_outside_root, percentiles=percentiles)
    val = (
        CocoDataset(
            val_ann,
            val_images,
            category_ids=train.category_ids,
            allow_outside_root=d.allow_outside_root,
            percentiles=percentiles,
        )
        if val_ann
        else None
    )
    for dataset, n in ((train, d.max_train_images), (val, cfg.eval.max_images)):
        if dataset is not None:  # every image file now, not when its batch comes up
            dataset.validate(decode=False, first=n)
    log.info("training data: %r", train)
    if val is not None:
        log.info("validation data: %r", val)
    return train, first(train, d.max_train_images), (first(val, cfg.eval.max_images) if val is not None else None)


def first(dataset: CocoDataset, n: int) -> Dataset:
    """The first ``n`` images of ``dataset`` (all for 0 or more than it holds)."""
    return Subset(dataset, range(n)) if 0 < n < len(dataset) else dataset


def coco_and_indices(dataset: Dataset) -> tuple[CocoDataset, list[int]]:
    """The CocoDataset under a ``first`` subset, and the indices of the images used."""
    if isinstance(dataset, Subset):
        return dataset.dataset, list(dataset.indices)  # type: ignore[return-value]
    return dataset, list(range(len(dataset)))  # type: ignore[arg-type, return-value]
