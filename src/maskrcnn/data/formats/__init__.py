"""Annotation tools' formats: readers to our COCO JSON, writers of predictions as pre-annotations.

One module per tool: ``labelme`` (LabelMe JSON folders), ``cvat`` (CVAT for images 1.1 XML),
``labelstudio`` (Label Studio JSON export and tasks with predictions) and ``yolo`` (YOLO segmentation txt
with its ``data.yaml``). Readers name every thing they cannot convert and go on, and check what
they write with ``read_coco``; writers never replace a file the user edited (``common.ExportFolder``),
and what they write comes back through the readers as the same instances.
"""

from __future__ import annotations

from .cvat import CvatWriter, cvat_to_coco
from .labelme import LabelMeWriter, labelme_to_coco
from .labelstudio import LabelStudioWriter, labelstudio_to_coco
from .yolo import YoloWriter, yolo_to_coco

__all__ = [
    "CvatWriter",
    "LabelMeWriter",
    "LabelStudioWriter",
    "YoloWriter",
    "cvat_to_coco",
    "labelme_to_coco",
    "labelstudio_to_coco",
    "yolo_to_coco",
]
