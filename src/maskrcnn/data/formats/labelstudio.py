"""Label Studio JSON export <-> COCO: ``labelstudio_to_coco`` reads an export,
``LabelStudioWriter`` writes predictions as tasks with pre-annotations.

The export is a list of tasks ``{"id", "data": {"image": url}, "annotations": [{"result":
[...], "was_cancelled"}], "predictions": [{"result": [...]}]}``. Each result has a ``type``,
``original_width`` / ``original_height`` and a ``value`` in *percent* of the image size:
``polygonlabels`` (``points`` [[x%, y%], ...]), ``rectanglelabels`` (``x, y, width, height,
rotation``: degrees clockwise about the top-left corner), ``ellipselabels`` (``x, y`` centre,
``radiusX, radiusY, rotation``) and ``brushlabels`` (``format: "rle"``, ``rle``: Label Studio's
own bit-packed run-length code of the RGBA pixels, see ``decode_brush``). Other result types
(keypoints, choices, text) and a region with several labels are named as not converted.

Which results: a task's first annotation that is not cancelled (Label Studio keeps one per
annotator): what a person submitted. ``predictions`` are pre-annotations nobody has accepted
yet (``LabelStudioWriter`` writes them): a task that has only those is named as not converted,
unless ``predictions=True`` (``convert labelstudio --predictions``), which takes its first
prediction; an annotated task's predictions are never used. A task with no annotation, or only
cancelled ("skipped") ones, is named as not converted rather than taken for an image without
objects.

Image URLs map to files under the image folder by their path: for ``/data/local-files/?d=dir/
photo.jpg`` the ``d`` path (relative to Label Studio's local-files document root), for any
other URL (``/data/upload/3/8f1e2d3c-photo.jpg``, ``s3://bucket/dir/photo.jpg``) or a plain
path its path. The file name is the longest tail of that path that is a file under the image
folder, so the folder may be the document root (``dir/photo.jpg``) or a folder below it
(``photo.jpg``); an upload's name is also tried without the 8-hex-digit prefix Label Studio
puts in front of uploaded files. A path with ``..`` parts is only matched below them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as mask_util

from ..coco import read_json
from ..errors import DatasetError
from .common import (
    CLASSES_FILE,
    EXPORT_TOLERANCE,
    CocoBuilder,
    ExportFolder,
    detection_rings,
    ellipse,
    number,
    rotated_rect,
    write_classes,
)

if TYPE_CHECKING:
    from ...inference.results import Result

logger = logging.getLogger(__name__)

UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(.+)$")
TYPES = ("polygonlabels", "rectanglelabels", "ellipselabels", "brushlabels")
# Bits of rle-pack's four run-length fields (thi.ng's defaults, as Label Studio writes them).
RLE_SIZES = (3, 4, 8, 16)


def decode_brush(rle: list[int], height: int, width: int) -> np.ndarray:
    """(height, width) bool of a Label Studio brush RLE (the alpha channel, non-zero = drawn).

    The code (thi.ng ``rle-pack``): a bit stream of 32 bits value count, 5 bits word size - 1,
    4 x 4 bits run-length field sizes - 1; then blocks of a flag bit, 2 bits choosing a size,
    that many bits of length - 1, and either one word repeated (flag 1) or ``length`` words.
    The values are the RGBA bytes of the image, row-major.
    """
    bits = np.unpackbits(np.asarray(rle, dtype=np.uint8))
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > len(bits):
            raise ValueError("the brush RLE ends early")
        v = int(bits[pos : pos + n].astype(np.int64) @ (1 << np.arange(n - 1, -1, -1, dtype=np.int64)))
        pos += n
        return v

    num, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    if num != height * width * 4:
        raise ValueError(f"the brush RLE holds {num} values, not height*width*4 = {height}*{width}*4")
    out = np.zeros(num, dtype=np.uint32)
    i = 0
    while i < num:
        repeat = read(1)
        j = min(i + 1 + read(sizes[read(2)]), num)
        if repeat:
            out[i:j] = read(word)
        else:
            out[i:j] = [read(word) for _ in range(j - i)]
        i = j
    return out.reshape(height, width, 4)[..., 3] > 0


def encode_brush(mask: np.ndarray) -> list[int]:
    """``decode_brush``'s code of an (H, W) bool mask: RGBA bytes 255 where drawn, 0 elsewhere
    (as Label Studio's converter writes masks), each run one repeated-word block."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)  # (H*W,)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bits = [f"{flat.size * 4:032b}", f"{8 - 1:05b}", "".join(f"{n - 1:04b}" for n in RLE_SIZES)]
    for start, end in zip(np.r_[0, change], np.r_[change, flat.size]):
        n, word = int(end - start) * 4, "11111111" if flat[start] else "00000000"  # 4 bytes a pixel
        while n:
            chunk = min(n, 1 << RLE_SIZES[3])
            bits.append(f"1{3:02b}{chunk - 1:0{RLE_SIZES[3]}b}{word}")  # repeat, size field 3, length - 1, word
            n -= chunk
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return np.packbits(np.frombuffer(stream.encode("ascii"), dtype=np.uint8) - ord("0")).tolist()


def _image_file(url: str, image_dir: Path) -> str:
    """The file name under ``image_dir`` that a task's image URL names (the module docstring's rule)."""
    parsed = urllib.parse.urlparse(url)
    query = urllib.parse.parse_qs(parsed.query)
    path = query["d"][0] if "d" in query else urllib.parse.unquote(parsed.path)
    parts = [p for p in PurePosixPath(path.replace("\\", "/")).parts if p != "/"]
    if not parts:
        return path
    tails = [PurePosixPath(*parts[k:]) for k in range(len(parts)) if ".." not in parts[k:]]
    match = UPLOAD_PREFIX.match(parts[-1])
    for tail in [*tails, *([PurePosixPath(match[1])] if match else [])]:
        if (image_dir / tail).is_file():
            return tail.as_posix()
    return parts[-1]  # not there: add_image names the missing file


def _shape(kind: str, value: dict[str, Any], w: int, h: int, where: str) -> list[float] | np.ndarray:
    sx, sy = w / 100.0, h / 100.0
    if kind == "brushlabels":
        if value.get("format") != "rle" or not isinstance(value.get("rle"), list):
            raise DatasetError(f"{where}: a brush result needs format 'rle' and an 'rle' list")
        try:
            return decode_brush(value["rle"], h, w)
        except ValueError as e:
            raise DatasetError(f"{where}: {e}") from None
    if kind == "polygonlabels":
        pts = value.get("points")
        if not isinstance(pts, list) or not all(isinstance(p, list) and len(p) == 2 for p in pts):
            raise DatasetError(f"{where}: 'points' must be a list of [x, y] pairs")
        return [number(p[0], where) * sx if i == 0 else number(p[1], where) * sy for p in pts for i in (0, 1)]
    v = {k: number(value.get(k, 0), where, k) for k in ("x", "y", "width", "height", "radiusX", "radiusY", "rotation")}
    theta = math.radians(v["rotation"])
    if kind == "rectanglelabels":
        x, y = v["x"] * sx, v["y"] * sy
        return rotated_rect(x, y, x + v["width"] * sx, y + v["height"] * sy, theta, about="corner")
    return ellipse(v["x"] * sx, v["y"] * sy, v["radiusX"] * sx, v["radiusY"] * sy, theta)


def labelstudio_to_coco(
    export_json: str | Path,
    image_dir: str | Path,
    out_json: str | Path,
    image_key: str = "image",
    predictions: bool = False,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Convert a Label Studio JSON export to COCO JSON and write it.

    Args:
        export_json: the "JSON" export, or a tasks file to import (a list of tasks).
        image_dir: the local-files document root, or a folder below it on the images' paths
            (the module docstring's rule).
        out_json: COCO JSON to write.
        image_key: the key of ``task["data"]`` holding the image URL (the ``<Image value="$image">``).
        predictions: convert a task that has no annotation from its first prediction.
        classes: the class names, category ids 1.. in this order (``--classes``); an instance of
            another label is named as not converted. None: the labels of converted results, in order of first appearance.

    Returns:
        The COCO dict: Label Studio's task ids as image ids (1, 2, ... past the largest for
        tasks without one), one annotation per area result; tasks without results to use are
        left out and named.

    Raises:
        DatasetError: not a list of tasks, no task to convert, a malformed result (named by
            task and result index), a missing image, or one of another size than
            ``original_width`` x ``original_height``.
    """
    export_json, image_dir = Path(export_json), Path(image_dir)
    tasks = read_json(export_json)
    if not isinstance(tasks, list):
        raise DatasetError(f"{export_json}: expected the JSON export's list of tasks, got {type(tasks).__name__}")
    builder = CocoBuilder(export_json, image_dir)  # tails without "..": never outside image_dir
    order: list[str] = []
    for n, task in enumerate(tasks):
        where = f"{export_json}: task {task.get('id', f'[{n}]') if isinstance(task, dict) else f'[{n}]'}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise DatasetError(f"{where}: a task needs a 'data' object")
        url = task["data"].get(image_key)
        if not isinstance(url, str):
            raise DatasetError(
                f"{where}: data has no image URL under {image_key!r} (keys: {sorted(task['data'])}); set --image-key"
            )
        results = _results(task, predictions, where, builder)
        if results is None:
            continue
        sizes = {(r.get("original_width"), r.get("original_height")) for r in results if isinstance(r, dict)}
        w, h = sizes.pop() if len(sizes) == 1 else (None, None)
        task_id = task.get("id")
        image = builder.add_image(
            _image_file(url, image_dir),
            w,
            h,
            f"{where} ({url})",
            image_id=task_id if isinstance(task_id, int) and not isinstance(task_id, bool) else None,
        )
        for k, r in enumerate(results):
            rwhere = f"{where} result {k}"
            kind = r.get("type") if isinstance(r, dict) else None
            if kind not in TYPES:
                builder.skip(rwhere, f"a {kind} result is not an area")
                continue
            value = r.get("value")
            names = value.get(kind) if isinstance(value, dict) else None
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise DatasetError(f"{rwhere}: value.{kind} must be a list of label names, got {names!r:.60}")
            if len(names) > 1:  # an instance has one category
                builder.skip(rwhere, f"{len(names)} labels on one region (ambiguous)")
                continue
            order.append(names[0])
            part = _shape(kind, value, image.width, image.height, rwhere)
            if isinstance(part, np.ndarray):
                builder.add_mask(image, names[0], part, rwhere)
            else:
                builder.add_polygons(image, names[0], [part], rwhere)
    if not builder.images:
        reasons = "; ".join(sorted({why for _, why in builder.skipped}))
        raise DatasetError(f"{export_json}: no task to convert" + (f" ({reasons})" if reasons else ""))
    return builder.write(out_json, "Label Studio", classes, seen=order)


def _results(task: dict[str, Any], predictions: bool, where: str, builder: CocoBuilder) -> list[Any] | None:
    """The results to convert of ``task`` (the module docstring's rule), or None when it has none
    to use (named in ``builder``)."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    done = [a for a in annotations if not a.get("was_cancelled")]
    guesses = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    if done:
        if len(done) > 1:
            logger.warning("%s: %d annotations; the first is used", where, len(done))
        return done[0].get("result") or []
    if guesses and predictions:
        return guesses[0].get("result") or []
    if guesses:
        builder.skip(where, "only predictions, no annotation (--predictions converts them)")
    elif annotations:
        builder.skip(where, "every annotation was cancelled (skipped in Label Studio)")
    else:
        builder.skip(where, "no annotation")
    return None


class LabelStudioWriter:
    """Predictions as Label Studio tasks with pre-annotations, ``out/labelstudio/tasks.json``
    (written at ``close``): one task per image, its ``predictions`` one result per detection
    with the detection's score: a ``polygonlabels`` region (points in percent of the image,
    holes dropped) for a mask in one part, a ``brushlabels`` region (``encode_brush``) for a
    mask in several, since a Label Studio polygon has one ring and regions have no groups. The
    labelling config: ``<Image name="image" value="$image"/>``, ``<PolygonLabels name="label"
    toName="image">`` and ``<BrushLabels name="brush" toName="image">``, both with the model's
    class names. Import the file into the project ("Import", JSON). Beside it ``classes.txt``, the
    model's class names one a line in category id order (``convert labelstudio --classes``).

    The image URL is Label Studio's local-files URL of the image's path relative to
    ``document_root``: start Label Studio with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true``
    and ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` set to that folder.

    Args:
        out: predict's output folder.
        document_root: the folder image paths are made relative to (default: the current one).
        classes: the model's class names by category id (``common.class_list``), all written
            whether detected or not, so ``convert`` numbers them back as the model does.
        tolerance: polygon simplification in pixels.
    """

    def __init__(
        self,
        out: Path,
        document_root: Path | None = None,
        classes: Sequence[str] = (),
        tolerance: float = EXPORT_TOLERANCE,
    ) -> None:
        self.folder = ExportFolder(Path(out) / "labelstudio", "maskrcnn predict --export")
        self.classes = list(classes)
        self.seen: list[str] = []  # labels detected, for those that ``classes`` lacks
        self.root = Path(document_root or Path.cwd()).resolve()
        self.tolerance = tolerance
        self.tasks: list[dict[str, Any]] = []
        self.outside = 0  # images outside the document root, which Label Studio will not serve

    def targets(self, images: dict[str, Path]) -> list[Path]:
        return [self.folder.root / "tasks.json", self.folder.root / CLASSES_FILE]

    def check(self, images: dict[str, Path]) -> None:
        self.folder.check(self.targets(images))

    def add(self, image_id: int, name: str, path: Path, result: Result) -> None:
        h, w = result.image_size
        results = []
        for k, (_, label, score, rings) in enumerate(detection_rings(result, self.tolerance)):
            self.seen.append(label)
            region = {
                "id": f"{image_id}_{k}",
                "to_name": "image",
                "original_width": w,
                "original_height": h,
                "image_rotation": 0,
                "score": round(score, 4),
            }
            if len(rings) == 1:
                pct = (rings[0] / [w / 100.0, h / 100.0]).clip(0, 100)  # (K, 2) percent of width, height
                value = {"points": pct.round(4).tolist(), "polygonlabels": [label]}
                results.append({**region, "type": "polygonlabels", "from_name": "label", "value": value})
            elif rings:
                mask = mask_util.decode(result.rles[k]).astype(bool)  # type: ignore[index]  # (h, w); rings imply masks
                value = {"format": "rle", "rle": encode_brush(mask), "brushlabels": [label]}
                results.append({**region, "type": "brushlabels", "from_name": "brush", "value": value})
        relative = os.path.relpath(Path(path).resolve(), self.root)
        self.outside += relative.startswith("..")
        scores = [float(s) for s in result.scores]
        self.tasks.append(
            {
                "data": {"image": "/data/local-files/?d=" + urllib.parse.quote(Path(relative).as_posix())},
                "meta": {"image_id": image_id},
                "predictions": [
                    {
                        "model_version": "maskrcnn",
                        "score": round(sum(scores) / len(scores), 4) if scores else 0.0,
                        "result": results,
                    }
                ],
            }
        )

    def close(self) -> None:
        if self.outside:
            logger.warning(
                "%d image(s) lie outside %s, the folder their local-files URLs are relative to: Label Studio "
                "serves only files below its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; run predict from a "
                "folder that holds the images",
                self.outside,
                self.root,
            )
        self.folder.write(self.folder.root / "tasks.json", json.dumps(self.tasks, indent=1).encode("utf-8"))
        write_classes(self.folder, [*self.classes, *self.seen])
        self.folder.close(remove_stale=True)
