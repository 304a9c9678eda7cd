from __future__ import annotations

import torch

from maskrcnn.data import ColorJitter, Compose, RandomHorizontalFlip, hflip
from maskrcnn.structures import Targets


def _tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _sample(h: int = 12, w: int = 10) -> tuple[torch.Tensor, Targets]:
    masks = torch.zeros((2, h, w), dtype=torch.uint8)
    masks[0, 3:8, 2:6] = 1
    masks[1, 0:2, 7:10] = 1
    boxes = torch.tensor([_tight_box(m) for m in masks])
    image = torch.rand((3, h, w), generator=torch.Generator().manual_seed(0))
    return image, Targets(boxes=boxes, labels=torch.tensor([1, 2]), masks=masks)


def test_flip_by_hand() -> None:
    image, t = _sample()
    fi, ft = hflip(image, t)
    assert ft.boxes.tolist() == [[4.0, 3.0, 8.0, 8.0], [0.0, 0.0, 3.0, 2.0]]  # x1' = 10 - x2, x2' = 10 - x1
    assert torch.equal(fi[:, :, 0], image[:, :, -1])
    assert torch.equal(ft.labels, t.labels)


def test_flipped_box_is_box_of_flipped_mask() -> None:
    _, t = _sample()
    image = torch.zeros((3, 12, 10))
    _, ft = hflip(image, t)
    for box, mask in zip(ft.boxes, ft.masks):
        assert box.tolist() == _tight_box(mask)


def test_flip_twice_is_identity() -> None:
    image, t = _sample()
    fi, ft = hflip(*hflip(image, t))
    assert torch.equal(fi, image) and torch.equal(ft.boxes, t.boxes) and torch.equal(ft.masks, t.masks)


def test_flip_probability_and_empty_targets() -> None:
    image, t = _sample()
    assert torch.equal(RandomHorizontalFlip(p=0.0)(image, t)[0], image)
    assert torch.equal(RandomHorizontalFlip(p=1.0)(image, t)[0], image.flip(-1))
    flips = sum(
        bool(torch.equal(RandomHorizontalFlip(0.5, torch.Generator().manual_seed(s))(image, t)[0], image.flip(-1)))
        for s in range(40)
    )
    assert 8 < flips < 32
    empty = Targets.empty(12, 10)
    _, fe = RandomHorizontalFlip(p=1.0)(image, empty)
    assert fe.boxes.shape == (0, 4) and fe.masks.shape == (0, 12, 10)
    boxes_only = Targets(boxes=t.boxes, labels=t.labels)
    assert hflip(image, boxes_only)[1].masks is None


def test_color_jitter_and_compose() -> None:
    image, t = _sample()
    same, st = ColorJitter(0.0, 0.0)(image, t)
    assert torch.allclose(same, image) and st is t
    g = torch.Generator().manual_seed(1)
    jittered, jt = Compose([ColorJitter(0.5, 0.5, generator=g), RandomHorizontalFlip(p=1.0)])(image, t)
    assert jittered.shape == image.shape and 0.0 <= jittered.min() and jittered.max() <= 1.0
    assert not torch.allclose(jittered, image.flip(-1))
    assert jt.boxes.tolist() == hflip(image, t)[1].boxes.tolist()
