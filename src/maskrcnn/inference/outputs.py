"""``predict``'s result files (``PredictionFiles``) and the ground-truth ids of loose image files."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ..data.coco import read_json
from ..files import atomic_write
from .results import Result

log = logging.getLogger(__name__)


def coco_image_ids(paths: list[Path], coco_file: str) -> tuple[list[int | None], int]:
    """The ground-truth image id of each input, matched on the GT ``file_name``, or None.

    An input matches a GT image whose ``file_name`` (a path relative to the images root) is a
    trailing part of the input's path; the longest such match wins. With no such match, a GT
    image of the same base name is taken if there is exactly one. Raises ValueError where that
    is ambiguous (several GT images share the base name and none matches the folders) or two
    inputs would get the same id: either would report one image's detections under another.

    Returns:
        The ids, and the smallest id above every GT id (for the inputs it does not hold).
    """
    coco = read_json(coco_file)
    by_name: dict[str, list[tuple[tuple[str, ...], int]]] = {}
    try:
        for im in coco["images"]:
            parts = PurePosixPath(str(im["file_name"]).replace("\\", "/")).parts
            by_name.setdefault(parts[-1], []).append((parts, int(im["id"])))
    except (KeyError, TypeError, ValueError, IndexError):
        raise ValueError(f"{coco_file}: not a COCO file with images[] holding id and file_name") from None
    ids: list[int | None] = []
    owner: dict[int, Path] = {}
    for p in paths:
        candidates = by_name.get(p.name, [])
        parts = p.absolute().parts
        full = sorted(((len(c), i) for c, i in candidates if parts[-len(c) :] == c), reverse=True)
        if len(full) > 1 and full[0][0] == full[1][0]:
            raise ValueError(
                f"{coco_file} has two images with file_name matching {p}: ids {full[0][1]} and {full[1][1]}"
            )
        if full:
            image_id: int | None = full[0][1]
        elif len(candidates) == 1:
            image_id = candidates[0][1]
        elif candidates:
            names = ", ".join("/".join(c) for c, _ in candidates[:4])
            raise ValueError(
                f"{p} matches {len(candidates)} images of {coco_file} by name ({names}) and none by folder; "
                "pass the images from a folder laid out as the file_name entries"
            )
        else:
            image_id = None
        if image_id is not None and image_id in owner:
            raise ValueError(f"{owner[image_id]} and {p} both match image id {image_id} of {coco_file}")
        if image_id is not None:
            owner[image_id] = p
        ids.append(image_id)
    return ids, max((i for entries in by_name.values() for _, i in entries), default=0) + 1


class PredictionFiles:
    """``predict``'s result files, written so that no finished image is ever lost.

    Each image's record goes to ``predictions.jsonl`` as soon as it is done (one JSON object a
    line, flushed): a crash, an out-of-memory kill or Ctrl-C leaves every finished image there.
    On leaving the ``with`` block, normally or by an exception (KeyboardInterrupt included),
    ``predictions.json`` (COCO results, for pycocotools' ``loadRes``) and ``images.json`` are
    written from it atomically, streaming, so memory does not grow with the number of images.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines = out / "predictions.jsonl"
        self.images = 0
        self.detections = 0

    # How each file that ``__exit__`` and ``add`` write begins (or the whole file, when empty):
    # what tells an earlier run's output, which a new run replaces, from a user's own file.
    _OPENINGS = {
        "predictions.jsonl": (b'{"id": ', b""),
        "predictions.json": (b'[{"image_id": ', b"[]"),
        "images.json": (b'[\n {\n  "id": ', b"[]"),
    }

    def paths(self) -> list[Path]:
        return [self.lines, self.out / "predictions.json", self.out / "images.json"]

    @classmethod
    def written_by_predict(cls, path: Path) -> bool:
        """True when ``path``, one of ``paths()``, begins as this class writes it."""
        prefix, empty = cls._OPENINGS[path.name]
        try:
            with open(path, "rb") as f:
                head = f.read(len(prefix) + 1)
        except OSError:
            return False
        return head.startswith(prefix) or head == empty

    def __enter__(self) -> PredictionFiles:
        (self.out / "overlays").mkdir(parents=True, exist_ok=True)
        self._file = open(self.lines, "w", encoding="utf-8")  # noqa: SIM115  closed in __exit__
        return self

    def add(self, image_id: int, file_name: str, result: Result, entries: list[dict]) -> None:
        """One finished image: its index record and its COCO results entries."""
        h, w = result.image_size
        counts: dict[str, int] = {}  # detections per class, by name (category id where unnamed)
        for name, category in zip(result.class_names, result.category_ids):
            counts[name or str(int(category))] = counts.get(name or str(int(category)), 0) + 1
        record = {
            "id": image_id,
            "file_name": file_name,
            "height": h,
            "width": w,
            "detections": len(entries),
            "counts": counts,
            "results": entries,
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.images += 1
        self.detections += len(entries)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        self._file.close()
        index = []

        def write_results(f: IO[bytes]) -> None:
            f.write(b"[")
            first = True
            with open(self.lines, encoding="utf-8") as lines:
                for line in lines:
                    record = json.loads(line)
                    for entry in record.pop("results"):
                        f.write((b"" if first else b",") + json.dumps(entry).encode("utf-8"))
                        first = False
                    index.append(record)
            f.write(b"]")

        atomic_write(self.out / "predictions.json", write_results)
        atomic_write(self.out / "images.json", lambda f: f.write(json.dumps(index, indent=1).encode("utf-8")))
        if kind is KeyboardInterrupt:
            print(
                f"interrupted: the {self.images} finished image(s) are in {self.out}/predictions.json", file=sys.stderr
            )
