"""The one atomic writer (files.atomic_write): file modes that follow the umask, and temp
files left by a killed save cleaned up by the next save of the same file."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from maskrcnn import files
from maskrcnn.files import atomic_write, write_json
from maskrcnn.inference.results import Result

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def umask() -> Iterator[callable]:
    """Set the process umask for one test; the old one is restored after."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask_like_open(tmp_path: Path, umask, mask: int) -> None:
    """Was 0600 whatever the umask (mkstemp's mode): other users could not read a checkpoint."""
    from maskrcnn.weights.checkpoint import atomic_save

    umask(mask)
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: what a plain open() gives
        f.write("x")
    expected = _mode(tmp_path / "plain.txt")
    assert expected == 0o666 & ~mask
    atomic_write(tmp_path / "raw.bin", lambda f: f.write(b"abc"))
    write_json({"a": 1}, tmp_path / "metrics.json")
    atomic_save({"w": 1}, tmp_path / "last.pth")
    Result(np.zeros((0, 4)), np.zeros(0), np.zeros(0), (4, 5)).save(
        tmp_path / "overlay.png", np.zeros((4, 5, 3), np.uint8)
    )
    for name in ("raw.bin", "metrics.json", "last.pth", "overlay.png"):
        assert _mode(tmp_path / name) == expected, name
    assert (tmp_path / "raw.bin").read_bytes() == b"abc"


def test_downloads_follow_the_umask(tmp_path: Path, umask) -> None:
    from maskrcnn.weights.download import download

    payload = b"weights" * 1000
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.pth").write_bytes(payload)
    umask(0o022)
    path = download(
        (tmp_path / "src" / "w.pth").as_uri(),
        tmp_path / "cache",
        sha256=hashlib.sha256(payload).hexdigest(),
        progress=False,
    )
    assert path.read_bytes() == payload and _mode(path) == 0o644
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["w.pth"]  # no temp file left


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_save_killed_midway_leaves_a_temp_file_that_the_next_save_removes(tmp_path: Path) -> None:
    target = tmp_path / "last.pth"
    target.write_bytes(b"good checkpoint")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / "src")!r})
        from maskrcnn.files import atomic_write
        def write(f):
            f.write(b"half a checkpoint")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(target)!r}, write)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != "last.pth"]
    assert leftover.name.startswith(".last.pth.") and leftover.name.endswith(".tmp")
    assert target.read_bytes() == b"good checkpoint"  # the kill did not touch the real file

    atomic_write(target, lambda f: f.write(b"new checkpoint"))  # minutes later in real life: aged below
    assert leftover.exists()  # too fresh to be sure its writer is gone
    _age(leftover, 2 * files.STALE_TEMP_AGE_S)
    atomic_write(target, lambda f: f.write(b"newer checkpoint"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    assert target.read_bytes() == b"newer checkpoint"


def test_only_our_abandoned_temp_files_of_the_same_target_are_removed(tmp_path: Path) -> None:
    names = {
        ".last.pth.abcd1234.tmp": False,  # ours, abandoned: removed
        ".last.pth.zz_9yy_8.tmp": False,  # ours (mkstemp's alphabet), abandoned: removed
        ".last.pth.abc.tmp": True,  # another pattern
        ".last.pth.ABCD1234.tmp": True,
        "last.pth.abcd1234.tmp": True,
        ".last.pth.abcd1234.part": True,
        ".best.pth.abcd1234.tmp": True,  # another target's: left for its own next save
        ".last.pth.held0000.tmp": True,  # a live writer holds its lock
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        _age(tmp_path / name, 10 * files.STALE_TEMP_AGE_S)
    held = os.open(tmp_path / ".last.pth.held0000.tmp", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        atomic_write(tmp_path / "last.pth", lambda f: f.write(b"ok"))
    finally:
        os.close(held)
    kept = {p.name for p in tmp_path.iterdir()}
    assert kept == {n for n, keep in names.items() if keep} | {"last.pth"}
