from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler, Subset, SubsetRandomSampler

from maskrcnn.data import CocoDataset, DistributedGroupedBatchSampler, GroupedBatchSampler, aspect_ratio_groups, collate
from maskrcnn.structures import Targets


def _check(batches: list[list[int]], groups: list[int], expected: list[int], batch_size: int) -> None:
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(expected)  # every index exactly once
    for b in batches:
        assert 1 <= len(b) <= batch_size
        assert len({groups[i] for i in b}) == 1  # never mixes groups


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_grouped_batches_cover_every_index_once(batch_size: int) -> None:
    g = torch.Generator().manual_seed(batch_size)
    groups = torch.randint(0, 2, (37,), generator=g).tolist()
    sampler = GroupedBatchSampler(RandomSampler(range(37), generator=g), groups, batch_size)
    for _ in range(3):  # epochs
        batches = list(sampler)
        _check(batches, groups, list(range(37)), batch_size)
        assert len(batches) == len(sampler)
        # At most one incomplete batch per group.
        assert sum(len(b) < batch_size for b in batches) <= 2


def test_drop_last_and_single_group() -> None:
    groups = [0] * 7 + [1] * 5
    batches = list(GroupedBatchSampler(SequentialSampler(range(12)), groups, 3, drop_last=True))
    assert batches == [[0, 1, 2], [3, 4, 5], [7, 8, 9]]
    assert len(GroupedBatchSampler(SequentialSampler(range(12)), groups, 3, drop_last=True)) == 3
    assert list(GroupedBatchSampler(SequentialSampler(range(4)), [1] * 4, 3)) == [[0, 1, 2], [3]]


def test_subset_sampler() -> None:
    groups = [0, 1] * 10
    indices = [0, 1, 2, 3, 5, 7, 9, 11]
    sampler = GroupedBatchSampler(SubsetRandomSampler(indices), groups, 2)
    batches = list(sampler)
    _check(batches, groups, indices, 2)
    assert len(sampler) == len(batches) == 4  # group 0: {0, 2} -> 1 batch; group 1: 6 indices -> 3
    with pytest.raises(ValueError):
        GroupedBatchSampler(SequentialSampler(range(3)), [0, 0, 0], 0)


def test_aspect_ratio_groups_from_json_sizes(tmp_path: Path) -> None:
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 30, "height": 20},  # landscape
            {"id": 2, "file_name": "b.png", "width": 20, "height": 30},  # portrait
            {"id": 3, "file_name": "c.png", "width": 20, "height": 20},  # square counts as landscape
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 0, 5, 5]]}
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    ds = CocoDataset(tmp_path / "a.json", tmp_path / "no-images-needed")
    assert aspect_ratio_groups(ds) == [1, 0, 1]
    assert aspect_ratio_groups(Subset(ds, [2, 1])) == [1, 0]
    with pytest.raises(TypeError, match="image_sizes"):
        aspect_ratio_groups(list(range(3)))  # type: ignore[arg-type]


def test_collate() -> None:
    batch = [
        (torch.zeros(3, 4, 5), Targets.empty(4, 5), {"image_id": 1}),
        (torch.zeros(3, 6, 2), Targets.empty(6, 2), {"image_id": 2}),
    ]
    images, targets, infos = collate(batch)
    assert [im.shape[1:] for im in images] == [(4, 5), (6, 2)]
    assert len(targets) == 2 and infos == [{"image_id": 1}, {"image_id": 2}]


def test_data_loader_with_workers(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from maskrcnn.data import RandomHorizontalFlip, generate_shapes

    paths = generate_shapes(tmp_path, num_train=10, num_val=0, image_size=(64, 96), seed=1)
    ds = CocoDataset(paths["train"].ann_file, paths["train"].image_dir, transforms=RandomHorizontalFlip())
    groups = aspect_ratio_groups(ds)
    loader = DataLoader(
        ds, batch_sampler=GroupedBatchSampler(RandomSampler(ds), groups, 3), collate_fn=collate, num_workers=2
    )
    seen = []
    for images, targets, infos in loader:
        assert len(images) == len(targets) == len(infos) <= 3
        assert len({0 if im.shape[2] / im.shape[1] < 1 else 1 for im in images}) == 1
        seen += [info["image_id"] for info in infos]
    assert sorted(seen) == list(range(1, 11))


# ---------------------------------------------------------------------------------------
# The distributed grouped sampler


def _shares(groups: list[int], batch_size: int, world: int, epoch: int = 0, start: int = 0) -> list[list[list[int]]]:
    """Every process's batches of one epoch: [rank][k] -> batch."""
    out = []
    for rank in range(world):
        s = DistributedGroupedBatchSampler(groups, batch_size, seed=7, rank=rank, world_size=world)
        s.set_epoch(epoch, start)
        out.append(list(s))
        assert len(out[-1]) == len(s)
    return out


def test_distributed_batches_by_hand():
    # group 0 = {0, 1, 2}, group 1 = {3, 4}; 2 processes of 1 image: steps of 2 images of one
    # group, so group 0 leaves one image over, which both processes get (padding).
    groups = [0, 0, 0, 1, 1]
    rank0, rank1 = _shares(groups, batch_size=1, world=2)
    assert len(rank0) == len(rank1) == 3
    pairs = [a + b for a, b in zip(rank0, rank1)]
    assert all(len({groups[i] for i in pair}) == 1 for pair in pairs)  # a step never mixes groups
    assert sorted({i for pair in pairs for i in pair}) == [0, 1, 2, 3, 4]  # every image, in one epoch
    assert sorted(len(set(pair)) for pair in pairs) == [1, 2, 2]  # one step is the padded one: the same image twice


@pytest.mark.parametrize("world, batch_size", [(2, 1), (2, 2), (3, 2), (4, 3)])
def test_distributed_batches_step_through_the_images_of_one_larger_batch(world: int, batch_size: int) -> None:
    groups = torch.randint(0, 2, (37,), generator=torch.Generator().manual_seed(world * 10 + batch_size)).tolist()
    shares = _shares(groups, batch_size, world, epoch=3)
    alone = _shares(groups, batch_size * world, 1, epoch=3)[0]  # one process, the combined batch
    assert all(len(r) == len(alone) for r in shares)  # the same number of steps in every process
    for k, whole in enumerate(alone):
        step = [s[k] for s in shares]
        assert len({len(b) for b in step}) == 1 and 1 <= len(step[0]) <= batch_size
        assert set(i for b in step for i in b) == set(whole)  # the same images, the padding repeating some
        assert len(step[0]) * world - len(whole) < world
        assert len({groups[i] for b in step for i in b}) == 1


def test_distributed_batches_are_a_function_of_seed_and_epoch():
    groups = [i % 2 for i in range(20)]
    first = _shares(groups, 2, 2, epoch=1)
    assert _shares(groups, 2, 2, epoch=1) == first  # regenerated, never stored
    assert _shares(groups, 2, 2, epoch=2) != first
    assert _shares(groups, 2, 2, epoch=1, start=2) == [r[2:] for r in first]  # a resumed epoch skips what was done
    alone = _shares(groups, 2, 1, epoch=1)[0]
    assert sorted(i for b in alone for i in b) == list(range(20))  # one process: every image once, no padding
