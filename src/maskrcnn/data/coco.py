"""COCO instance-segmentation JSON as a torch ``Dataset``.

Conventions: a COCO ``bbox`` ``[x, y, w, h]`` becomes ``(x1, y1, x2, y2) = (x, y, x + w,
y + h)`` in pixel-edge coordinates (a box around pixel columns 2..5 has x1 = 2, x2 = 6), the
frame pycocotools rasterises polygons in. Dataset category ids map to contiguous labels
``1..K`` in sorted-id order (or the order of a given ``category_ids`` list); label 0 is
background and never appears in targets.

Crowd annotations (``iscrowd=1``) are not training instances, as in COCO's own tools: they
are excluded from the targets and stay visible only through ``dataset.coco`` (the
pycocotools index used for evaluation). Degenerate annotations (box width or height under
1 px, or an empty polygon list) are dropped with one logged warning per file.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from ..structures import Targets
from .errors import DatasetError
from .images import image_size, load_rgb, to_tensor
from .transforms import Transform

logger = logging.getLogger(__name__)

# Polygon vertices and boxes may overshoot the image by this much (pixels): annotation tools
# commonly put a vertex on the far edge of the last pixel, or half a pixel beyond.
EDGE_TOLERANCE = 1.0

def read_json(path: str | Path) -> Any:
    """Parse a JSON file, turning every failure into a ``DatasetError`` naming the file.

    Syntax errors report the line and column.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"annotation file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}); is it a JSON file?") from None
    except OSError as e:
        raise DatasetError(f"cannot read annotation file {path}: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class _Instance:
    """One non-crowd, non-degenerate annotation, checked at construction."""

    ann_id: int
    label: int  # contiguous class index 1..K
    box: tuple[float, float, float, float]  # x1 y1 x2 y2, clipped to the image
    segmentation: Any  # COCO polygons (list of lists) or RLE dict


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Rasterise a COCO segmentation with pycocotools.

    Args:
        segmentation: list of polygons ``[[x0, y0, x1, y1, ...], ...]`` (pixel-edge
            coordinates), uncompressed RLE ``{"size": [h, w], "counts": [int, ...]}`` or
            compressed RLE ``{"size": [h, w], "counts": str | bytes}``.
        height, width: image size.

    Returns:
        (height, width) uint8 {0, 1} mask, the union of all polygons.
    """
    if isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_util.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_util.decode(rle)


class CocoDataset(Dataset):
    """Images and instance annotations of a COCO-format JSON file.

    Every record is checked when the dataset is built (no image is read then); any problem
    raises ``DatasetError`` naming the file and the record. Image files are read lazily in
    ``__getitem__``; call ``validate()`` to check them all up front.

    Args:
        ann_file: COCO JSON with ``images``, ``categories`` and ``annotations``.
        image_dir: folder that ``images[*].file_name`` is relative to.
        transforms: optional callable ``(image, targets) -> (image, targets)``.
        category_ids: dataset category id of label 1, 2, ... (e.g. from a checkpoint's
            config); default: every category of the file in increasing id order.

    Attributes:
        category_ids: dataset category id of label l at index l - 1.
        label_to_category_id / category_id_to_label: the same mapping as dicts.
        class_names: name of label l at index l - 1 ("" for an id the file does not name).
        image_ids: COCO image id of dataset index i at index i (file order).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        transforms: Transform | None = None,
        category_ids: list[int] | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self._data = read_json(self.ann_file)
        self._coco: COCO | None = None
        data = self._data
        if not isinstance(data, dict):
            raise DatasetError(f"{self.ann_file}: expected a JSON object at the top level, got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(f"{self.ann_file}: missing top-level key '{key}'")
            if not isinstance(data[key], list):
                raise DatasetError(f"{self.ann_file}: '{key}' must be a list, got {type(data[key]).__name__}")

        names = self._read_categories(data["categories"])
        self._set_labels(names, category_ids)
        self._images = self._read_images(data["images"])
        self.image_ids: list[int] = list(self._images)
        self._instances: dict[int, list[_Instance]] = {i: [] for i in self.image_ids}
        self._read_annotations(data["annotations"], names)

    # ------------------------------------------------------------------------------------
    # Parsing and checking the JSON

    def _read_categories(self, categories: list[Any]) -> dict[int, str]:
        names: dict[int, str] = {}
        for k, c in enumerate(categories):
            if not isinstance(c, dict) or not _is_id(c.get("id")):
                raise DatasetError(f"{self.ann_file}: categories[{k}] needs an integer 'id', got {c!r:.80}")
            if c["id"] in names:
                raise DatasetError(f"{self.ann_file}: category id {c['id']} appears twice")
            names[c["id"]] = str(c.get("name", c["id"]))
        return names

    def _set_labels(self, names: dict[int, str], category_ids: list[int] | None) -> None:
        ids = sorted(names) if category_ids is None else [int(c) for c in category_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"category_ids has duplicates: {ids}")
        self.category_ids: list[int] = ids
        self.label_to_category_id: dict[int, int] = {l + 1: c for l, c in enumerate(ids)}
        self.category_id_to_label: dict[int, int] = {c: l for l, c in self.label_to_category_id.items()}
        self.class_names: list[str] = [names.get(c, "") for c in ids]

    def _read_images(self, images: list[Any]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for k, im in enumerate(images):
            if not isinstance(im, dict) or not _is_id(im.get("id")):
                raise DatasetError(f"{self.ann_file}: images[{k}] needs an integer 'id', got {im!r:.80}")
            where = f"{self.ann_file}: image id {im['id']}"
            if im["id"] in out:
                raise DatasetError(f"{where} appears twice in 'images'")
            missing = [key for key in ("file_name", "width", "height") if key not in im]
            if missing:
                raise DatasetError(f"{where}: missing key(s) {', '.join(repr(m) for m in missing)}")
            if not isinstance(im["file_name"], str) or not im["file_name"]:
                raise DatasetError(f"{where}: 'file_name' must be a non-empty string, got {im['file_name']!r}")
            for key in ("width", "height"):
                v = im[key]
                if not _is_number(v) or v < 1 or v != int(v):
                    raise DatasetError(f"{where} ({im['file_name']}): '{key}' must be a positive integer, got {v!r}")
            out[im["id"]] = {"file_name": im["file_name"], "height": int(im["height"]), "width": int(im["width"])}
        return out

    def _read_annotations(self, annotations: list[Any], names: dict[int, str]) -> None:
        dropped: list[str] = []
        seen: set[int] = set()
        for k, a in enumerate(annotations):
            if not isinstance(a, dict):
                raise DatasetError(f"{self.ann_file}: annotations[{k}] is not an object: {a!r:.80}")
            name = f"annotation id {a['id']}" if "id" in a else f"annotations[{k}] (no id)"
            where = f"{self.ann_file}: {name}" + (f" (image id {a['image_id']})" if "image_id" in a else "")
            missing = [key for key in ("id", "image_id", "category_id", "bbox", "segmentation") if key not in a]
            if missing:
                raise DatasetError(f"{where}: missing key(s) {', '.join(repr(m) for m in missing)}")
            if a["id"] in seen:
                raise DatasetError(f"{where}: annotation id {a['id']} appears twice")
            seen.add(a["id"])
            if a["image_id"] not in self._images:
                raise DatasetError(f"{where}: unknown image id {a['image_id']!r} (not in 'images')")
            if a["category_id"] not in names:
                raise DatasetError(
                    f"{where}: unknown category id {a['category_id']!r}; the file's categories are {sorted(names)}"
                )
            if a["category_id"] not in self.category_id_to_label:
                raise DatasetError(
                    f"{where}: category id {a['category_id']} ({names[a['category_id']]}) is not among the "
                    f"given category_ids {self.category_ids}"
                )
            im = self._images[a["image_id"]]
            where = f"{where} ({im['file_name']}, {im['width']}x{im['height']})"
            h, w = im["height"], im["width"]
            box = self._check_bbox(a["bbox"], h, w, where)
            degenerate = self._check_segmentation(a["segmentation"], h, w, where)
            if a.get("iscrowd", 0):
                continue
            if box is None or degenerate:
                reason = "empty segmentation" if degenerate else f"bbox {a['bbox']} narrower than 1 px"
                dropped.append(f"{a['id']} (image {a['image_id']}: {reason})")
                continue
            label = self.category_id_to_label[a["category_id"]]
            self._instances[a["image_id"]].append(_Instance(a["id"], label, box, a["segmentation"]))
        if dropped:
            shown = ", ".join(dropped[:10]) + (f", ... ({len(dropped) - 10} more)" if len(dropped) > 10 else "")
            logger.warning("%s: dropped %d degenerate annotation(s): %s", self.ann_file, len(dropped), shown)

    @staticmethod
    def _check_bbox(bbox: Any, h: int, w: int, where: str) -> tuple[float, float, float, float] | None:
        """Clipped (x1, y1, x2, y2), or None for a degenerate box; raises if malformed."""
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DatasetError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r:.80}")
        x, y, bw, bh = (float(v) for v in bbox)
        if bw < 1 or bh < 1:
            return None
        tol = EDGE_TOLERANCE
        if x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol:
            raise DatasetError(f"{where}: bbox [x, y, w, h] = {bbox} extends outside the {w}x{h} image")
        return (max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h)))

    @staticmethod
    def _check_segmentation(seg: Any, h: int, w: int, where: str) -> bool:
        """True for an empty polygon list (degenerate); raises if malformed."""
        if isinstance(seg, list):
            for k, poly in enumerate(seg):
                if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                    raise DatasetError(f"{where}: polygon {k} must be a list of finite numbers, got {poly!r:.80}")
                if len(poly) % 2:
                    raise DatasetError(f"{where}: polygon {k} has an odd number of coordinates ({len(poly)})")
                if len(poly) < 6:
                    raise DatasetError(f"{where}: polygon {k} has {len(poly) // 2} point(s); at least 3 are needed")
                xs, ys = poly[0::2], poly[1::2]
                tol = EDGE_TOLERANCE
                if min(xs) < -tol or max(xs) > w + tol or min(ys) < -tol or max(ys) > h + tol:
                    raise DatasetError(
                        f"{where}: polygon {k} has coordinates outside the {w}x{h} image "
                        f"(x in [{min(xs)}, {max(xs)}], y in [{min(ys)}, {max(ys)}])"
                    )
            return len(seg) == 0
        if isinstance(seg, dict):
            if "counts" not in seg or "size" not in seg:
                raise DatasetError(f"{where}: RLE segmentation needs 'counts' and 'size', has {sorted(seg)}")
            size = seg["size"]
            if not isinstance(size, list) or len(size) != 2 or list(size) != [h, w]:
                raise DatasetError(f"{where}: RLE size {size!r} does not match the image [height, width] = [{h}, {w}]")
            counts = seg["counts"]
            if isinstance(counts, list):
                if not all(_is_id(c) and c >= 0 for c in counts):
                    raise DatasetError(f"{where}: uncompressed RLE counts must be non-negative integers")
                if sum(counts) != h * w:
                    raise DatasetError(f"{where}: uncompressed RLE counts sum to {sum(counts)}, not {h}*{w} = {h * w}")
            elif not isinstance(counts, str) or not counts:
                raise DatasetError(f"{where}: RLE counts must be a list of integers or a non-empty string")
            return False
        raise DatasetError(f"{where}: 'segmentation' must be a list of polygons or an RLE object, got {seg!r:.80}")

    # ------------------------------------------------------------------------------------
    # Dataset protocol

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        """Foreground classes K; labels are 1..K."""
        return len(self.category_ids)

    @property
    def coco(self) -> COCO:
        """pycocotools index over the whole file (crowd and degenerate annotations too), for evaluation."""
        if self._coco is None:
            coco = COCO()
            coco.dataset = self._data
            with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
                coco.createIndex()
            self._coco = coco
        return self._coco

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image from the JSON, in dataset order; no image is read."""
        return [(self._images[i]["height"], self._images[i]["width"]) for i in self.image_ids]

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._images[self.image_ids[index]]["file_name"]

    def load_image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of image ``index``, checked against the JSON's size."""
        image_id = self.image_ids[index]
        image = load_rgb(self.image_path(index))
        self._check_size(image.shape[:2], image_id)
        return image

    def _check_size(self, hw: tuple[int, int], image_id: int) -> None:
        info = self._images[image_id]
        h, w = info["height"], info["width"]
        if tuple(hw) != (h, w):
            hint = (
                "; height and width are swapped: EXIF orientation? annotations must be in the rotated frame"
                if tuple(hw) == (w, h) else ""
            )
            raise DatasetError(
                f"{self.image_dir / info['file_name']} is {hw[1]}x{hw[0]} (WxH) but {self.ann_file} "
                f"says {w}x{h} for image id {image_id}{hint}"
            )

    def get_targets(self, index: int) -> Targets:
        """Targets of image ``index`` in the original image frame (no transforms)."""
        image_id = self.image_ids[index]
        info = self._images[image_id]
        h, w = info["height"], info["width"]
        instances = self._instances[image_id]
        if not instances:
            return Targets.empty(h, w)
        masks = np.empty((len(instances), h, w), dtype=np.uint8)
        for k, inst in enumerate(instances):
            try:
                masks[k] = segmentation_to_mask(inst.segmentation, h, w)
            except Exception as e:  # pycocotools raises bare Exceptions on bad RLE strings
                raise DatasetError(
                    f"{self.ann_file}: annotation id {inst.ann_id} (image id {image_id}): "
                    f"cannot decode segmentation: {e}"
                ) from None
        return Targets(
            boxes=torch.tensor([inst.box for inst in instances], dtype=torch.float32),  # (N, 4)
            labels=torch.tensor([inst.label for inst in instances], dtype=torch.int64),  # (N,)
            masks=torch.from_numpy(masks),  # (N, H, W)
        )

    def __getitem__(self, index: int) -> tuple[Tensor, Targets, dict[str, Any]]:
        """Image ``index`` with its targets.

        Returns:
            image: (3, H, W) float32 RGB in [0, 1].
            targets: boxes (N, 4) float32 x1 y1 x2 y2 pixels, labels (N,) int64 in 1..K,
                masks (N, H, W) uint8; N = 0 for an image without (non-crowd) annotations.
            info: ``image_id`` (COCO id), ``file_name``, ``orig_size`` (H, W) before transforms.
        """
        image_id = self.image_ids[index]
        info = self._images[image_id]
        image = to_tensor(self.load_image(index))
        targets = self.get_targets(index)
        if self.transforms is not None:
            image, targets = self.transforms(image, targets)
        return image, targets, {
            "image_id": image_id,
            "file_name": info["file_name"],
            "orig_size": (info["height"], info["width"]),
        }

    def validate(self, decode: bool = True) -> None:
        """Check every image file up front: it exists, decodes, and has the JSON's size.

        Args:
            decode: decode every image fully (slow, catches truncated files); False reads
                only the headers.

        Raises:
            DatasetError: listing every bad image (the first 20 in full).
        """
        problems: list[str] = []
        for index, image_id in enumerate(self.image_ids):
            try:
                if decode:
                    self.load_image(index)
                else:
                    self._check_size(image_size(self.image_path(index)), image_id)
            except DatasetError as e:
                problems.append(f"image id {image_id}: {e}")
        if problems:
            shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            raise DatasetError(f"{self.ann_file}: {len(problems)} of {len(self)} images are bad:\n  {shown}")

    def __repr__(self) -> str:
        n = sum(len(v) for v in self._instances.values())
        return (
            f"CocoDataset({str(self.ann_file)!r}, {len(self)} images, {n} instances, "
            f"{self.num_classes} classes)"
        )
