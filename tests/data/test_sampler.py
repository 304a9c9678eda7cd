from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler, Subset, SubsetRandomSampler

from maskrcnn.data import CocoDataset, GroupedBatchSampler, aspect_ratio_groups, collate
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
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 0, 5, 5]]}],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    ds = CocoDataset(tmp_path / "a.json", tmp_path / "no-images-needed")
    assert aspect_ratio_groups(ds) == [1, 0, 1]
    assert aspect_ratio_groups(Subset(ds, [2, 1])) == [1, 0]
    with pytest.raises(TypeError, match="image_sizes"):
        aspect_ratio_groups(list(range(3)))  # type: ignore[arg-type]


def test_collate() -> None:
    batch = [(torch.zeros(3, 4, 5), Targets.empty(4, 5), {"image_id": 1}),
             (torch.zeros(3, 6, 2), Targets.empty(6, 2), {"image_id": 2})]
    images, targets, infos = collate(batch)
    assert [im.shape[1:] for im in images] == [(4, 5), (6, 2)]
    assert len(targets) == 2 and infos == [{"image_id": 1}, {"image_id": 2}]


def test_data_loader_with_workers(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from maskrcnn.data import RandomHorizontalFlip, generate_shapes

    paths = generate_shapes(tmp_path, num_train=10, num_val=0, image_size=(64, 96), seed=1)
    ds = CocoDataset(paths["train"].ann_file, paths["train"].image_dir, transforms=RandomHorizontalFlip())
    groups = aspect_ratio_groups(ds)
    loader = DataLoader(ds, batch_sampler=GroupedBatchSampler(RandomSampler(ds), groups, 3),
                        collate_fn=collate, num_workers=2)
    seen = []
    for images, targets, infos in loader:
        assert len(images) == len(targets) == len(infos) <= 3
        assert len({0 if im.shape[2] / im.shape[1] < 1 else 1 for im in images}) == 1
        seen += [info["image_id"] for info in infos]
    assert sorted(seen) == list(range(1, 11))
