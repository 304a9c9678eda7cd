"""Batching: aspect-ratio grouped batches and the collate function.

Grouping portrait and landscape images into separate batches keeps the zero padding of a
batch (padded to its largest height and width) small.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, Subset

from ..structures import Targets


def aspect_ratio_groups(dataset: Dataset) -> list[int]:
    """Group id of every image without decoding any: 0 if width / height < 1 (portrait), else 1.

    Args:
        dataset: anything with ``image_sizes() -> [(h, w), ...]`` (``CocoDataset``), or a
            ``torch.utils.data.Subset`` of one.
    """
    if isinstance(dataset, Subset):
        inner = aspect_ratio_groups(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if not hasattr(dataset, "image_sizes"):
        raise TypeError(f"{type(dataset).__name__} has no image_sizes(); cannot group by aspect ratio")
    return [0 if w / h < 1 else 1 for h, w in dataset.image_sizes()]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices from ``sampler`` in which every index has the same group id.

    Indices are buffered per group in the order ``sampler`` yields them, and a group's buffer
    is emitted as soon as it holds ``batch_size`` indices. At the end of the epoch the
    unfinished buffers are emitted as smaller batches (one per group, never mixed), or
    dropped with ``drop_last``; no index is repeated, so each index the sampler yields is in
    exactly one batch.

    Args:
        sampler: yields dataset indices (e.g. ``RandomSampler``).
        group_ids: group of dataset index i at position i.
        batch_size: images per batch.
        drop_last: drop the incomplete batch of each group.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        for index in self.sampler:
            buffer = buffers[self.group_ids[index]]
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield buffer.copy()
                buffer.clear()
        if not self.drop_last:
            for group in sorted(buffers):
                if buffers[group]:
                    yield buffers[group]

    def __len__(self) -> int:
        # A sampler as long as the dataset is taken to be a permutation of it (Sequential-
        # or RandomSampler), whose group sizes are known without drawing from it; any other
        # sampler is iterated once to count.
        if len(self.sampler) == len(self.group_ids):  # type: ignore[arg-type]
            indices: Any = range(len(self.group_ids))
        else:
            indices = list(self.sampler)
        counts: dict[int, int] = defaultdict(int)
        for index in indices:
            counts[self.group_ids[index]] += 1
        if self.drop_last:
            return sum(n // self.batch_size for n in counts.values())
        return sum(-(-n // self.batch_size) for n in counts.values())


def epoch_batches(num_images: int, groups: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation drawn from ``seed`` and ``epoch`` only, grouped
    by aspect ratio. Regenerating it is how a resumed run finds its place in the epoch."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_images, generator=g).tolist()
    return list(GroupedBatchSampler(order, groups, batch_size))  # type: ignore[arg-type]


def collate(batch: Sequence[tuple[Tensor, Targets, dict[str, Any]]]) -> tuple[list[Tensor], list[Targets], list[dict[str, Any]]]:
    """DataLoader ``collate_fn``: lists of images (3, H_i, W_i), targets and info dicts.

    Images keep their own sizes; the model pads them into one batch tensor.
    """
    images, targets, infos = zip(*batch) if batch else ((), (), ())
    return list(images), list(targets), list(infos)
