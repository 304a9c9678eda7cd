"""Preprocessing (normalise, resize, pad into a batch) and the way back to the original frame.

Images enter as (3, H, W) float tensors with values in 0..1 (or uint8). Resizing follows
torchvision exactly (bilinear, scale = min(min_size / short side, max_size / long side), output
size floor(side * scale)), because the parity with its checkpoints depends on it; or, with
``resize="detectron2"``, Detectron2's ``ResizeShortestEdge`` (sides rounded to nearest, PIL
bilinear on the uint8 pixels, before normalisation), which its checkpoints were evaluated with.

Shape shorthand: B images, Hp x Wp padded batch size.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..structures import Detections, ImageBatch, Targets


def resize_scale(h: int, w: int, min_size: float, max_size: float) -> float:
    """Scale that brings the short side to ``min_size`` unless the long side exceeds ``max_size``."""
    return min(min_size / min(h, w), max_size / max(h, w))


def resized_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """floor(side * scale), as torchvision's ``F.interpolate(scale_factor=scale,
    recompute_scale_factor=True)`` computes it, but at least 1 pixel: a 5000 x 1 strip scaled
    by 0.27 would otherwise be 0 pixels wide and the resize would fail. Interpolating to this
    size equals the scale-factor call (both sample at input/output size ratios)."""
    return max(1, math.floor(float(h) * scale)), max(1, math.floor(float(w) * scale))


def detectron2_resized_size(h: int, w: int, short: float, max_size: float) -> tuple[int, int]:
    """Detectron2's ``ResizeShortestEdge.get_output_shape``, in its evaluation order: the short
    side becomes ``short``, the long side is scaled with it and capped at ``max_size``, then both
    are rounded half up (768 x 576 -> 1067 x 800, where torchvision's floor gives 1066)."""
    size = float(short)
    scale = size / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > max_size:
        scale = float(max_size) / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return max(1, int(newh + 0.5)), max(1, int(neww + 0.5))


def pil_resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(3, H, W) uint8 -> (3, h, w) uint8 with PIL's bilinear filter, as Detectron2's
    ``ResizeTransform`` resizes uint8 images (PIL antialiases when shrinking, unlike
    ``F.interpolate``)."""
    array = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())  # (H, W, 3)
    out = np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR))  # (h, w, 3)
    return torch.from_numpy(out.copy()).permute(2, 0, 1).to(image.device)


def padded_size(side: int, divisor: int) -> int:
    """The smallest multiple of ``divisor`` that holds ``side`` (integer arithmetic only, so
    that an ONNX trace, where ``side`` is a 0-dim tensor, keeps it a function of the input)."""
    return (side + divisor - 1) // divisor * divisor


def resize_boxes(boxes: Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Tensor:
    """Rescale (N, 4) x1 y1 x2 y2 boxes from one image size to another."""
    ry = torch.tensor(to_hw[0], dtype=torch.float32) / torch.tensor(from_hw[0], dtype=torch.float32)
    rx = torch.tensor(to_hw[1], dtype=torch.float32) / torch.tensor(from_hw[1], dtype=torch.float32)
    scale = torch.stack([rx, ry, rx, ry]).to(boxes.device)
    return boxes * scale


class Preprocessor(nn.Module):
    """Args:
    min_size: short-side sizes; training picks one at random per image (multi-scale
        augmentation), inference uses the last.
    max_size: cap on the long side.
    image_mean, image_std: per-channel normalisation, in the channel order and units below.
    size_divisible: the padded batch is a multiple of this.
    bgr: reverse the channels to B, G, R before normalising (Detectron2's MSRA weights).
    pixel_scale: white's value before normalisation: 1.0, or 255.0 as Detectron2.
    resize: "torchvision" or "detectron2" (see the module docstring).
    """

    def __init__(
        self,
        min_size: tuple[int, ...] = (800,),
        max_size: int = 1333,
        image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        image_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        size_divisible: int = 32,
        bgr: bool = False,
        pixel_scale: float = 1.0,
        resize: str = "torchvision",
    ) -> None:
        super().__init__()
        if resize not in ("torchvision", "detectron2"):
            raise ValueError(f"resize must be 'torchvision' or 'detectron2', got {resize!r}")
        self.bgr = bgr
        self.pixel_scale = float(pixel_scale)
        self.resize = resize
        self.min_size = tuple(min_size)
        self.max_size = max_size
        self.register_buffer("mean", torch.tensor(image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(3, 1, 1), persistent=False)
        self.size_divisible = size_divisible

    def forward(
        self, images: list[Tensor], targets: list[Targets] | None = None
    ) -> tuple[ImageBatch, list[Targets] | None]:
        """Normalise, resize and batch ``images``; bring ``targets`` into the resized frame.

        ``images`` are (3, H, W) floats in 0..1, or uint8 in 0..255 (divided by 255 here: the
        same numbers as ``data.images.to_tensor``, at a quarter of the caller's memory).
        """
        resized, out_targets = [], []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i}: expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
            min_size = random.choice(self.min_size) if self.training else self.min_size[-1]
            h, w = image.shape[-2:]
            if h == 0 or w == 0:
                raise ValueError(f"image {i}: has no pixels (size {h}x{w})")
            if self.resize == "detectron2":
                x = self._detectron2_input(image, detectron2_resized_size(h, w, min_size, self.max_size))
            else:
                x = self._torchvision_input(image, resize_scale(h, w, float(min_size), float(self.max_size)))
            resized.append(x)
            if targets is not None:
                out_targets.append(self._resize_targets(targets[i], (h, w), tuple(x.shape[-2:])))
        batch = self.batch(resized)
        batch.original_sizes = [tuple(im.shape[-2:]) for im in images]
        return batch, (out_targets if targets is not None else None)

    def _torchvision_input(self, image: Tensor, scale: float) -> Tensor:
        """Normalise, then bilinear-interpolate to floor(side * scale): (3, h, w) float32."""
        h, w = image.shape[-2:]
        if self.bgr or self.pixel_scale != 1.0:
            x = self._channels_and_units(image).sub_(self.mean).div_(self.std)
        else:
            # Resize, then normalise: the same numbers to float rounding (both steps are affine
            # per channel), without two full-resolution temporaries (576 MB for a 24 MP photo).
            # Normalise at full size, then resize, as torchvision does: the other order is the
            # same to float rounding, but moved a parity mask logit from 0.009 to 0.011 off.
            if image.dtype == torch.uint8:  # /255 here, so a caller holds 1 byte a pixel, not 4
                x = image.float().div_(255.0).sub_(self.mean).div_(self.std)
            else:
                x = image.sub(self.mean).div_(self.std)  # one full-size temporary, not two
        return F.interpolate(x[None], size=resized_size(h, w, scale), mode="bilinear", align_corners=False)[0]

    def _detectron2_input(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """PIL-resize the uint8 pixels to ``size``, then normalise: (3, h, w) float32.

        Float inputs in 0..1 are brought back to uint8 first (exact for ``to_tensor`` output,
        whose values are k / 255), because Detectron2 resizes the uint8 image it is given.
        """
        if image.dtype != torch.uint8:
            image = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        x = self._channels_and_units(pil_resize(image, size))
        return x.sub_(self.mean).div_(self.std)

    def _channels_and_units(self, image: Tensor) -> Tensor:
        """(3, H, W) uint8 (0..255) or float (0..1) -> float32 in this preprocessor's channel
        order and pixel units. Never the caller's tensor: the result is normalised in place."""
        scale = self.pixel_scale / 255.0 if image.dtype == torch.uint8 else self.pixel_scale
        x = image.float() * scale if scale != 1.0 else image.float().clone()
        return x.flip(0) if self.bgr else x

    @staticmethod
    def _resize_targets(t: Targets, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Targets:
        masks = t.masks
        if masks is not None and masks.shape[0] > 0:
            # Nearest keeps masks binary; they are cropped and resampled again to 28x28 anyway.
            masks = F.interpolate(masks[:, None].float(), size=to_hw, mode="nearest")[:, 0].to(torch.uint8)
        elif masks is not None:
            masks = masks.new_zeros((0, *to_hw))
        return Targets(boxes=resize_boxes(t.boxes, from_hw, to_hw), labels=t.labels, masks=masks)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """``(h, w)`` of an ``h x w`` image after this preprocessor's eval-mode resize."""
        if self.resize == "detectron2":
            return detectron2_resized_size(h, w, self.min_size[-1], self.max_size)
        return resized_size(h, w, resize_scale(h, w, float(self.min_size[-1]), float(self.max_size)))

    def batch_key(self, h: int, w: int) -> tuple[int, int, int]:
        """Images of an equal key give in one batch the detections each gives alone (eval mode).

        A batch is padded to its largest image, and the padding changes what the network
        computes for the smaller ones (a 640 x 480 photo batched with a 6000 x 4000 one kept 45
        of its 100 detections); with inferred pooler scales (``roi_heads.pooler_strides=()``)
        RoIAlign's scales also follow the batch's largest height (they differ from 1/4 .. 1/32
        below ~45 px). So the key is the padded size and
        ``round(log2(padded h / h))``, which fixes those scales for the divisor's strides.
        """
        rh, rw = self.resized_size(h, w)
        hp, wp = padded_size(rh, self.size_divisible), padded_size(rw, self.size_divisible)
        return hp, wp, round(math.log2(hp / rh))

    def batch(self, images: list[Tensor]) -> ImageBatch:
        """Zero-pad (3, h, w) images to one (B, 3, Hp, Wp) tensor, Hp and Wp multiples of the divisor."""
        d = self.size_divisible
        hp = padded_size(max(int(im.shape[-2]) for im in images), d)
        wp = padded_size(max(int(im.shape[-1]) for im in images), d)
        tensors = images[0].new_zeros((len(images), 3, hp, wp))
        for b, im in enumerate(images):
            tensors[b, :, : im.shape[-2], : im.shape[-1]].copy_(im)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        return ImageBatch(tensors=tensors, image_sizes=sizes, original_sizes=sizes)


def to_original_frame(detections: list[Detections], batch: ImageBatch) -> list[Detections]:
    """Boxes back to each original image's pixels; masks stay (N, M, M) probabilities over each box.

    Masks are not pasted here: a full (N, H, W) frame per image costs N x H x W bytes (2.4 GB
    for 100 detections on a 24 MP photo). ``Result.from_detections`` pastes each mask into its
    box and run-length encodes it; ``ops.paste_masks(det.masks, det.boxes, (H, W))`` gives the
    full frames when they are wanted.
    """
    return [
        Detections(
            boxes=resize_boxes(det.boxes, resized_hw, orig_hw), scores=det.scores, labels=det.labels, masks=det.masks
        )
        for det, resized_hw, orig_hw in zip(detections, batch.image_sizes, batch.original_sizes)
    ]
