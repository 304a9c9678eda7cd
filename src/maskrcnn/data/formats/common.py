"""What the annotation-tool readers and writers share.

Readers collect images and instances into a ``CocoBuilder``, which checks every image file
(inside the image folder, present, of the size the tool says), clips polygons to the image,
names each thing it could not convert (a shape, a task, a label file: the conversion goes on
without it), then writes the COCO dict and reads it back through ``read_coco``: a converted file
passes the same checks as any COCO file, wherever it came from. What was not converted is
logged with a count per reason and listed in full in the file's ``info.not_converted``.

Writers of pre-annotations share ``ExportFolder``: every file goes through ``atomic_write``, and a
file that is already there is replaced only if it is byte for byte what an earlier export wrote
(a SHA-256 manifest in the folder). A file the user corrected in their tool is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as mask_util

from ...files import atomic_write, write_json
from ..coco import EDGE_TOLERANCE, image_path, read_coco, segmentation_to_mask
from ..errors import DatasetError
from ..images import image_size

if TYPE_CHECKING:
    from ...config import ModelConfig
    from ...inference.results import Result

logger = logging.getLogger(__name__)

# Vertices of the polygon that stands in for a circle or an ellipse (as ``via.py``).
ELLIPSE_VERTICES = 32
# Skipped things named in the warning; the rest are counted there and all listed in the file.
SHOWN_SKIPPED = 10
# Polygon simplification of the exported pre-annotations, pixels. On the first 6 kudzu validation
# photos (147 instances, ground-truth masks traced back), 1 px left 121 instances below mask IoU
# 0.98 after the round trip (the worst 0.59) and 0.5 px 13; 0.25 px gives every mask back exactly
# (IoU 1.0) with 36 vertices per instance on average (0 px: 104 vertices, the same masks).
EXPORT_TOLERANCE = 0.25
# How converted COCO files begin their description: such a file may be replaced by a new conversion.
CONVERTED = "converted from "
# The file beside a LabelMe or Label Studio export that names the model's classes, one a line.
CLASSES_FILE = "classes.txt"
# Lines of LabelMe's own ``labels.txt`` (its ``--labels`` file) that name no class.
NOT_CLASSES = ("__ignore__", "_background_")


def read_classes(spec: str | Path) -> list[str]:
    """``--classes``: a text file of one class name a line (blank lines and LabelMe's
    ``__ignore__`` / ``_background_`` lines left out), or names separated by commas. The
    category ids are 1..K in this order. ValueError when it names no class or one twice."""
    path = Path(spec)
    if path.is_file():
        names = [n.strip() for n in path.read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n and n not in NOT_CLASSES]
    else:
        names = [n.strip() for n in str(spec).split(",") if n.strip()]
    if not names:
        raise ValueError(f"--classes {spec}: names no class (a file of one name a line, or 'a,b,c')")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--classes {spec}: names {', '.join(twice)} more than once")
    return names


def class_list(config: ModelConfig) -> list[str]:
    """The model's classes by category id: entry ``c - 1`` names category id ``c``, for every id
    1..the largest (``class_<label>`` for an unnamed label, ``class_<c>`` for an id no label
    has). What the exports carry, so that ``convert --classes`` numbers them as the model does."""
    categories = config.label_categories()[1:]
    names = {c: n or f"class_{k + 1}" for k, (c, n) in enumerate(zip(categories, config.label_names()[1:]))}
    return [names.get(c, f"class_{c}") for c in range(1, max(categories, default=0) + 1)]


def number(value: Any, where: str, what: str = "coordinate") -> float:
    """A finite float from a JSON/XML number or numeric string; anything else is a DatasetError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DatasetError(f"{where}: {what} {value!r:.40} is not a number")
    try:
        v = float(value)
    except ValueError:
        raise DatasetError(f"{where}: {what} {value!r:.40} is not a number") from None
    if not math.isfinite(v):
        raise DatasetError(f"{where}: {what} {value!r} is not finite")
    return v


def ellipse(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0) -> list[float]:
    """Flat ``[x0, y0, ...]`` polygon of an ellipse rotated by ``theta`` radians (clockwise on screen)."""
    t = np.linspace(0.0, 2 * math.pi, ELLIPSE_VERTICES, endpoint=False)
    x = cx + rx * np.cos(t) * math.cos(theta) - ry * np.sin(t) * math.sin(theta)
    y = cy + rx * np.cos(t) * math.sin(theta) + ry * np.sin(t) * math.cos(theta)
    return [float(v) for xy in zip(x, y) for v in xy]


def rotated_rect(x1: float, y1: float, x2: float, y2: float, theta: float = 0.0, about: str = "center") -> list[float]:
    """Flat polygon of the box x1..x2, y1..y2 turned by ``theta`` radians (clockwise on screen,
    y down) about its centre or its top-left corner (``about="corner"``, Label Studio's rule)."""
    corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)  # (4, 2)
    if theta:
        origin = corners.mean(axis=0) if about == "center" else corners[0]
        c, s = math.cos(theta), math.sin(theta)
        corners = (corners - origin) @ np.array([[c, s], [-s, c]]) + origin
    return [float(v) for v in corners.ravel()]


def clip_polygon(xy: np.ndarray, width: float, height: float) -> np.ndarray:
    """The part of polygon ``xy`` ((K, 2) x, y) inside the image ``0..width`` x ``0..height``:
    Sutherland-Hodgman against the four edges, exact for a rectangle. (Pushing each vertex
    outside to the edge instead changes the shape: a triangle with one corner 20 px above a
    128 x 128 image kept 1142 of its 1863 px inside.) Returns (M, 2), M < 3 when nothing is
    inside; a concave polygon cut in two comes back joined along the edge (no area there)."""
    for axis, bound, keep_below in ((0, 0.0, False), (0, width, True), (1, 0.0, False), (1, height, True)):
        if len(xy) == 0:
            break
        inside = xy[:, axis] <= bound if keep_below else xy[:, axis] >= bound
        prev, prev_in = xy[-1], inside[-1]
        out = []
        for cur, cur_in in zip(xy, inside):
            if cur_in != prev_in:  # the edge prev -> cur crosses the line: add the crossing
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                point = prev + t * (cur - prev)
                point[axis] = bound
                out.append(point)
            if cur_in:
                out.append(cur)
            prev, prev_in = cur, cur_in
        xy = np.array(out, dtype=np.float64).reshape(-1, 2)
    return xy


@dataclass
class _Image:
    id: int
    file_name: str
    width: int
    height: int


@dataclass
class CocoBuilder:
    """Collects one source's images and instances and writes them as checked COCO JSON.

    Args:
        source: the tool's file or folder, named in messages and in ``info.description``.
        image_dir: the folder COCO ``file_name`` is relative to.
        allow_outside_root: accept file names that are absolute or lead out of ``image_dir``.
    """

    source: Path
    image_dir: Path
    allow_outside_root: bool = False
    images: list[_Image] = field(default_factory=list)
    instances: list[tuple[int, str, Any, str]] = field(default_factory=list)  # image id, category, segmentation, where
    skipped: list[tuple[str, str]] = field(default_factory=list)  # where, why
    clipped: int = 0
    _names: dict[str, str] = field(default_factory=dict)  # file name -> where it was listed
    _ids: dict[int, _Image] = field(default_factory=dict)

    def add_image(
        self, file_name: str, width: int | None, height: int | None, where: str, image_id: int | None = None
    ) -> _Image:
        """Register an image; ``width``/``height`` (the tool's, or None to read them) must match
        the file. ``image_id`` None: the next of 1, 2, ... Raises DatasetError."""
        file_name = Path(os.path.normpath(file_name)).as_posix()
        if file_name in self._names:
            raise DatasetError(f"{where}: image {file_name} is already listed by {self._names[file_name]}")
        path = image_path(self.image_dir, file_name, self.allow_outside_root, where)
        try:
            h, w = image_size(path)
        except DatasetError as e:
            raise DatasetError(f"{where}: {e}") from None
        if (width, height) != (None, None) and (width, height) != (w, h):
            raise DatasetError(f"{where}: the tool says {width}x{height} (WxH) but {path} is {w}x{h}")
        if image_id is None:
            image_id = max(self._ids, default=0) + 1
        if image_id in self._ids:
            raise DatasetError(f"{where}: image id {image_id} appears twice")
        self._names[file_name] = where
        self.images.append(_Image(image_id, file_name, w, h))
        self._ids[image_id] = self.images[-1]
        return self.images[-1]

    def add_polygons(self, image: _Image, category: str, polygons: list[list[float]], where: str) -> None:
        """One instance made of flat ``[x0, y0, ...]`` polygons (pixel edges), clipped to the image."""
        kept = []
        for poly in polygons:
            if len(poly) < 6 or len(poly) % 2:
                self.skip(where, "a polygon of fewer than 3 points")
                continue
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)  # (K, 2)
            size = np.array([image.width, image.height], dtype=np.float64)
            if ((xy < -EDGE_TOLERANCE) | (xy > size + EDGE_TOLERANCE)).any():
                self.clipped += 1
                xy = clip_polygon(xy, float(image.width), float(image.height))
                if len(xy) < 3:  # wholly outside
                    continue
            kept.append([float(v) for v in xy.ravel()])
        if kept:
            self.instances.append((image.id, category, kept, where))
        elif polygons:
            self.skip(where, "no pixel inside the image")

    def add_parts(self, image: _Image, category: str, parts: list[list[float] | np.ndarray], where: str) -> None:
        """One instance drawn in several parts (a tool's group): flat polygons, or (H, W) bool
        masks among them, when the instance is the union of their pixels."""
        if all(isinstance(p, list) for p in parts):
            self.add_polygons(image, category, parts, where)  # type: ignore[arg-type]
            return
        mask = np.zeros((image.height, image.width), dtype=bool)
        for p in parts:
            mask |= p if isinstance(p, np.ndarray) else segmentation_to_mask([p], image.height, image.width) > 0
        self.add_mask(image, category, mask, where)

    def add_mask(self, image: _Image, category: str, mask: np.ndarray, where: str) -> None:
        """One instance from an (H, W) bool mask of the whole image."""
        if mask.shape != (image.height, image.width):
            raise DatasetError(
                f"{where}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {image.width}x{image.height}"
            )
        if not mask.any():
            self.skip(where, "an empty mask")
            return
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        counts = rle["counts"].decode("ascii")
        self.instances.append((image.id, category, {"size": [image.height, image.width], "counts": counts}, where))

    def skip(self, where: str, why: str) -> None:
        """Name a thing that does not become an instance or image (a shape without area or of a
        kind COCO has no form for, a task or file that holds none); ``why`` is the reason the
        warning counts, so it names no particular file or shape."""
        self.skipped.append((where, why))

    def write(
        self,
        out_json: str | Path,
        tool: str,
        classes: Sequence[str] | None = None,
        declared: Sequence[str] = (),
        seen: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Write the COCO JSON and read it back with ``read_coco``. Returns the dict written.

        Categories, ids 1..K: ``classes`` (``--classes``) exactly, in its order, an instance of
        any other label named as not converted; else the file's own class list ``declared``
        (CVAT ``<labels>``, YOLO ``names``), every one kept, then the other labels of converted
        instances in ``seen`` order (first appearance), then sorted; a label that only shapes
        that were not converted carry is no category.
        """
        out_json = Path(out_json)
        refuse_replacing(out_json, self.source)
        annotations = []
        for image_id, category, seg, where in self.instances:
            if classes is not None and category not in classes:
                self.skip(where, f"label {category!r} is not in --classes")
                continue
            im = self._ids[image_id]
            rle = (
                mask_util.merge(mask_util.frPyObjects(seg, im.height, im.width))
                if isinstance(seg, list)
                else {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
            )
            if not mask_util.area(rle):  # a degenerate shape (a zero-radius circle), or one too thin for a pixel
                self.skip(where, "no area (no pixel centre inside the shape)")
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,  # its name until the ids are known
                    "iscrowd": 0,
                    "segmentation": seg,
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                }
            )
        if classes is not None:
            names = list(classes)
        else:
            used = {a["category_id"] for a in annotations}
            names = list(dict.fromkeys([*declared, *(n for n in seen if n in used), *sorted(used)]))
        ids = {name: k + 1 for k, name in enumerate(names)}
        for a in annotations:
            a["category_id"] = ids[a["category_id"]]
        coco = {
            "info": {"description": f"{CONVERTED}{tool} {self.source.name}"},
            "images": [vars(im) for im in self.images],
            "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in ids.items()],
        }
        if self.clipped:
            logger.warning("%s: clipped %d polygon(s) with vertices outside their image", self.source, self.clipped)
        if self.skipped:
            coco["info"]["not_converted"] = [f"{where}: {why}" for where, why in self.skipped]
            logger.warning("%s", self.not_converted(out_json))
        coco["info"]["content_sha256"] = content_digest(coco)  # a later run replaces the file only unedited
        write_json(coco, out_json)
        read_coco(out_json)  # the COCO reader's checks, on what was written
        logger.info("%s: %d images, %d instances -> %s", self.source, len(self.images), len(annotations), out_json)
        return coco

    def not_converted(self, out_json: Path) -> str:
        """The warning: how many things were not converted, per reason, the first of them by name."""
        counts = ", ".join(f"{why}: {n}" for why, n in Counter(why for _, why in self.skipped).items())
        lines = [f"{where}: {why}" for where, why in self.skipped[:SHOWN_SKIPPED]]
        if len(self.skipped) > SHOWN_SKIPPED:
            lines.append(f"... and {len(self.skipped) - SHOWN_SKIPPED} more: all in {out_json}'s info.not_converted")
        return f"{self.source}: {len(self.skipped)} not converted ({counts}):\n  " + "\n  ".join(lines)


def content_digest(coco: dict[str, Any]) -> str:
    """sha256 of the file's JSON without its own ``info.content_sha256``: tells a converted file
    that was edited since (by hand or by a tool) from one as convert wrote it."""
    info = {k: v for k, v in coco.get("info", {}).items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps({**coco, "info": info}, default=str).encode("utf-8")).hexdigest()


def refuse_replacing(out: Path, source: Path) -> None:
    """ValueError if ``out`` is the source, or an existing file that convert did not write or
    that was changed since (an edited annotation file is work that must not be lost)."""
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the source file; choose another name")
    if not out.exists():
        return
    try:
        coco = json.loads(out.read_text(encoding="utf-8"))
        info = coco.get("info", {})
        ours = str(info.get("description", "")).startswith(CONVERTED) and info.get("content_sha256") == content_digest(
            coco
        )
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(
            f"{out} exists and was not written by maskrcnn convert, or was changed since, so it is not "
            "replaced; choose another --out"
        )


# ---- pre-annotation export --------------------------------------------------------------------


class ExportFolder:
    """Files that one command writes under ``root`` (pre-annotations, report pictures), with the
    manifest of what it wrote.

    ``check`` refuses (ValueError) to replace a file that the manifest does not vouch for;
    ``write`` writes atomically and records the digest; ``close`` saves the manifest and, with
    ``remove_stale``, removes the files of an earlier run that this one did not write (a rerun on
    fewer images must not leave the others' pre-annotations to be converted with its own), but
    only those still as written: an edited one is kept and named in a warning.

    Args:
        root: the folder.
        made_by: the command, as the refusal names it ("maskrcnn predict --export").
    """

    MANIFEST = ".maskrcnn-export.json"

    def __init__(self, root: Path, made_by: str) -> None:
        self.root = Path(root)
        self.made_by = made_by
        path = self.root / self.MANIFEST
        try:
            self.digests: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            self.digests = {}
        self.written: set[str] = set()

    def check(self, paths: list[Path]) -> None:
        for p in paths:
            if (p.exists() or p.is_symlink()) and self.digests.get(self._key(p)) != _digest(p):
                raise ValueError(
                    f"{p} exists and is not an unchanged file of an earlier {self.made_by} (edited "
                    "since?), so it is not replaced; choose another --out folder"
                )

    def write(self, path: Path, data: bytes) -> None:
        self.check([path])
        atomic_write(path, lambda f: f.write(data))
        self.digests[self._key(path)] = hashlib.sha256(data).hexdigest()
        self.written.add(self._key(path))

    def close(self, remove_stale: bool = False) -> None:
        edited = []
        for key in sorted(set(self.digests) - self.written) if remove_stale else []:
            path = self.root / key
            if _digest(path) == self.digests[key]:
                path.unlink()
            elif path.exists():
                edited.append(key)
                continue  # still vouched for as it was written: a later run warns again
            del self.digests[key]
        if edited:
            logger.warning(
                "%s: kept %d file(s) of an earlier %s that this run did not write, since they were edited: "
                "%s; they are not this run's predictions (delete or move them before converting the folder)",
                self.root,
                len(edited),
                self.made_by,
                ", ".join(edited),
            )
        write_json(self.digests, self.root / self.MANIFEST, indent=1)

    def _key(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()


def write_classes(folder: ExportFolder, names: Sequence[str]) -> None:
    """``folder/classes.txt``: ``names`` (once each, in order), one a line."""
    text = "".join(f"{n}\n" for n in dict.fromkeys(names))
    folder.write(folder.root / CLASSES_FILE, text.encode("utf-8"))


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def detection_rings(result: Result, tolerance: float) -> list[tuple[int, str, float, list[np.ndarray]]]:
    """Per detection: label, class name (``class_<label>`` when unnamed), score and the exterior
    rings of its mask's polygons as (K, 2) float arrays of pixel-edge x, y (no repeated last
    vertex). Holes are left out: LabelMe, YOLO and CVAT polygons have none."""
    from ...inference.polygons import result_polygons

    if result.rles is None:
        raise ValueError("the model has no masks: polygon pre-annotations need a mask model")
    out = []
    for k, polys in enumerate(result_polygons(result, tolerance)):
        rings = [np.asarray(p.exterior.coords, dtype=np.float64)[:-1] for p in polys]
        name = result.class_names[k] or f"class_{int(result.labels[k])}"
        out.append((int(result.labels[k]), name, float(result.scores[k]), [r for r in rings if len(r) >= 3]))
    return out
