"""The optional per-image outputs of ``maskrcnn predict``, built from its flags and checked
before any work (``applications`` describes the writers' one interface)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..inference.results import Result


class Writer(Protocol):
    def targets(self, names: list[str]) -> list[Path]: ...
    def ours(self, path: Path) -> bool: ...
    def add(self, image_id: int, name: str, path: Path, result: Result) -> None: ...
    def close(self) -> None: ...


def build_writers(
    out: str | Path, labels: bool = False, geojson: bool = False, polygons: bool = False, tolerance: float | None = None
) -> list[Writer]:
    """The writers that ``--labels``, ``--geojson`` and ``--polygons`` ask for (a one-line
    ValueError naming the extra to install when a library is missing)."""
    from .polygon_files import TOLERANCE

    out = Path(out)
    tolerance = TOLERANCE if tolerance is None else tolerance
    writers: list[Writer] = []
    if labels:
        from .labels import LabelWriter

        writers.append(LabelWriter(out))
    if geojson:
        from .polygon_files import GeoJSONWriter

        writers.append(GeoJSONWriter(out, tolerance))
    if polygons:
        from .polygon_files import PolygonWriter

        writers.append(PolygonWriter(out, tolerance))
    return writers


def refuse_replacing_user_files(writers: list[Writer], names: list[str]) -> list[Path]:
    """Every file the writers will write for images ``names``; a ValueError if one of them
    exists and was not written by an earlier run (a user's ``cells.geojson`` stays theirs)."""
    paths = []
    for writer in writers:
        for path in writer.targets(names):
            if (path.exists() or path.is_symlink()) and not writer.ours(path):
                raise ValueError(
                    f"{path} exists and was not written by maskrcnn predict, so it is not replaced; "
                    "choose another --out folder"
                )
            paths.append(path)
    return paths
