"""YOLO segmentation datasets <-> COCO: ``yolo_to_coco`` reads one split of a ``data.yaml``
dataset, ``YoloWriter`` writes predictions as YOLO label files.

Layout (Ultralytics): ``data.yaml`` with ``path`` (the dataset root; default the YAML's folder,
relative paths taken from the YAML's folder), ``train`` / ``val`` / ``test`` (a folder of images,
a ``.txt`` list of image paths, or a list of either, relative to the root) and ``names`` (a
list, or a dict class index -> name). An image ``.../images/<rest>/x.jpg`` has its labels in
``.../labels/<rest>/x.txt`` (no file: no objects), one object a line:
``class x0 y0 x1 y1 ...``, a polygon in coordinates normalised by the image width and height.
A line of exactly four numbers after the class is a detection box, not a mask: named as not
converted, as is a label file in a split folder's label folder that no image of the split has. Class
``c`` becomes COCO category id ``c + 1``. One line is one instance: a mask in several parts is
one polygon whose parts are joined by paths there and back (Ultralytics' ``merge_multi_segment``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatasetError
from .common import EXPORT_TOLERANCE, CocoBuilder, ExportFolder, detection_rings, number

if TYPE_CHECKING:
    from ...inference.results import Result

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm"}
_SLACK = 0.01  # above 1 by rounding in other tools' output (ultralytics refuses anything above 1)


def read_data_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"dataset file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DatasetError(f"{path}: cannot read it as YAML: {e}") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DatasetError(f"{path}: a YOLO data.yaml needs 'names' (and 'train' / 'val')")
    return data


def class_names(data: dict[str, Any], where: str) -> list[str]:
    names = data["names"]
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DatasetError(f"{where}: 'names' keys must be the class indices 0..{len(names) - 1}")
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{where}: 'names' must be a non-empty list or dict")
    if data.get("nc") is not None and data["nc"] != len(names):
        raise DatasetError(f"{where}: nc is {data['nc']!r} but names has {len(names)} class(es)")
    return [str(n) for n in names]


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, suffix ``.txt``."""
    parts = list(image.parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _split_images(root: Path, entry: Any, where: str) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for e in entries:
        p = root / str(e)
        if p.is_dir():
            images += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix == ".txt" and p.is_file():
            for line in p.read_text().splitlines():
                if line.strip():
                    q = Path(line.strip())
                    images.append(q if q.is_absolute() else (p.parent / q))
        else:
            raise DatasetError(f"{where}: split entry {e!r} is neither a folder nor a .txt list under {root}")
    return images


def _orphan_labels(root: Path, entry: Any, images: list[Path]) -> list[Path]:
    """Label files of the split that no image of it has, under the label folder of each of its
    image folders. (The images of a ``.txt`` list often share their folders with other splits,
    whose labels are no orphans: those folders are not searched.)"""
    folders = [root / str(e) for e in (entry if isinstance(entry, list) else [entry])]
    found = {t for f in folders if f.is_dir() for t in label_path(f / "x").parent.rglob("*.txt")}
    return sorted(found - {label_path(p) for p in images})


def yolo_to_coco(
    data_yaml: str | Path,
    out_json: str | Path,
    split: str = "train",
    allow_outside_root: bool = False,
    classes: Sequence[str] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Convert one split of a YOLO segmentation dataset to COCO JSON and write it.

    Args:
        data_yaml: the dataset's ``data.yaml``.
        out_json: COCO JSON to write.
        split: ``train``, ``val`` or ``test`` (a key of the YAML).
        allow_outside_root: accept images listed outside the dataset root.
        classes: the class names, category ids 1.. in this order (``--classes``); an instance of
            another label is named as not converted. None: ``names``, in class index order.

    Returns:
        The COCO dict (image ids 1.. in the split's order, ``file_name`` relative to the root,
        every class of ``names`` a category) and the dataset root (the image folder to train with).

    Raises:
        DatasetError: a malformed YAML or label line (named by file and line), a class index
            outside ``names``, a missing image.
    """
    data_yaml = Path(data_yaml)
    data = read_data_yaml(data_yaml)
    names = class_names(data, str(data_yaml))
    root = data_yaml.parent / str(data.get("path") or ".")
    if split not in data or data[split] in (None, ""):
        raise DatasetError(
            f"{data_yaml}: no '{split}' split (has {', '.join(k for k in ('train', 'val', 'test') if data.get(k))})"
        )
    builder = CocoBuilder(data_yaml, root, allow_outside_root)
    images = _split_images(root, data[split], str(data_yaml))
    for orphan in _orphan_labels(root, data[split], images):
        builder.skip(str(orphan), f"a label file that no {split} image has")
    for path in images:
        image = builder.add_image(os.path.relpath(path, root), None, None, f"{data_yaml}: {split} image {path}")
        labels = label_path(path)
        if not labels.is_file():
            continue
        for n, line in enumerate(labels.read_text().splitlines(), 1):
            where = f"{labels} line {n}"
            fields = line.split()
            if not fields:
                continue
            try:
                cls = int(fields[0])
            except ValueError:
                raise DatasetError(f"{where}: class {fields[0]!r} is not an integer") from None
            if not 0 <= cls < len(names):
                raise DatasetError(f"{where}: class {cls} is not one of the {len(names)} in {data_yaml}")
            coords = [number(v, where) for v in fields[1:]]
            if len(coords) == 4:
                builder.skip(where, "a detection box (4 numbers), not a polygon")
                continue
            if len(coords) % 2:
                raise DatasetError(f"{where}: {len(coords)} coordinates, not x y pairs")
            if max(coords) > 1 + _SLACK:  # scaled by the image size, it would land far outside and be cut away
                raise DatasetError(
                    f"{where}: coordinate {max(coords):g} is above 1: YOLO coordinates are fractions of "
                    "the image's width and height; pixel coordinates must be divided by them"
                )
            poly = [v * (image.width if i % 2 == 0 else image.height) for i, v in enumerate(coords)]
            builder.add_polygons(image, names[cls], [poly], where)
    if not builder.images:
        raise DatasetError(f"{data_yaml}: the {split} split holds no images")
    return builder.write(out_json, "YOLO", classes, declared=names), root


def bridged(rings: list[np.ndarray]) -> np.ndarray:
    """One (K, 2) polygon of a mask's rings: each later ring joined to the first at their closest
    vertices by a path there and back, which adds no area (YOLO has one polygon per object)."""
    base, joins = rings[0], {}
    for ring in rings[1:]:
        d = ((base[:, None, :] - ring[None, :, :]) ** 2).sum(axis=2)  # (K0, Kr) squared distances
        i, j = np.unravel_index(int(d.argmin()), d.shape)
        loop = np.roll(ring, -int(j), axis=0)  # starts at its vertex closest to the first ring
        joins.setdefault(int(i), []).append(np.vstack([loop, loop[:1], base[i : i + 1]]))
    return np.vstack([part for i, v in enumerate(base) for part in (v[None], *joins.get(i, []))])


class YoloWriter:
    """Predictions as a YOLO segmentation dataset ``out/yolo/`` that Ultralytics and
    ``yolo_to_coco`` read: ``images/<name><suffix>``, a copy of each image (YOLO tools find an
    image's labels by replacing ``images`` in its path with ``labels``, so the labels cannot
    sit beside the user's own images without writing into their folders);
    ``labels/<name>.txt``, one line per detection, ``class x0 y0 ...`` normalised (a mask in
    several parts ``bridged``); and, at ``close``, ``data.yaml`` with ``path`` (absolute:
    Ultralytics takes a relative one from the current folder), ``train`` and ``val`` (both
    ``images``) and ``names``. A detection of COCO category id ``c`` gets class ``c - 1`` (the
    reverse of ``yolo_to_coco``).

    Args:
        out: predict's output folder.
        classes: the model's class names by category id (``common.class_list``), class index
            ``c`` naming category ``c + 1``: all in ``names`` whether detected or not (default:
            the names of those detected, ``class_<c>`` for gaps).
        tolerance: polygon simplification in pixels.
    """

    def __init__(self, out: Path, classes: Sequence[str] = (), tolerance: float = EXPORT_TOLERANCE) -> None:
        self.folder = ExportFolder(Path(out) / "yolo", "maskrcnn predict --export")
        self.classes = list(classes)
        self.names: dict[int, str] = {}  # class index -> name, of those detected
        self.tolerance = tolerance
        self.copied = 0

    def targets(self, images: dict[str, Path]) -> list[Path]:
        root = self.folder.root
        return [
            *(root / "images" / f"{n}{Path(p).suffix}" for n, p in images.items()),
            *(root / "labels" / f"{n}.txt" for n in images),
            root / "data.yaml",
        ]

    def check(self, images: dict[str, Path]) -> None:
        self.folder.check(self.targets(images))

    def add(self, image_id: int, name: str, path: Path, result: Result) -> None:
        h, w = result.image_size
        lines = []
        for category, (_, label, _, rings) in zip(result.category_ids, detection_rings(result, self.tolerance)):
            cls = int(category) - 1
            self.names.setdefault(cls, label)
            if rings:
                xy = bridged(rings) / [w, h]  # (K, 2) normalised
                lines.append(" ".join([str(cls), *(f"{v:.6f}" for v in xy.clip(0, 1).ravel())]))
        self.folder.write(self.folder.root / "images" / f"{name}{Path(path).suffix}", Path(path).read_bytes())
        self.copied += 1
        self.folder.write(self.folder.root / "labels" / f"{name}.txt", "".join(f"{s}\n" for s in lines).encode())

    def close(self) -> None:
        import yaml

        names = {**self.names, **dict(enumerate(self.classes))}
        names = {c: names.get(c, f"class_{c}") for c in range(max(names, default=-1) + 1)}
        data = {
            "path": str(self.folder.root.resolve()),
            "train": "images",
            "val": "images",
            "names": names,
            "nc": len(names),
        }
        self.folder.write(self.folder.root / "data.yaml", yaml.safe_dump(data, sort_keys=False).encode())
        self.folder.close(remove_stale=True)
        logger.info("copied %d image(s) into %s, beside their labels", self.copied, self.folder.root / "images")
