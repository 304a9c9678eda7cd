"""Training augmentation on ``(image, targets)`` pairs, keeping boxes and masks consistent.

Images are (3, H, W) float32 in [0, 1]; boxes (N, 4) x1 y1 x2 y2 in pixel-edge coordinates
(0 <= x1 < x2 <= W). Resizing is not done here: the model resizes (and, in training, picks a
random short side), so targets stay in the original image frame until then.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..structures import Targets

Transform = Callable[[Tensor, Targets], tuple[Tensor, Targets]]


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, targets: Targets) -> tuple[Tensor, Targets]:
        for t in self.transforms:
            image, targets = t(image, targets)
        return image, targets

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def flip(image: Tensor, targets: Targets, vertical: bool = False) -> tuple[Tensor, Targets]:
    """Mirror left-right: pixel column c goes to W - 1 - c, box edge x goes to W - x; with
    ``vertical``, up-down: row r goes to H - 1 - r, box edge y goes to H - y."""
    dim, (lo, hi) = (-2, (1, 3)) if vertical else (-1, (0, 2))
    size = image.shape[dim]
    boxes = targets.boxes.clone()
    boxes[:, lo] = size - targets.boxes[:, hi]
    boxes[:, hi] = size - targets.boxes[:, lo]
    masks = targets.masks.flip(dim) if targets.masks is not None else None
    return image.flip(dim), dataclasses.replace(targets, boxes=boxes, masks=masks)


def hflip(image: Tensor, targets: Targets) -> tuple[Tensor, Targets]:
    """``flip`` left-right."""
    return flip(image, targets)


class RandomHorizontalFlip:
    """Mirror image, boxes and masks left-right with probability ``p``.

    Args:
        p: flip probability.
        generator: torch RNG to draw from; default the global one (which DataLoader seeds
            differently in each worker).
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = p
        self.generator = generator

    def __call__(self, image: Tensor, targets: Targets) -> tuple[Tensor, Targets]:
        if torch.rand((), generator=self.generator).item() < self.p:
            return hflip(image, targets)
        return image, targets

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class FlipAugmented(Dataset):
    """``dataset`` with each image flipped left-right with probability ``p``.

    The coin for image ``i`` in epoch ``epoch`` is drawn from its own generator seeded with
    (seed, epoch, i), so augmentation is the same whichever worker or process loads the image
    and wherever a resumed run restarts. Set ``epoch`` before each epoch.
    """

    def __init__(self, dataset: Dataset, p: float, seed: int) -> None:
        self.dataset, self.p, self.seed, self.epoch = dataset, p, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        image, targets, info = self.dataset[i]
        if self.p > 0:
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**63)
            image, targets = RandomHorizontalFlip(self.p, generator=g)(image, targets)
        return image, targets, info


class ColorJitter:
    """Random brightness and contrast; geometry and targets untouched.

    Brightness multiplies the image by b ~ U[1 - brightness, 1 + brightness]; contrast
    blends with the image's mean gray level: m + c (x - m), c ~ U[1 - contrast, 1 + contrast].
    The result is clamped to [0, 1].
    """

    def __init__(
        self, brightness: float = 0.2, contrast: float = 0.2, generator: torch.Generator | None = None
    ) -> None:
        if not 0 <= brightness <= 1 or not 0 <= contrast <= 1:
            raise ValueError(f"brightness and contrast must be in [0, 1], got {brightness}, {contrast}")
        self.brightness = brightness
        self.contrast = contrast
        self.generator = generator

    def _factor(self, amount: float) -> float:
        u = torch.rand((), generator=self.generator).item()
        return 1.0 + amount * (2.0 * u - 1.0)

    def __call__(self, image: Tensor, targets: Targets) -> tuple[Tensor, Targets]:
        image = image * self._factor(self.brightness)
        # ITU-R 601 luma weights, as the usual RGB -> gray conversion.
        gray = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).mean()
        image = gray + self._factor(self.contrast) * (image - gray)
        return image.clamp_(0.0, 1.0), targets

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast})"
