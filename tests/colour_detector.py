"""A stand-in detector for tests of tiling and video: it sees objects painted in unique colours.

Each object of a ``Scene`` is painted in a colour that encodes its label and its index, on a
black canvas. ``colour_forward`` replaces ``MaskRCNN.forward``: for each image (a tile, a
frame) it returns one detection per colour present, with the box and the mask of the pixels
it sees, clipped at the image edge as a real detector's would be. The truth is known
independently of the code under test, so a merge can be checked object by object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from maskrcnn.structures import Detections, ModelOutput

MASK_SIDE = 56  # per-box mask resolution of the stand-in: fine enough to paste back within a pixel or two
MIN_SIDE = 4  # pieces narrower than this are missed, like a real detector misses slivers


def colour(label: int, index: int) -> tuple[int, int, int]:
    """The unique, never-black colour of object ``index`` of class ``label`` (1..4)."""
    return 40 + 50 * label, index % 250 + 3, index // 250 + 3


def decode_colour(key: int) -> tuple[int, int]:
    r, g, b = key >> 16, (key >> 8) & 255, key & 255
    return (r - 40) // 50, (b - 3) * 250 + g - 3


Crop = tuple[int, int, np.ndarray]  # (y0, x0, (h, w) bool): a mask by its bounding box


@dataclass
class Scene:
    """A black canvas and the objects painted on it, with their true masks as box crops."""

    height: int
    width: int
    image: np.ndarray = field(init=False)  # (H, W, 3) uint8
    labels: list[int] = field(default_factory=list)
    masks: list[Crop] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.image = np.zeros((self.height, self.width, 3), dtype=np.uint8)

    def add(self, label: int, kind: str, box: tuple[int, int, int, int]) -> None:
        """Paint a ``kind`` (rect, ellipse, triangle) filling ``box`` = x0, y0, x1, y1 (exclusive)."""
        x0, y0, x1, y1 = box
        picture = Image.new("1", (x1 - x0, y1 - y0))
        draw = ImageDraw.Draw(picture)
        w, h = x1 - x0, y1 - y0
        if kind == "rect":
            draw.rectangle((0, 0, w - 1, h - 1), fill=1)
        elif kind == "ellipse":
            draw.ellipse((0, 0, w - 1, h - 1), fill=1)
        else:
            draw.polygon([(0, h - 1), (w // 2, 0), (w - 1, h - 1)], fill=1)
        crop = np.asarray(picture, dtype=bool)
        region = self.image[y0:y1, x0:x1]
        assert not region[crop].any(), "objects must not overlap"
        region[crop] = colour(label, len(self.labels))
        self.labels.append(label)
        self.masks.append(tight(y0, x0, crop))

    def boxes(self) -> np.ndarray:
        """(N, 4) true boxes x1 y1 x2 y2 (exclusive ends, as the detector reports them)."""
        return np.array([[x, y, x + c.shape[1], y + c.shape[0]] for y, x, c in self.masks], dtype=np.float32)


def tight(y0: int, x0: int, crop: np.ndarray) -> Crop:
    """The crop cut down to its bounding box."""
    ys, xs = np.nonzero(crop)
    return y0 + ys.min(), x0 + xs.min(), crop[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def crop_iou(a: Crop, b: Crop) -> float:
    """IoU of two masks given as crops, computed in the frame of their joint box."""
    y0, x0 = min(a[0], b[0]), min(a[1], b[1])
    y1 = max(a[0] + a[2].shape[0], b[0] + b[2].shape[0])
    x1 = max(a[1] + a[2].shape[1], b[1] + b[2].shape[1])
    frames = []
    for y, x, c in (a, b):
        f = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        f[y - y0 : y - y0 + c.shape[0], x - x0 : x - x0 + c.shape[1]] = c
        frames.append(f)
    union = np.count_nonzero(frames[0] | frames[1])
    return np.count_nonzero(frames[0] & frames[1]) / union if union else 0.0


def detect_colours(image: torch.Tensor, with_masks: bool = True, whole_only: bool = False) -> Detections:
    """Detections of the coloured objects visible in one (3, h, w) uint8 image; with
    ``whole_only``, of those not cut by its edge (a detector that needs to see an object's outline)."""
    rgb = image.permute(1, 2, 0).cpu().numpy().astype(np.int64)  # (h, w, 3)
    keys = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]  # (h, w)
    boxes, scores, labels, masks = [], [], [], []
    for key in np.unique(keys):
        label, index = decode_colour(int(key))
        if not 1 <= label <= 4 or colour(label, index) != (key >> 16, (key >> 8) & 255, key & 255):
            continue  # black, or an edge blended by shrinking the image: no object's colour
        ys, xs = np.nonzero(keys == key)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
            continue
        if whole_only and (x0 == 0 or y0 == 0 or x1 == keys.shape[1] or y1 == keys.shape[0]):
            continue
        crop = torch.from_numpy(keys[y0:y1, x0:x1] == key).float()[None, None]  # (1, 1, bh, bw)
        masks.append(F.interpolate(crop, size=(MASK_SIDE, MASK_SIDE), mode="bilinear", align_corners=False)[0, 0])
        boxes.append([x0, y0, x1, y1])
        labels.append(label)
        scores.append(0.5 + 0.4 * len(ys) / (len(ys) + 1000))  # bigger visible pieces score higher
    order = np.argsort(scores)[::-1].copy()
    n = len(boxes)
    return Detections(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4)[order],
        scores=torch.tensor(scores, dtype=torch.float32).reshape(n)[order],
        labels=torch.tensor(labels, dtype=torch.int64).reshape(n)[order],
        masks=(torch.stack(masks)[order] if n else torch.zeros((0, MASK_SIDE, MASK_SIDE))) if with_masks else None,
    )


def colour_forward(with_masks: bool = True, whole_only: bool = False):
    """A replacement for ``MaskRCNN.forward`` built on ``detect_colours``; records each call's image sizes."""
    calls: list[list[tuple[int, int]]] = []

    def forward(images, targets=None, propose=None, score_thresh=None):  # its scores pass any threshold the tests use
        calls.append([tuple(im.shape[-2:]) for im in images])
        return ModelOutput(losses={}, detections=[detect_colours(im, with_masks, whole_only) for im in images])

    forward.calls = calls  # type: ignore[attr-defined]
    return forward
