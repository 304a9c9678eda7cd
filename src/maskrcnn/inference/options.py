"""How a model is run over images: one frozen, validated object instead of a bundle of arguments
passed down by hand.

``PredictOptions`` is the single owner of the prediction thresholds, batching, pixel limit,
precision and tiling. It is checked once, when made (a bad value is a one-line ValueError
before any image is read), and every stage (``Predictor``, tiling, video, evaluation,
``maskrcnn predict``) reads the same object.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from ..config import check_probability
from ..data.images import MAX_PIXELS, TILED_MAX_PIXELS
from ..precision import PRECISIONS
from . import tiling


@dataclass(frozen=True)
class PredictOptions:
    """Options of a prediction run (``model.predict(images, **options)``, ``Predictor``).

    Thresholds: the model drops detections whose class probability is not above its config's
    ``roi_heads.score_thresh`` (0.05 for torchvision's weights: torchvision's own rule, kept
    for parity). ``score_thresh`` here keeps detections scoring at least this: above the
    model's threshold it filters them; below it, it also lets lower-scored candidates through
    the model's NMS.
    """

    score_thresh: float | None = None  # keep detections scoring >= this (None: the model's threshold)
    mask_thresh: float | None = None  # mask probability above which a pixel is the object's (None: config, 0.5)
    batch_size: int = 1  # images (or tiles) per forward pass, at most; only same-size images share one
    max_pixels: int | None = MAX_PIXELS  # refuse image files with more pixels (None: no limit)
    precision: str = "fp32"  # fp32 (torchvision's numbers), auto, bf16, fp16 (CUDA): see maskrcnn.precision
    tile: int | None = None  # cut each image into tile x tile tiles at native resolution, merge across borders
    tile_overlap: float = 0.2  # fraction of a tile that neighbours share, in [0, tiling.MAX_TILE_OVERLAP]
    tile_whole: bool = False  # with tile: one more pass over the whole image shrunk to a tile
    keep_images: bool = True  # keep the pixels (or a tiled image's preview) in each Result for .plot()
    progress: bool = False  # with tile: a progress bar per image counting its tiles

    def __post_init__(self) -> None:
        check_probability("score threshold", self.score_thresh)
        check_probability("mask threshold", self.mask_thresh)
        if not _whole(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}")
        if self.max_pixels is not None and (not _whole(self.max_pixels) or self.max_pixels < 1):
            raise ValueError(f"max_pixels must be a whole number >= 1 or None, got {self.max_pixels!r}")
        if (self.precision or "fp32") not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        tiling.check_options(self.tile, self.tile_overlap, self.tile_whole)
        tiling.check_tiling(tiling.MIN_TILE, self.tile_overlap)  # also without tile: a replace(tile=...) keeps it

    def replace(self, **changes: object) -> PredictOptions:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def pixel_limit(self) -> int | None:
        """The limit on image files: a tiled run never holds the whole image as one array, so
        the default limit (Pillow's) is raised to ``TILED_MAX_PIXELS``; a limit the user set stays."""
        if self.tile is not None and self.max_pixels == MAX_PIXELS:
            return TILED_MAX_PIXELS
        return self.max_pixels


def _whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
