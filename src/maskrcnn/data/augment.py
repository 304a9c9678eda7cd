"""Training augmentation for small datasets: flips, 90-degree rotations, scale jitter, random
crops at native resolution and colour jitter, applied to image, boxes and masks together.

Shape shorthand: image (3, H, W) float32 in [0, 1]; boxes (N, 4) float32 x1 y1 x2 y2 in
pixel-edge coordinates; masks (N, H, W) uint8 {0, 1}; labels (N,) int64.

Flips and rotations move boxes exactly (a box stays the box it was, tight or not). Scaling and
cropping change which pixels an instance covers, so its box is then recomputed as the tight box
of its new mask (pixel edges: columns c0..c1 give x1 = c0, x2 = c1 + 1), and an instance whose
mask left the crop is dropped with its label. Box-only targets (masks None) are refused by the
geometric transforms that need masks.

Written in torch rather than with albumentations: the five transforms are a few lines each, and
this keeps the exact pixel-edge box rules of ``transforms.hflip`` and no extra dependency.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..structures import Targets
from .transforms import flip, hflip

# Draws of a random crop that must hold at least one instance before any crop is taken: a
# small object on a large photo is otherwise mostly missed, and an empty crop teaches little.
CROP_TRIES = 10


@dataclass
class AugmentConfig:
    """``augment`` section of the training config; all off by default (only ``data.hflip``)."""

    vflip: float = 0.0  # probability of an up-down flip
    rot90: float = 0.0  # probability of a rotation by 90, 180 or 270 degrees (one of the three, uniformly)
    scale: tuple[float, float] = (
        1.0,
        1.0,
    )  # image scaled by a factor drawn log-uniformly from this range (before cropping)
    crop: int = (
        0  # random crop of at most crop x crop pixels at native resolution (0 = off): large images train as tiles
    )
    brightness: float = 0.0  # multiply by b ~ U[1 - brightness, 1 + brightness]
    contrast: float = 0.0  # blend with the mean grey level by c ~ U[1 - contrast, 1 + contrast]
    saturation: float = 0.0  # blend with the grey image by s ~ U[1 - saturation, 1 + saturation]

    @property
    def enabled(self) -> bool:
        return self != AugmentConfig()

    def check(self) -> None:
        """ValueError naming the ``augment.*`` key of the first value out of range."""
        for key in ("vflip", "rot90"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"augment.{key} is a probability in [0, 1], got {getattr(self, key)}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi or not math.isfinite(hi):
            raise ValueError(f"augment.scale must be [low, high] with 0 < low <= high, got {list(self.scale)}")
        if self.crop < 0 or 0 < self.crop < 32:
            raise ValueError(f"augment.crop is 0 (off) or at least 32 pixels, got {self.crop}")
        for key in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"augment.{key} must be in [0, 1], got {getattr(self, key)}")


# ---- the transforms: pure functions of (image, targets) and their parameters ----------------


def tight_boxes(masks: Tensor) -> Tensor:
    """(N, 4) float32 pixel-edge boxes around the non-zero pixels of (N, H, W) masks.

    An empty mask gives (0, 0, 0, 0).
    """
    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    cols, rows = masks.bool().any(dim=1), masks.bool().any(dim=2)  # (N, W), (N, H)
    w, h = cols.shape[1], rows.shape[1]
    ar_w, ar_h = torch.arange(w), torch.arange(h)
    x1 = torch.where(cols, ar_w, w).min(dim=1).values
    x2 = torch.where(cols, ar_w + 1, 0).max(dim=1).values
    y1 = torch.where(rows, ar_h, h).min(dim=1).values
    y2 = torch.where(rows, ar_h + 1, 0).max(dim=1).values
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()  # (N, 4)
    return torch.where((x2 > 0).unsqueeze(1), boxes, torch.zeros_like(boxes))


def _refit(targets: Targets, masks: Tensor) -> Targets:
    """Targets with new masks, their tight boxes, and the instances whose mask is empty dropped."""
    keep = masks.flatten(1).bool().any(dim=1) if len(masks) else torch.zeros(0, dtype=torch.bool)
    return dataclasses.replace(targets, boxes=tight_boxes(masks[keep]), labels=targets.labels[keep], masks=masks[keep])


def _need_masks(targets: Targets, what: str) -> Tensor:
    if targets.masks is None:
        raise ValueError(f"{what} needs instance masks (box-only targets cannot be refitted)")
    return targets.masks


def vflip(image: Tensor, targets: Targets) -> tuple[Tensor, Targets]:
    """Mirror up-down (``transforms.flip``): pixel row r goes to H - 1 - r, box edge y goes to H - y."""
    return flip(image, targets, vertical=True)


def rot90(image: Tensor, targets: Targets, k: int = 1) -> tuple[Tensor, Targets]:
    """Rotate by k x 90 degrees counter-clockwise, as ``np.rot90(a, k, axes=(-2, -1))``.

    One quarter turn sends pixel (row r, column c) of a W-wide image to (W - 1 - c, r), so a
    box (x1, y1, x2, y2) becomes (y1, W - x2, y2, W - x1).
    """
    for _ in range(k % 4):
        width = image.shape[-1]
        b = targets.boxes
        boxes = torch.stack([b[:, 1], width - b[:, 2], b[:, 3], width - b[:, 0]], dim=1)  # (N, 4)
        masks = torch.rot90(targets.masks, 1, dims=(-2, -1)) if targets.masks is not None else None
        image = torch.rot90(image, 1, dims=(-2, -1))
        targets = dataclasses.replace(targets, boxes=boxes, masks=masks)
    return image.contiguous(), dataclasses.replace(
        targets, masks=targets.masks.contiguous() if targets.masks is not None else None
    )


def scale(image: Tensor, targets: Targets, factor: float) -> tuple[Tensor, Targets]:
    """Resize by ``factor`` (sizes rounded, at least 1 px): image bilinear (antialiased when
    shrinking), masks nearest; boxes refitted to the masks."""
    masks = _need_masks(targets, "scale")
    h, w = image.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=factor < 1)[0]
    if len(masks):
        masks = F.interpolate(masks[None].float(), size=size, mode="nearest-exact")[0].to(torch.uint8)  # (N, h', w')
    else:
        masks = masks.new_zeros((0, *size))
    return image.clamp_(0.0, 1.0), _refit(targets, masks)


def crop(image: Tensor, targets: Targets, top: int, left: int, height: int, width: int) -> tuple[Tensor, Targets]:
    """The window rows top..top+height, columns left..left+width; boxes refitted, instances
    left outside dropped."""
    masks = _need_masks(targets, "crop")
    window = (..., slice(top, top + height), slice(left, left + width))
    return image[window].contiguous(), _refit(targets, masks[window].contiguous())


def color(image: Tensor, brightness: float, contrast: float, saturation: float) -> Tensor:
    """Multiply by ``brightness``, blend with the mean grey level by ``contrast`` and with the
    grey image by ``saturation`` (1 = unchanged each); clamped to [0, 1]."""
    image = image * brightness
    gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]  # (H, W), ITU-R 601 luma
    image = gray.mean() + contrast * (image - gray.mean())
    gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    image = gray + saturation * (image - gray)
    return image.clamp_(0.0, 1.0)


# ---- the random pipeline -----------------------------------------------------------------------


class Augment:
    """Draws and applies the transforms of an ``AugmentConfig`` (and ``hflip``), in the order
    hflip, vflip, rot90, scale, crop, colour.

    Args:
        cfg: which transforms, how strong.
        hflip: probability of a left-right flip (``data.hflip``).
    """

    def __init__(self, cfg: AugmentConfig, hflip: float = 0.0) -> None:
        cfg.check()
        self.cfg, self.hflip = cfg, hflip

    def __call__(self, image: Tensor, targets: Targets, generator: torch.Generator) -> tuple[Tensor, Targets]:
        cfg = self.cfg

        def uniform(lo: float = 0.0, hi: float = 1.0) -> float:
            return lo + (hi - lo) * torch.rand((), generator=generator).item()

        if uniform() < self.hflip:
            image, targets = hflip(image, targets)
        if uniform() < cfg.vflip:
            image, targets = vflip(image, targets)
        if uniform() < cfg.rot90:
            image, targets = rot90(image, targets, int(torch.randint(1, 4, (), generator=generator)))
        lo, hi = cfg.scale
        if hi > lo or lo != 1.0:
            image, targets = scale(image, targets, math.exp(uniform(math.log(lo), math.log(hi))))
        if cfg.crop:
            image, targets = self._random_crop(image, targets, generator)
        if cfg.brightness or cfg.contrast or cfg.saturation:
            b, c, s = (uniform(1 - a, 1 + a) for a in (cfg.brightness, cfg.contrast, cfg.saturation))
            image = color(image, b, c, s)
        return image, targets

    def _random_crop(self, image: Tensor, targets: Targets, generator: torch.Generator) -> tuple[Tensor, Targets]:
        h, w = image.shape[-2:]
        ch, cw = min(h, self.cfg.crop), min(w, self.cfg.crop)
        if (ch, cw) == (h, w):
            return image, targets
        for _ in range(CROP_TRIES):
            top = int(torch.randint(0, h - ch + 1, (), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (), generator=generator))
            out = crop(image, targets, top, left, ch, cw)
            if len(out[1]) or not len(targets):
                break
        return out

    def __repr__(self) -> str:
        return f"Augment({self.cfg}, hflip={self.hflip})"


class Augmented(Dataset):
    """``dataset`` with ``Augment`` applied to every item.

    As ``transforms.FlipAugmented``: image ``i`` of epoch ``epoch`` draws from its own
    generator seeded with (seed, epoch, i), so augmentation does not depend on the worker or
    on where a resumed run restarts. Set ``epoch`` before each epoch.
    """

    def __init__(self, dataset: Dataset, cfg: AugmentConfig, hflip: float, seed: int) -> None:
        self.dataset, self.augment, self.seed, self.epoch = dataset, Augment(cfg, hflip), seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        image, targets, info = self.dataset[i]
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**63)
        image, targets = self.augment(image, targets, g)
        return image, targets, info
