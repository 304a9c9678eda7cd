"""Writing files so that a crash never leaves a half-written one: the package's only writer.

``atomic_write`` writes to a temporary file beside the target and renames it over the target
only once complete, so a reader sees the old file or the new one, never a mix; every file the
package writes (checkpoints, results, metrics, exports, converted annotations) goes through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

try:
    import fcntl  # POSIX: lets a later save tell a dead writer's temp file from a live one's
except ImportError:  # Windows: leftover temp files are never removed (nothing can prove them dead)
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# A temp file of atomic_write is ".<target name>.<8 of [a-z0-9_]>.tmp" (mkstemp's alphabet, which
# older versions used); nothing else is ever removed as a leftover.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
# A leftover unlocked and unchanged for this long is abandoned: the age only covers the moment
# between creating a temp file and locking it, and file systems where locks are not shared.
STALE_TEMP_AGE_S = 60.0
# Folder -> target name -> temp files found when this process first wrote into the folder.
# One directory scan per folder and process: a scan per write is quadratic in a folder of
# 100k overlays.
_leftovers: dict[str, dict[str, list[str]]] = {}
_leftovers_lock = threading.Lock()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temp file next to ``path``, then rename it into place.

    A reader never sees a half-written file, and a crash leaves at most a stray
    ``.<name>.<8 chars>.tmp`` file behind, never a truncated ``path``. The data is flushed to
    disk before the rename, so a power cut cannot leave an empty file under the final name.
    The file gets the mode a plain ``open()`` would give (0o666 less the umask). The temp
    files an interrupted save of the same ``path`` left behind are removed (POSIX: only once
    no process holds their lock and they are ``STALE_TEMP_AGE_S`` old).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside ``path``, open for writing and locked while this process lives.

    ``os.open`` with mode 0o666 lets the kernel apply the umask, as ``open()`` does
    (``mkstemp`` would make it 0o600 whatever the umask).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        if fcntl is not None:
            with contextlib.suppress(OSError):  # no locks on this file system: its leftovers are kept
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel when the writer dies
        return fd, tmp


def _remove_leftovers(path: Path) -> None:
    if fcntl is None:
        return
    folder = os.path.abspath(path.parent)
    with _leftovers_lock:
        if folder not in _leftovers:
            found: dict[str, list[str]] = {}
            with contextlib.suppress(OSError), os.scandir(folder) as entries:  # cleaning never fails a save
                for entry in entries:
                    match = _TEMP_NAME.fullmatch(entry.name)
                    if match:
                        found.setdefault(match["target"], []).append(entry.path)
            _leftovers[folder] = found
        candidates = _leftovers[folder].get(path.name, [])
        candidates[:] = [tmp for tmp in candidates if not _remove_if_abandoned(tmp)]


def _remove_if_abandoned(tmp: str) -> bool:
    """Delete ``tmp`` if no process holds its lock and it is old; True if it is gone."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if time.time() - os.fstat(fd).st_mtime < STALE_TEMP_AGE_S:
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while a live writer holds LOCK_EX
        os.unlink(tmp)
    except OSError:
        return False
    finally:
        os.close(fd)
    logger.info("removed %s, left by an interrupted save", tmp)
    return True


def write_json(obj: Any, path: str | Path, indent: int | None = None) -> Path:
    """Write ``obj`` as JSON atomically (values JSON cannot hold are written with ``str``)."""
    data = json.dumps(obj, indent=indent, default=str).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def refuse_overwriting_inputs(inputs: list[Path], outputs: list[Path]) -> None:
    """ValueError if writing any of ``outputs`` would replace one of ``inputs``.

    Compared by resolved path and, for files that exist, by device and inode, so links and
    case-insensitive file systems cannot slip an input through.
    """
    resolved = {p.resolve(): p for p in inputs}
    inodes = {}
    for p in inputs:
        with contextlib.suppress(OSError):
            st = p.stat()
            inodes[(st.st_dev, st.st_ino)] = p
    for out in outputs:
        hit = resolved.get(out.resolve())
        if hit is None and out.exists():
            st = out.stat()
            hit = inodes.get((st.st_dev, st.st_ino))
        if hit is not None:
            raise ValueError(f"writing {out} would overwrite the input {hit}; choose another --out folder")
