"""The ``coco_dir`` fixture: tiny hand-made COCO datasets (tests/data/helpers.py) written to disk."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .helpers import base_coco, write_images


@pytest.fixture
def coco_dir(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Factory: write (a modified copy of) ``base_coco()`` and its images; returns (ann_file, image_dir)."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    write_images(image_dir)

    def make(edit: Callable[[dict[str, Any]], None] | None = None, name: str = "instances.json") -> tuple[Path, Path]:
        data = copy.deepcopy(base_coco())
        if edit is not None:
            edit(data)
        ann_file = tmp_path / name
        ann_file.write_text(json.dumps(data, indent=1))
        return ann_file, image_dir

    return make
