"""What ``model.predict`` returns for one image, and how to draw and export it.

Everything here is in the *original* image frame (the pixels the caller passed in), as
numpy arrays, so a ``Result`` outlives the model and the device it ran on.

Shape shorthand: N detections, H x W original image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskrcnn.files import atomic_write, write_json
from maskrcnn.inference import masks as rle_masks
from maskrcnn.structures import Detections

logger = logging.getLogger(__name__)

# label -> COCO category id: a function, a table indexed by label, or a dict.
CategoryMap = Callable[[int], int] | Sequence[int] | Mapping[int, int]

MASK_ALPHA = 0.45  # opacity of the mask overlay: the image stays readable underneath
# Overlays of larger images are drawn on a copy shrunk to this side: a 20000-px overlay is a
# 1.2 GB canvas that no viewer shows at full size.
DISPLAY_SIZE = 4096

# 20 well-separated colours (RGB); label k is drawn in _PALETTE[k % 20], the same in every run.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 56, 56),
    (255, 157, 151),
    (255, 112, 31),
    (255, 178, 29),
    (207, 210, 49),
    (72, 249, 10),
    (146, 204, 23),
    (61, 219, 134),
    (26, 147, 52),
    (0, 212, 187),
    (44, 153, 168),
    (0, 194, 255),
    (52, 69, 147),
    (100, 115, 255),
    (0, 24, 236),
    (132, 56, 255),
    (82, 0, 133),
    (203, 56, 255),
    (255, 149, 200),
    (255, 55, 199),
)


def label_color(label: int) -> tuple[int, int, int]:
    """Deterministic RGB colour of a class label."""
    return _PALETTE[int(label) % len(_PALETTE)]


class Result:
    """Detections for one image in the original image frame.

    Masks are kept as COCO run-length encodings (``rles``), built from each box-sized crop, so
    a ``Result`` costs kilobytes whatever the image size; ``masks`` decodes them on request.

    Attributes:
        boxes: (N, 4) float32 x1 y1 x2 y2 pixels, sorted by decreasing score.
        scores: (N,) float32 class probabilities in [0, 1].
        labels: (N,) int64 class indices 1..num_classes of the model (equal to the COCO
            category ids for torchvision's COCO checkpoints, not for Detectron2's).
        category_ids: (N,) int64 dataset category id of each detection (COCO ids for every
            COCO checkpoint: Detectron2's label 80 is category 90), what ``to_coco`` writes.
        category_table: dataset category id of every label 0..num_classes, or None (identity).
        image_size: (h, w) of the original image ((0, 0) when it could not be read).
        rles: N pycocotools RLEs ``{"size": [h, w], "counts": bytes}`` of the instance masks
            in the full image, or None for a box-only model.
        masks: (N, h, w) bool, decoded from ``rles`` on every access, so keep it in a variable
            (N x h x w bytes: 2.4 GB for 100 masks of a 24 MP photo; drawing and export never
            need it). Assigning an (N, h, w) array or None replaces the masks.
        class_names: (N,) name of each detection's class, "" when unknown.
        path: the image file the detections came from, if any.
        image: (h, w, 3) uint8 RGB pixels kept for drawing, or None; either the image or a
            preview of it shrunk by one factor (a tiled run keeps at most ``DISPLAY_SIZE`` a side).
        error: why this image gave no detections (unreadable file, a model failure), or None.
            Set only by ``model.predict`` on a list of images, which returns one ``Result``
            per input in order: a bad input never costs the others' results.
    """

    def __init__(
        self,
        boxes: np.ndarray,
        scores: np.ndarray,
        labels: np.ndarray,
        image_size: tuple[int, int],
        masks: np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        path: str | None = None,
        image: np.ndarray | Image.Image | None = None,
        *,
        rles: Sequence[dict] | None = None,
        error: str | None = None,
        category_table: Sequence[int] | None = None,
    ) -> None:
        self.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        n = len(self.boxes)
        if len(self.scores) != n or len(self.labels) != n:
            raise ValueError(f"boxes, scores, labels lengths differ: {n}, {len(self.scores)}, {len(self.labels)}")
        if masks is not None and rles is not None:
            raise ValueError("pass masks or rles, not both")
        self.rles: list[dict] | None = None
        if rles is not None:
            self.rles = list(rles)
            if len(self.rles) != n or any(list(r["size"]) != list(self.image_size) for r in self.rles):
                raise ValueError(f"rles must be {n} RLEs of size {list(self.image_size)}")
        if masks is not None:
            self.masks = masks  # type: ignore[assignment]  # run-length encoded by the setter
        self.class_names = list(class_names) if class_names else [""] * n
        if len(self.class_names) != n:
            raise ValueError(f"class_names has {len(self.class_names)} entries for {n} detections")
        self.path = path
        self.image = None if image is None else _as_rgb_array(image)
        if self.image is not None and not _fits(self.image.shape[:2], self.image_size):
            raise ValueError(f"image is {self.image.shape[:2]}, image_size is {self.image_size}")
        self.error = error
        self.category_table = None if category_table is None else tuple(int(c) for c in category_table)

    @property
    def category_ids(self) -> np.ndarray:
        return np.array([_map_category(self.category_table, int(k)) for k in self.labels], dtype=np.int64)

    @property
    def masks(self) -> np.ndarray | None:
        return None if self.rles is None else rle_masks.decode(self.rles, self.image_size)

    @masks.setter
    def masks(self, masks: np.ndarray | None) -> None:
        if masks is None:
            self.rles = None
            return
        masks = np.asarray(masks)
        if masks.shape != (len(self), *self.image_size):
            raise ValueError(f"masks must be (N, H, W) = {(len(self), *self.image_size)}, got {masks.shape}")
        self.rles = rle_masks.encode(masks)

    @classmethod
    def failed(cls, error: str, path: str | None = None) -> Result:
        """A ``Result`` with no detections that says why (``error``)."""
        empty = np.zeros((0,))
        return cls(empty, empty, empty, (0, 0), path=path, error=error)

    @classmethod
    def from_detections(
        cls,
        detections: Detections,
        image_size: tuple[int, int],
        class_names: Sequence[str] | Mapping[int, str] | None = None,
        mask_thresh: float = 0.5,
        path: str | None = None,
        image: np.ndarray | Image.Image | None = None,
        paste: str = "torchvision",
        category_table: Sequence[int] | None = None,
    ) -> Result:
        """Convert the model's ``Detections`` for one image to a ``Result``, pasting the masks.

        Args:
            detections: boxes (N, 4) in the original image frame, scores, labels and
                (N, M, M) mask probabilities over each box, as ``MaskRCNN`` returns them; any device.
            image_size: (h, w) of the original image.
            class_names: label -> name, as a list indexed by label (index 0 background)
                or a dict; labels it does not cover get "".
            mask_thresh: a pasted mask probability above this is foreground (as torchvision's
                ``paste_masks_in_image``). Each mask is pasted into its box only and
                run-length encoded, never as a full frame.
            paste: the pasting rule of the model's weights (``RoIHeadsConfig.paste``).
            category_table: dataset category id of every label (``ModelConfig.label_categories``).
        """
        labels = detections.labels.detach().cpu().numpy()
        boxes = detections.boxes.detach().float()
        rles = None
        if detections.masks is not None:
            m = detections.masks.detach()
            if m.dim() != 3 or m.shape[-1] != m.shape[-2]:
                raise ValueError(f"detections.masks must be (N, M, M) per-box probabilities, got {tuple(m.shape)}")
            rles = rle_masks.paste_to_rles(m, boxes.to(m.device), image_size, mask_thresh, mode=paste)
        return cls(
            boxes=boxes.cpu().numpy(),
            scores=detections.scores.detach().float().cpu().numpy(),
            labels=labels,
            image_size=image_size,
            rles=rles,
            class_names=[_lookup_name(class_names, int(k)) for k in labels],
            path=path,
            image=image,
            category_table=category_table,
        )

    def __len__(self) -> int:
        return len(self.boxes)

    def __repr__(self) -> str:
        state = f"error={self.error!r}" if self.error else f"{len(self)} detections"
        masks = "" if self.rles is None else ", masks"
        return f"Result({state}, image_size={self.image_size}{masks}, path={self.path!r})"

    def __getitem__(self, index: Any) -> Result:
        """Select detections with an int, slice, bool mask or index array."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        index = np.arange(len(self))[index]  # normalise to an index array
        return Result(
            boxes=self.boxes[index],
            scores=self.scores[index],
            labels=self.labels[index],
            image_size=self.image_size,
            rles=None if self.rles is None else [self.rles[i] for i in index],
            class_names=[self.class_names[i] for i in index],
            path=self.path,
            image=self.image,
            error=self.error,
            category_table=self.category_table,
        )

    # ---- drawing -------------------------------------------------------------------------

    def plot(
        self,
        image: np.ndarray | Image.Image | None = None,
        score_thresh: float = 0.0,
        max_size: int | None = DISPLAY_SIZE,
    ) -> Image.Image:
        """Draw masks, boxes and "name score" labels over the image.

        Args:
            image: (H, W, 3) uint8 RGB array or PIL image of size ``image_size``, or a copy of
                it shrunk by one factor; defaults to ``self.image``.
            score_thresh: detections scoring below this are not drawn.
            max_size: a picture with a longer side is shrunk to this side first, and the
                detections drawn to its scale (None: full size).

        Returns:
            A new RGB PIL image; the input is not modified.
        """
        base = self.image if image is None else _as_rgb_array(image)
        if base is None:
            raise ValueError("no image to draw on: pass image= or keep the pixels in Result.image")
        if not _fits(base.shape[:2], self.image_size):
            raise ValueError(f"image is {base.shape[:2]}, detections are for {self.image_size}")
        canvas = _shrunk(base, max_size)  # a copy: the caller's pixels stay as they are
        h, w = self.image_size
        sy, sx = canvas.shape[0] / h, canvas.shape[1] / w

        keep = np.flatnonzero(self.scores >= score_thresh)
        keep = keep[np.argsort(self.scores[keep], kind="stable")]  # best drawn last, on top
        if self.rles is not None:
            for i in keep:
                # Blend inside the mask's bounding box only: memory and time follow the object.
                y0, x0, crop = _scaled_crop(*rle_masks.decode_one(self.rles[i]), sy, sx, canvas.shape[:2])
                region = canvas[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
                color = np.asarray(label_color(self.labels[i]), dtype=np.float32)
                blended = (1.0 - MASK_ALPHA) * region[crop].astype(np.float32) + MASK_ALPHA * color
                region[crop] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        out = Image.fromarray(canvas)
        del canvas

        draw = ImageDraw.Draw(out)
        font = ImageFont.load_default()
        line = max(1, round(0.002 * (out.height + out.width)))
        for i in keep:
            color = label_color(self.labels[i])
            x1, y1, x2, y2 = (float(v) * f for v, f in zip(self.boxes[i], (sx, sy, sx, sy)))
            draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
            text = f"{self.class_names[i] or self.labels[i]} {self.scores[i]:.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            tw, th = right - left + 4, bottom - top + 4
            ty = y1 - th if y1 - th >= 0 else y1  # above the box, or inside when at the top edge
            draw.rectangle((x1, ty, x1 + tw, ty + th), fill=color)
            dark_text = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 150
            draw.text((x1 + 2 - left, ty + 2 - top), text, fill=(0, 0, 0) if dark_text else (255, 255, 255), font=font)
        return out

    def save(self, path: str | Path, image: np.ndarray | Image.Image | None = None, score_thresh: float = 0.0) -> Path:
        """Write ``plot(image, score_thresh)`` atomically; PNG unless the suffix names another format."""
        overlay = self.plot(image, score_thresh)
        fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
        return atomic_write(path, lambda f: overlay.save(f, format=fmt))

    # ---- export --------------------------------------------------------------------------

    def to_coco(self, image_id: int, category_ids: CategoryMap | None = None) -> list[dict]:
        """COCO results entries, one per detection.

        Args:
            image_id: the COCO image id these detections belong to.
            category_ids: label -> COCO category id (function, table indexed by label,
                or dict); when None, the model's own table (``category_table``, set by
                ``predict``: Detectron2's 80 labels -> COCO's ids 1..90), else identity.

        Returns:
            ``{"image_id", "category_id", "bbox": [x, y, w, h], "score",
            "segmentation": {"size": [H, W], "counts": str}}`` dicts; no
            "segmentation" key when there are no masks.
        """
        entries = []
        for i in range(len(self)):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            entry: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": _map_category(
                    category_ids if category_ids is not None else self.category_table, int(self.labels[i])
                ),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(self.scores[i]),
            }
            if self.rles is not None:
                rle = self.rles[i]
                entry["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            entries.append(entry)
        return entries

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: plain lists, masks as COCO RLE (counts as str), no pixels."""
        masks = None
        if self.rles is not None:
            masks = [e["segmentation"] for e in self.to_coco(0)]
        return {
            "path": self.path,
            "image_size": list(self.image_size),
            "boxes": self.boxes.tolist(),
            "scores": self.scores.tolist(),
            "labels": self.labels.tolist(),
            "category_ids": self.category_ids.tolist(),
            "class_names": list(self.class_names),
            "masks": masks,
            "error": self.error,
        }


def write_coco_results(entries: list[dict], path: str | Path) -> Path:
    """Write COCO results entries (e.g. from ``Result.to_coco``) as a JSON array, atomically."""
    return write_json(entries, path)


def _fits(shape: tuple[int, ...], image_size: tuple[int, int]) -> bool:
    """True if a picture of ``shape`` (h, w) is ``image_size`` (H, W) or it shrunk by one factor."""
    (h, w), (big_h, big_w) = shape, image_size
    if (h, w) == (big_h, big_w):
        return True
    # Rounding either way moves each side by under a pixel: compare the cross products.
    return 0 < h <= big_h and 0 < w <= big_w and abs(h * big_w - w * big_h) <= max(big_h, big_w)


def _shrunk(image: np.ndarray, max_size: int | None) -> np.ndarray:
    """A copy of (H, W, 3) ``image``, shrunk to ``max_size`` on its longer side if larger."""
    h, w = image.shape[:2]
    if max_size is None or max(h, w) <= max_size:
        return np.array(image, dtype=np.uint8)
    scale = max_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    step = max(1, int(1 / scale) // 2)  # skip rows and columns first: no full-size PIL copy
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(image[::step, ::step])).resize(size, Image.Resampling.BOX)
    ).copy()


def _scaled_crop(
    y0: int, x0: int, crop: np.ndarray, sy: float, sx: float, size: tuple[int, int]
) -> tuple[int, int, np.ndarray]:
    """A mask crop at (y0, x0) moved to a picture scaled by (sy, sx) of ``size``: nearest pixels."""
    if (sy, sx) == (1.0, 1.0) or not crop.size:
        return y0, x0, crop
    top, left = min(int(y0 * sy), size[0] - 1), min(int(x0 * sx), size[1] - 1)
    bottom = min(max(top + 1, math.ceil((y0 + crop.shape[0]) * sy)), size[0])
    right = min(max(left + 1, math.ceil((x0 + crop.shape[1]) * sx)), size[1])
    small = Image.fromarray(crop).resize((right - left, bottom - top), Image.Resampling.NEAREST)
    return top, left, np.asarray(small, dtype=bool)


def _as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PIL image or an (H, W), (H, W, 3) or (H, W, 4) uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image array must be (H, W, 3), got {array.shape}")
    return array[:, :, :3]


def _lookup_name(names: Sequence[str] | Mapping[int, str] | None, label: int) -> str:
    if names is None:
        return ""
    if isinstance(names, Mapping):
        return str(names.get(label, ""))
    return str(names[label]) if 0 <= label < len(names) else ""


def _map_category(category_ids: CategoryMap | None, label: int) -> int:
    if category_ids is None:
        return label
    if callable(category_ids):
        return int(category_ids(label))
    return int(category_ids[label])
