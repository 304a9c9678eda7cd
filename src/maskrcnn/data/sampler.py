"""Batching: aspect-ratio grouped batches, their share in each process of a distributed run,
and the collate function.

Grouping portrait and landscape images into separate batches keeps the zero padding of a
batch (padded to its largest height and width) small.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

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

    def __init__(
        self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int, drop_last: bool = False
    ) -> None:
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


class DistributedGroupedBatchSampler(Sampler[list[int]]):
    """This process's batches of one epoch, grouped by aspect ratio, in an order drawn from
    (``seed``, epoch) only.

    The epoch's permutation is cut into batches of ``batch_size * world_size`` images of one
    group (``GroupedBatchSampler``), and each of those is split into ``world_size`` equal
    shares: process ``rank`` gets share ``rank`` as its batch of ``batch_size``. So every
    process has the same number of batches, each of one aspect-ratio group, and together they
    step through the same images that one process would with the larger batch. A group's last,
    incomplete batch of n images is padded to a multiple of ``world_size`` by repeating its own
    first images, each share ceil(n / world_size) long (as ``DistributedSampler`` pads); with
    one process nothing is padded and the batches are ``GroupedBatchSampler``'s over the
    permutation.

    ``set_epoch(epoch, start)`` before each epoch: ``start`` skips the batches already done,
    which is how a resumed run finds its place (the order is regenerated, never stored).

    Args:
        group_ids: group of dataset index i at position i (``aspect_ratio_groups``).
        batch_size: images per batch in each process.
        seed: with the epoch, the only source of the order.
        rank, world_size: this process and how many there are.
    """

    def __init__(
        self, group_ids: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.group_ids = list(group_ids)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def batches_per_epoch(self) -> int:
        return len(GroupedBatchSampler(range(len(self.group_ids)), self.group_ids, self.batch_size * self.world_size))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.group_ids), generator=g).tolist()
        batches = list(GroupedBatchSampler(order, self.group_ids, self.batch_size * self.world_size))  # type: ignore[arg-type]
        for batch in batches[self.start :]:
            share = -(-len(batch) // self.world_size)  # ceil
            padded = (batch * self.world_size)[: share * self.world_size]
            yield padded[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start)


def collate(
    batch: Sequence[tuple[Tensor, Targets, dict[str, Any]]],
) -> tuple[list[Tensor], list[Targets], list[dict[str, Any]]]:
    """DataLoader ``collate_fn``: lists of images (3, H_i, W_i), targets and info dicts.

    Images keep their own sizes; the model pads them into one batch tensor.
    """
    images, targets, infos = zip(*batch) if batch else ((), (), ())
    return list(images), list(targets), list(infos)
