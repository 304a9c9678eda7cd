"""COCO instance-segmentation JSON: one checking parser, and a torch ``Dataset`` on top.

``read_coco`` is the one reader of COCO instances JSON: training (``CocoDataset``) and
evaluation (``engine.evaluate``) both go through it, so a malformed record raises the same
``DatasetError``, naming the file and the record, wherever the file is used.

Conventions: a COCO ``bbox`` ``[x, y, w, h]`` becomes ``(x1, y1, x2, y2) = (x, y, x + w,
y + h)`` in pixel-edge coordinates (a box around pixel columns 2..5 has x1 = 2, x2 = 6), the
frame pycocotools rasterises polygons in. Dataset category ids map to contiguous labels
``1..K`` in sorted-id order (or the order of a given ``category_ids`` list); label 0 is
background and never appears in targets.

Crowd annotations (``iscrowd=1``) are not training instances, as in COCO's own tools: they
are excluded from the targets and stay visible only through ``dataset.coco`` (the
pycocotools index used for evaluation). Degenerate annotations (box width or height under
1 px, or an empty polygon list) are dropped with one logged warning per file, from training
and from evaluation alike: a box no detection can match would otherwise count as a miss.

Image file names stay inside the image folder: a name that is absolute or climbs out with
``..`` is refused unless ``allow_outside_root`` is set, because the JSON may come from anyone
while the folder is the user's. For the same reason symbolic links *inside* the folder are
followed: the user put them there (image folders are often linked in from another disk).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePath
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

# Bad images named in full in one error message; the rest are counted.
SHOWN_PROBLEMS = 10


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


# ----------------------------------------------------------------------------------------
# The parser


@dataclass(frozen=True)
class ImageRecord:
    file_name: str  # relative to the image folder
    height: int  # pixels, after EXIF orientation (the frame the annotations are in)
    width: int


@dataclass(frozen=True)
class AnnotationRecord:
    """One annotation of the file, checked; crowd and degenerate ones included."""

    ann_id: int
    image_id: int  # always one of the file's images
    category_id: int  # always one of the file's categories
    box: tuple[float, float, float, float] | None  # x1 y1 x2 y2 clipped to the image; None: under 1 px
    segmentation: Any  # COCO polygons (list of lists) or RLE dict, checked against the image size
    iscrowd: bool
    empty: bool  # the segmentation is an empty polygon list

    @property
    def degenerate(self) -> bool:
        return self.box is None or self.empty


@dataclass(frozen=True)
class CocoFile:
    """A COCO instances JSON whose every record passed ``read_coco``'s checks."""

    path: Path
    data: dict[str, Any]  # the JSON as read, for pycocotools
    categories: dict[int, str]  # category id -> name, in file order
    images: dict[int, ImageRecord]  # image id -> record, in file order
    annotations: list[AnnotationRecord]  # in file order

    def to_pycocotools(self) -> COCO:
        """pycocotools index over the file for evaluation: crowd annotations kept (pycocotools
        ignores detections on them), degenerate ones dropped, as training drops them."""
        dropped = {a.ann_id for a in self.annotations if a.degenerate}
        coco = COCO()
        coco.dataset = {**self.data, "annotations": [a for a in self.data["annotations"] if a["id"] not in dropped]}
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
        return coco


def read_coco(path: str | Path) -> CocoFile:
    """Read and check a COCO instances JSON.

    Checked: the top-level keys; integer, unique image, category and annotation ids; every
    image's ``file_name``, ``width``, ``height``; every annotation's image and category (they
    must exist), ``bbox`` (4 finite numbers inside the image, up to ``EDGE_TOLERANCE``) and
    ``segmentation`` (polygons of at least 3 points inside the image, or an RLE of the
    image's size).

    Raises:
        DatasetError: the first problem, naming the file and the record.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    categories = _read_categories(path, data["categories"])
    images = _read_images(path, data["images"])
    annotations = _read_annotations(path, data["annotations"], images, categories)
    return CocoFile(path, data, categories, images, annotations)


def _read_categories(path: Path, categories: list[Any]) -> dict[int, str]:
    names: dict[int, str] = {}
    for k, c in enumerate(categories):
        if not isinstance(c, dict) or not _is_id(c.get("id")):
            raise DatasetError(f"{path}: categories[{k}] needs an integer 'id', got {c!r:.80}")
        if c["id"] in names:
            raise DatasetError(f"{path}: category id {c['id']} appears twice")
        names[c["id"]] = str(c.get("name", c["id"]))
    return names


def _read_images(path: Path, images: list[Any]) -> dict[int, ImageRecord]:
    out: dict[int, ImageRecord] = {}
    for k, im in enumerate(images):
        if not isinstance(im, dict) or not _is_id(im.get("id")):
            raise DatasetError(f"{path}: images[{k}] needs an integer 'id', got {im!r:.80}")
        where = f"{path}: image id {im['id']}"
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
        out[im["id"]] = ImageRecord(im["file_name"], int(im["height"]), int(im["width"]))
    return out


def _read_annotations(
    path: Path, annotations: list[Any], images: dict[int, ImageRecord], categories: dict[int, str]
) -> list[AnnotationRecord]:
    out: list[AnnotationRecord] = []
    seen: set[int] = set()
    for k, a in enumerate(annotations):
        if not isinstance(a, dict):
            raise DatasetError(f"{path}: annotations[{k}] is not an object: {a!r:.80}")
        name = f"annotation id {a['id']}" if "id" in a else f"annotations[{k}] (no id)"
        where = f"{path}: {name}" + (f" (image id {a['image_id']})" if "image_id" in a else "")
        missing = [key for key in ("id", "image_id", "category_id", "bbox", "segmentation") if key not in a]
        if missing:
            raise DatasetError(f"{where}: missing key(s) {', '.join(repr(m) for m in missing)}")
        if not _is_id(a["id"]):
            raise DatasetError(f"{where}: 'id' must be an integer, got {a['id']!r}")
        if a["id"] in seen:
            raise DatasetError(f"{where}: annotation id {a['id']} appears twice")
        seen.add(a["id"])
        if a["image_id"] not in images:
            raise DatasetError(f"{where}: unknown image id {a['image_id']!r} (not in 'images')")
        if a["category_id"] not in categories:
            raise DatasetError(
                f"{where}: unknown category id {a['category_id']!r}; the file's categories are {sorted(categories)}"
            )
        im = images[a["image_id"]]
        where = f"{where} ({im.file_name}, {im.width}x{im.height})"
        box = _check_bbox(a["bbox"], im.height, im.width, where)
        empty = _check_segmentation(a["segmentation"], im.height, im.width, where)
        out.append(
            AnnotationRecord(
                a["id"],
                a["image_id"],
                a["category_id"],
                box,
                a["segmentation"],
                bool(a.get("iscrowd", 0)),
                empty,
            )
        )
    return out


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


def image_path(image_dir: str | Path, file_name: str, allow_outside_root: bool = False, where: str = "") -> Path:
    """``image_dir / file_name``, refusing a name that leads out of ``image_dir``.

    A name that is absolute, or whose ``..`` parts climb above the folder, raises unless
    ``allow_outside_root``. The check is on the name only: symbolic links inside the folder
    are the user's and are followed.

    Raises:
        DatasetError: ``where`` (the file and record the name came from) and the name.
    """
    norm = os.path.normpath(file_name)
    outside = PurePath(norm).anchor != "" or norm == os.pardir or norm.startswith(os.pardir + os.sep)
    if outside and not allow_outside_root:
        raise DatasetError(
            f"{where}: file_name {file_name!r} points outside the image folder {image_dir} (set "
            f"data.allow_outside_root=true, or --allow-outside-root on the command line, to allow it)"
        )
    return Path(image_dir) / file_name


def describe_problems(what: str, total: int, problems: dict[int, str]) -> str:
    """One message for a dict image id -> problem: the count and the first ``SHOWN_PROBLEMS``."""
    lines = [f"image id {i}: {p}" for i, p in list(problems.items())[:SHOWN_PROBLEMS]]
    more = len(problems) - len(lines)
    shown = "\n  ".join(lines + ([f"... and {more} more"] if more else []))
    return f"{what}: {len(problems)} of {total} images are bad:\n  {shown}"


# ----------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True)
class _Instance:
    """One non-crowd, non-degenerate annotation: what training sees."""

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
        rle = {
            "size": list(segmentation["size"]),
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    return mask_util.decode(rle)


class CocoDataset(Dataset):
    """Images and instance annotations of a COCO-format JSON file.

    Every record is checked when the dataset is built (``read_coco``; no image is read then),
    and so is every file name (it must stay inside ``image_dir``); a file with no images, no
    categories or no instance to learn from is an error too. Image files are read lazily in
    ``__getitem__``; ``validate()`` / ``bad_images()`` check them all up front.

    Args:
        ann_file: COCO JSON with ``images``, ``categories`` and ``annotations``.
        image_dir: folder that ``images[*].file_name`` is relative to.
        transforms: optional callable ``(image, targets) -> (image, targets)``.
        category_ids: dataset category id of label 1, 2, ... (e.g. from a checkpoint's
            config); default: every category of the file in increasing id order.
        allow_outside_root: accept file names that are absolute or lead out of ``image_dir``.

    Raises:
        DatasetError: naming the file and the record.

    Attributes:
        file: the checked file (``CocoFile``).
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
        allow_outside_root: bool = False,
        percentiles: tuple[float, float] | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.percentiles = percentiles  # the model's transform.percentiles: images read as predict reads them
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.file = read_coco(self.ann_file)
        self._coco: COCO | None = None
        self._set_labels(self.file.categories, category_ids)
        self.image_ids: list[int] = list(self.file.images)
        self._paths = {
            i: image_path(self.image_dir, im.file_name, allow_outside_root, f"{self.ann_file}: image id {i}")
            for i, im in self.file.images.items()
        }
        self._instances = self._select_instances()
        self._check_not_empty()

    def _set_labels(self, names: dict[int, str], category_ids: list[int] | None) -> None:
        ids = sorted(names) if category_ids is None else [int(c) for c in category_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"category_ids has duplicates: {ids}")
        self.category_ids: list[int] = ids
        self.label_to_category_id: dict[int, int] = {k + 1: c for k, c in enumerate(ids)}
        self.category_id_to_label: dict[int, int] = {c: k for k, c in self.label_to_category_id.items()}
        self.class_names: list[str] = [names.get(c, "") for c in ids]

    def _select_instances(self) -> dict[int, list[_Instance]]:
        """Training instances per image id: crowd and degenerate annotations left out."""
        instances: dict[int, list[_Instance]] = {i: [] for i in self.image_ids}
        dropped: list[str] = []
        for a in self.file.annotations:
            if a.category_id not in self.category_id_to_label:
                raise DatasetError(
                    f"{self.ann_file}: annotation id {a.ann_id} (image id {a.image_id}): category id "
                    f"{a.category_id} ({self.file.categories[a.category_id]}) is not among the given "
                    f"category_ids {self.category_ids}"
                )
            if a.iscrowd:
                continue
            if a.degenerate:
                dropped.append(
                    f"{a.ann_id} (image {a.image_id}: {'empty segmentation' if a.empty else 'bbox narrower than 1 px'})"
                )
                continue
            label = self.category_id_to_label[a.category_id]
            instances[a.image_id].append(_Instance(a.ann_id, label, a.box, a.segmentation))  # type: ignore[arg-type]
        if dropped:
            shown = ", ".join(dropped[:10]) + (f", ... ({len(dropped) - 10} more)" if len(dropped) > 10 else "")
            logger.warning("%s: dropped %d degenerate annotation(s): %s", self.ann_file, len(dropped), shown)
        return instances

    def _check_not_empty(self) -> None:
        """Nothing to train on or evaluate against is an error, not a run that does nothing."""
        if not self.image_ids:
            raise DatasetError(f"{self.ann_file}: no images ('images' is empty)")
        if not self.file.categories:
            raise DatasetError(f"{self.ann_file}: no categories ('categories' is empty)")
        if not any(self._instances.values()):
            n, crowd = len(self.file.annotations), sum(a.iscrowd for a in self.file.annotations)
            why = (
                f"all {n} annotations are crowd ({crowd}) or degenerate ({n - crowd})"
                if n
                else "'annotations' is empty"
            )
            raise DatasetError(f"{self.ann_file}: no instances ({why})")

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
        """pycocotools index for evaluation (``CocoFile.to_pycocotools``: degenerate annotations dropped)."""
        if self._coco is None:
            self._coco = self.file.to_pycocotools()
        return self._coco

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image from the JSON, in dataset order; no image is read."""
        return [(self.file.images[i].height, self.file.images[i].width) for i in self.image_ids]

    def image_path(self, index: int) -> Path:
        return self._paths[self.image_ids[index]]

    def load_image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of image ``index``, checked against the JSON's size."""
        image_id = self.image_ids[index]
        image = load_rgb(self.image_path(index), percentiles=self.percentiles)
        self._check_size(image.shape[:2], image_id)
        return image

    def _check_size(self, hw: tuple[int, int], image_id: int) -> None:
        info = self.file.images[image_id]
        h, w = info.height, info.width
        if tuple(hw) != (h, w):
            hint = (
                "; height and width are swapped: EXIF orientation? annotations must be in the rotated frame"
                if tuple(hw) == (w, h)
                else ""
            )
            raise DatasetError(
                f"{self._paths[image_id]} is {hw[1]}x{hw[0]} (WxH) but {self.ann_file} "
                f"says {w}x{h} for image id {image_id}{hint}"
            )

    def get_targets(self, index: int) -> Targets:
        """Targets of image ``index`` in the original image frame (no transforms)."""
        image_id = self.image_ids[index]
        info = self.file.images[image_id]
        h, w = info.height, info.width
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
        info = self.file.images[image_id]
        image = to_tensor(self.load_image(index))
        targets = self.get_targets(index)
        if self.transforms is not None:
            image, targets = self.transforms(image, targets)
        return (
            image,
            targets,
            {
                "image_id": image_id,
                "file_name": info.file_name,
                "orig_size": (info.height, info.width),
            },
        )

    def bad_images(self, decode: bool = False, first: int = 0) -> dict[int, str]:
        """Every image whose file is missing, unreadable or of another size than the JSON says.

        Args:
            decode: decode every image fully (2.5 ms a kudzu photo; also catches truncated
                files). False reads only the headers, EXIF orientation honoured (0.1-0.2 ms a
                photo, measured with and without the page cache: 20 s for COCO's 118k).
            first: check only the first N images (0 = all), as a ``max_images`` run uses.

        Returns:
            ``{image id: what is wrong, naming the file}``, in dataset order; empty if all good.
        """
        indices = range(len(self) if first <= 0 else min(first, len(self)))

        def problem(index: int) -> str | None:
            try:
                if decode:
                    self.load_image(index)
                else:
                    self._check_size(image_size(self.image_path(index)), self.image_ids[index])
            except DatasetError as e:
                return str(e)
            return None

        found = [problem(i) for i in indices]
        return {self.image_ids[i]: p for i, p in zip(indices, found) if p is not None}

    def validate(self, decode: bool = True, first: int = 0) -> None:
        """Check every image file up front (``bad_images``).

        Raises:
            DatasetError: counting every bad image and naming the first ``SHOWN_PROBLEMS``.
        """
        problems = self.bad_images(decode, first)
        if problems:
            checked = len(self) if first <= 0 else min(first, len(self))
            raise DatasetError(describe_problems(str(self.ann_file), checked, problems))

    def __repr__(self) -> str:
        n = sum(len(v) for v in self._instances.values())
        return f"CocoDataset({str(self.ann_file)!r}, {len(self)} images, {n} instances, {self.num_classes} classes)"
