"""CVAT for images 1.1 XML <-> COCO: ``cvat_to_coco`` reads an export, ``CvatWriter`` writes
predictions as an ``annotations.xml`` that CVAT imports into a task ("CVAT 1.1" format).

The file: ``<annotations><version>1.1</version><meta>...<labels><label><name>`` ... ``</meta>``
then one ``<image id name width height>`` per image holding its shapes:
``<polygon label points="x0,y0;x1,y1;...">``, ``<box label xtl ytl xbr ybr rotation>`` (degrees,
clockwise about the centre), ``<ellipse label cx cy rx ry rotation>`` and
``<mask label rle left top width height>``: the pixels of the box ``left, top, width x height``
in row-major order as alternating run lengths, the first run of zeros. Shapes of one label that
share a ``group_id`` (not 0; CVAT's "Group") are one instance, the union of their parts, as
CVAT's own COCO export makes them. ``polyline``, ``points``, ``cuboid``, ``skeleton`` and ``tag``
have no area; they and elements of any other kind are named as not converted.

CVAT's image ids are kept, so ids match the task's frame numbers in both directions.
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatasetError
from .common import (
    EXPORT_TOLERANCE,
    CocoBuilder,
    ExportFolder,
    detection_rings,
    ellipse,
    number,
    rotated_rect,
)

if TYPE_CHECKING:
    from ...inference.results import Result

logger = logging.getLogger(__name__)

NO_AREA = ("polyline", "points", "cuboid", "skeleton", "tag")
AREA = ("polygon", "box", "ellipse", "mask")


def decode_cvat_rle(counts: list[int], width: int, height: int) -> np.ndarray:
    """(height, width) bool from CVAT's mask RLE: alternating runs, zeros first, row-major."""
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(height, width)


def _attr(el: ET.Element, key: str, where: str) -> float:
    if key not in el.attrib:
        raise DatasetError(f"{where}: <{el.tag}> lacks the attribute {key!r}")
    return number(el.attrib[key], where, key)


def _mask(el: ET.Element, h: int, w: int, where: str) -> np.ndarray:
    left, top, mw, mh = (int(_attr(el, k, where)) for k in ("left", "top", "width", "height"))
    try:
        counts = [int(c) for c in el.attrib.get("rle", "").split(",")]
    except ValueError:
        raise DatasetError(f"{where}: mask 'rle' must be comma-separated integers") from None
    if any(c < 0 for c in counts) or sum(counts) != mw * mh:
        raise DatasetError(f"{where}: mask rle counts sum to {sum(counts)}, not width*height = {mw}*{mh}")
    if left < 0 or top < 0 or left + mw > w or top + mh > h:
        raise DatasetError(f"{where}: mask box {left},{top} {mw}x{mh} is outside the {w}x{h} image")
    full = np.zeros((h, w), dtype=bool)
    full[top : top + mh, left : left + mw] = decode_cvat_rle(counts, mw, mh)
    return full


def _polygon(el: ET.Element, where: str) -> list[float]:
    if el.tag == "polygon":
        try:
            pairs = [p.split(",") for p in el.attrib["points"].split(";") if p.strip()]
        except KeyError:
            raise DatasetError(f"{where}: <polygon> lacks 'points'") from None
        if any(len(p) != 2 for p in pairs):
            raise DatasetError(f"{where}: polygon points must be 'x,y;x,y;...'")
        return [number(v, where) for p in pairs for v in p]
    theta = math.radians(number(el.attrib.get("rotation", 0), where, "rotation"))
    if el.tag == "box":
        x1, y1, x2, y2 = (_attr(el, k, where) for k in ("xtl", "ytl", "xbr", "ybr"))
        return rotated_rect(x1, y1, x2, y2, theta)
    cx, cy, rx, ry = (_attr(el, k, where) for k in ("cx", "cy", "rx", "ry"))
    return ellipse(cx, cy, rx, ry, theta)


def cvat_to_coco(
    xml_file: str | Path,
    image_dir: str | Path,
    out_json: str | Path,
    allow_outside_root: bool = False,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Convert a CVAT for images 1.1 XML export to COCO JSON and write it.

    Args:
        xml_file: ``annotations.xml`` of the export.
        image_dir: folder holding the images under the names in the file.
        out_json: COCO JSON to write.
        allow_outside_root: accept names that are absolute or lead out of ``image_dir``.
        classes: the class names, category ids 1.. in this order (``--classes``); an instance of
            another label is named as not converted. None: the file's label list, in its order (then any other label, sorted).

    Returns:
        The COCO dict: CVAT's image ids, one annotation per area shape (or group).

    Raises:
        DatasetError: unparsable XML, a malformed shape (named by image and shape index), a
            missing image, or one of another size than the file says.
    """
    xml_file = Path(xml_file)
    try:
        root = ET.parse(xml_file).getroot()
    except FileNotFoundError:
        raise DatasetError(f"annotation file not found: {xml_file}") from None
    except ET.ParseError as e:
        raise DatasetError(f"{xml_file}: invalid XML: {e}") from None
    if root.tag != "annotations":
        raise DatasetError(f"{xml_file}: not a CVAT for images export (root <{root.tag}>, expected <annotations>)")
    if root.find("track") is not None:
        raise DatasetError(f"{xml_file}: a CVAT for video export (<track>); export the task as 'CVAT for images 1.1'")
    labels = [n.text.strip() for n in root.iterfind("meta/*/labels/label/name") if n.text]
    builder = CocoBuilder(xml_file, Path(image_dir), allow_outside_root)
    for el in root.iterfind("image"):
        where = f"{xml_file}: image id {el.attrib.get('id')} ({el.attrib.get('name')})"
        if "name" not in el.attrib or "id" not in el.attrib:
            raise DatasetError(f"{where}: <image> needs 'id' and 'name'")
        try:
            image_id = int(el.attrib["id"])
        except ValueError:
            raise DatasetError(f"{where}: image id must be an integer") from None
        w, h = (int(_attr(el, k, where)) for k in ("width", "height"))
        image = builder.add_image(el.attrib["name"], w, h, where, image_id=image_id)
        groups: dict[tuple[Any, str], list[tuple[str, list[float] | np.ndarray]]] = {}
        for k, shape in enumerate(el):
            swhere = f"{where} shape {k} <{shape.tag}>"
            label = shape.attrib.get("label", "").strip()
            if shape.tag in NO_AREA:
                builder.skip(swhere, f"a {shape.tag} has no area")
                continue
            if shape.tag not in AREA:
                builder.skip(swhere, f"<{shape.tag}> is not one of {', '.join(AREA + NO_AREA)}")
                continue
            if not label:
                raise DatasetError(f"{swhere}: shape has no 'label'")
            part = _mask(shape, h, w, swhere) if shape.tag == "mask" else _polygon(shape, swhere)
            group = shape.attrib.get("group_id", "0").strip()
            groups.setdefault((k if group in ("", "0") else ("g", group), label), []).append((swhere, part))
        for (_, label), parts in groups.items():
            builder.add_parts(image, label, [p for _, p in parts], parts[0][0])
    if not builder.images:
        raise DatasetError(f"{xml_file}: no <image> elements")
    return builder.write(out_json, "CVAT", classes, declared=labels)


class CvatWriter:
    """Predictions as ``out/cvat/annotations.xml`` (CVAT for images 1.1), written at ``close``:
    one ``<polygon>`` per mask part, the parts of one mask sharing a ``group_id`` (CVAT shows
    them as a group; ``cvat_to_coco`` makes them one instance again). Upload it to the task made
    from the same images ("Upload annotations", format "CVAT 1.1"); CVAT matches images by
    name, and ``name`` is the image's path relative to the folder holding all the exported
    images (its base name when they share one folder), so names are unique and the same on
    every run over those images; image ids are predict's (``predictions.json``), which
    ``cvat_to_coco`` keeps. Scores are not written: an attribute the task's labels do not
    declare would make CVAT refuse the file. ``<labels>`` lists every class of the model in
    category id order, so ``convert cvat`` numbers them back as the model does.

    Args:
        out: predict's output folder.
        classes: the model's class names by category id (``common.class_list``), all written
            whether detected or not, so ``convert`` numbers them back as the model does.
        tolerance: polygon simplification in pixels.
    """

    def __init__(self, out: Path, classes: Sequence[str] = (), tolerance: float = EXPORT_TOLERANCE) -> None:
        self.folder = ExportFolder(Path(out) / "cvat", "maskrcnn predict --export")
        self.classes = list(classes)
        self.tolerance = tolerance
        self.labels: list[str] = []  # labels detected, for those that ``classes`` lacks
        self.images: list[tuple[Path, ET.Element]] = []  # absolute path, <image> without its name
        self.groups = 0

    def targets(self, images: dict[str, Path]) -> list[Path]:
        return [self.folder.root / "annotations.xml"]

    def check(self, images: dict[str, Path]) -> None:
        self.folder.check(self.targets(images))

    def add(self, image_id: int, name: str, path: Path, result: Result) -> None:
        h, w = result.image_size
        image = ET.Element("image", id=str(image_id), name="", width=str(w), height=str(h))  # predict's id
        for _, label, _, rings in detection_rings(result, self.tolerance):
            if label not in self.labels:
                self.labels.append(label)
            group = {}
            if len(rings) > 1:  # 0 is CVAT's "no group"
                self.groups += 1
                group = {"group_id": str(self.groups)}
            for ring in rings:
                points = ";".join(f"{x:.2f},{y:.2f}" for x, y in ring)
                ET.SubElement(
                    image, "polygon", label=label, source="auto", occluded="0", points=points, z_order="0", **group
                )
        self.images.append((Path(os.path.abspath(path)), image))

    def close(self) -> None:
        root = ET.Element("annotations")
        ET.SubElement(root, "version").text = "1.1"
        meta = ET.SubElement(root, "meta")
        labels = ET.SubElement(ET.SubElement(meta, "task"), "labels")
        for name in dict.fromkeys([*self.classes, *self.labels]):
            label = ET.SubElement(labels, "label")
            ET.SubElement(label, "name").text = name
            ET.SubElement(label, "type").text = "polygon"
        # Names relative to the deepest folder holding every image: base names for one folder,
        # "a/x.jpg" and "b/x.jpg" where two folders hold an x.jpg (one <image> name each).
        common = os.path.commonpath([p.parent for p, _ in self.images]) if self.images else ""
        for path, image in self.images:
            image.set("name", path.relative_to(common).as_posix())
            root.append(image)
        ET.indent(root)
        data = b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode").encode("utf-8")
        self.folder.write(self.folder.root / "annotations.xml", data)
        self.folder.close(remove_stale=True)
