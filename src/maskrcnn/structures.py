"""Fixed-schema containers passed between the stages of the model.

Boxes everywhere are float32 ``(x1, y1, x2, y2)`` in pixels of one named frame: the *resized*
frame inside the model (after preprocessing) and the *original* image frame in everything
returned to a user. Labels are contiguous class indices ``1..num_classes``; index 0 is
background and never appears in targets or detections.

Shape shorthand: N instances, H x W image, B images in a batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T", bound="_Instances")


class _Instances:
    """Mixin for dataclasses whose tensor fields share a first dimension N.

    Gives ``len``, indexing of every tensor field at once (int, slice, bool mask or index
    tensor) and ``.to(device)``. Non-tensor fields (e.g. class names) are carried unchanged.
    """

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def __len__(self) -> int:
        return int(getattr(self, dataclasses.fields(self)[0].name).shape[0])

    def __getitem__(self: T, index: Any) -> T:
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        changes = {name: getattr(self, name)[index] for name in self._tensor_fields()}
        return dataclasses.replace(self, **changes)

    def to(self: T, device: torch.device | str) -> T:
        changes = {name: getattr(self, name).to(device) for name in self._tensor_fields()}
        return dataclasses.replace(self, **changes)


@dataclass
class Targets(_Instances):
    """Ground truth for one image.

    Attributes:
        boxes: (N, 4) float32 x1 y1 x2 y2 in pixels, x1 < x2, y1 < y2.
        labels: (N,) int64 contiguous class indices in 1..num_classes.
        masks: (N, H, W) uint8 {0, 1} full-image instance masks, or None for box-only data.
    """

    boxes: Tensor
    labels: Tensor
    masks: Tensor | None = None

    @staticmethod
    def empty(height: int, width: int, with_masks: bool = True) -> Targets:
        return Targets(
            boxes=torch.zeros((0, 4), dtype=torch.float32),
            labels=torch.zeros((0,), dtype=torch.int64),
            masks=torch.zeros((0, height, width), dtype=torch.uint8) if with_masks else None,
        )


@dataclass
class Detections(_Instances):
    """Detections for one image.

    Attributes:
        boxes: (N, 4) float32 x1 y1 x2 y2, sorted by decreasing score.
        scores: (N,) float32 class probabilities in [0, 1].
        labels: (N,) int64 class indices 1..num_classes (COCO category ids for a
            torchvision COCO checkpoint, whose 91 slots are the category ids).
        masks: (N, M, M) float32 mask probabilities over each box (pasted into the image
            only by ``Result.from_detections`` or ``ops.paste_masks``), or None when the model
            has no mask head.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor | None = None

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Detections:
        return Detections(
            boxes=torch.zeros((0, 4), device=device),
            scores=torch.zeros((0,), device=device),
            labels=torch.zeros((0,), dtype=torch.int64, device=device),
        )


@dataclass
class ImageBatch:
    """Preprocessed images: normalised, resized and zero-padded to one tensor.

    Attributes:
        tensors: (B, 3, Hp, Wp) float32, Hp and Wp multiples of the size divisor.
        image_sizes: (h, w) of each resized image inside the padding.
        original_sizes: (h, w) of each image as given by the caller.
    """

    tensors: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.image_sizes)

    def to(self, device: torch.device | str) -> ImageBatch:
        return dataclasses.replace(self, tensors=self.tensors.to(device))


@dataclass
class ModelOutput:
    """What ``MaskRCNN.forward`` returns, in training and in eval mode alike.

    Attributes:
        losses: name -> scalar loss; filled whenever targets were given, empty otherwise.
        detections: one ``Detections`` per image, boxes in the original frame, per-box masks;
            filled in eval mode, None in training mode.
    """

    losses: dict[str, Tensor] = field(default_factory=dict)
    detections: list[Detections] | None = None

    @property
    def total_loss(self) -> Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]
