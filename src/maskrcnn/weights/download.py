"""Fetch published weights into a local cache, verified by sha256.

Files land in ``$MASKRCNN_HOME`` (default ``~/.cache/maskrcnn``). A download streams through
the package's one atomic writer (``results.atomic_write``: a temp file in the same folder, mode
per the umask) and is renamed into place only after its hash checks out, so the cache never
holds a partial or corrupt file under the real name.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO

from tqdm import tqdm

from ..files import atomic_write

logger = logging.getLogger(__name__)

_D2_ZOO = "https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation"

# Published COCO weights. torchvision's (v1: 37.9 box / 34.6 mask AP; v2: 47.4 / 41.8): the name's "-<hex>." part is a sha256 prefix, checked.
# Detectron2's model zoo (MODEL_ZOO.md): its "_<6 hex>.pkl" suffix is no sha256 prefix and no
# digest is published, so those files are downloaded unverified.
PUBLISHED: dict[str, str] = {
    "maskrcnn_resnet50_fpn_coco": "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
    "maskrcnn_resnet50_fpn_v2_coco": "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
    "detectron2_mask_rcnn_R_50_FPN_3x": f"{_D2_ZOO}/mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl",
    "detectron2_mask_rcnn_R_101_FPN_3x": f"{_D2_ZOO}/mask_rcnn_R_101_FPN_3x/138205316/model_final_a3ec72.pkl",
    "detectron2_mask_rcnn_X_101_32x8d_FPN_3x": f"{_D2_ZOO}/mask_rcnn_X_101_32x8d_FPN_3x/139653917/model_final_2d9806.pkl",
}

_CHUNK = 1 << 20  # bytes read per network call
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")  # e.g. maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth


class DownloadError(RuntimeError):
    """A download failed, or its content did not match the expected sha256."""


def cache_dir() -> Path:
    """``$MASKRCNN_HOME`` if set, else ``~/.cache/maskrcnn``."""
    return Path(os.environ.get("MASKRCNN_HOME") or "~/.cache/maskrcnn").expanduser()


def published_url(name: str) -> str:
    """URL of an entry of ``PUBLISHED``; unknown names raise ValueError with suggestions."""
    if name not in PUBLISHED:
        close = difflib.get_close_matches(name, list(PUBLISHED), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(PUBLISHED)}"
        raise ValueError(f"no published weights named {name!r}{hint}")
    return PUBLISHED[name]


def expected_hash(filename: str) -> str | None:
    """The sha256 prefix carried in a torchvision-style file name, or None."""
    match = _HASH_IN_NAME.search(filename)
    return match.group(1) if match else None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    dest_dir: str | Path | None = None,
    sha256: str | None = None,
    progress: bool = True,
    *,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` into ``dest_dir`` (default ``cache_dir()``) unless already cached.

    Args:
        url: http(s) or file URL; the last path component is the file name.
        dest_dir: folder for the file, created if missing.
        sha256: full hex digest or a prefix of it (at least 8 hex digits). When None,
            a ``-<8+ hex>.`` part of the file name is used as the prefix, as torchvision
            names its files; with neither, the file is not verified.
        progress: show a tqdm bar (only when stderr is a terminal).
        timeout: seconds to wait for the server on connect and on each read.

    Returns:
        Path of the verified file. A cached file with the right hash is returned without
        touching the network; one with the wrong hash is downloaded again.

    Raises:
        DownloadError: network/HTTP failure, truncated body, or sha256 mismatch (the
            partial file is deleted and nothing is left under the final name).
    """
    filename = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not filename:
        raise DownloadError(f"cannot tell a file name from url {url}")
    expected = sha256.lower() if sha256 else expected_hash(filename)
    if expected is not None and not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise ValueError(f"sha256 must be 8 to 64 hex digits, got {sha256!r}")
    folder = Path(dest_dir) if dest_dir is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / filename

    if dest.is_file():
        if expected is None:
            return dest
        got = sha256_file(dest)
        if got.startswith(expected):
            return dest
        logger.warning("cached %s has sha256 %s, expected %s...; downloading again", dest, got, expected)

    def fetch_checked(out: IO[bytes]) -> None:  # raising here leaves nothing under dest
        got = _fetch(url, out, progress, timeout)
        if expected is not None and not got.startswith(expected):
            shown = expected if len(expected) == 64 else f"{expected}..."
            raise DownloadError(f"sha256 mismatch for {url}: expected {shown}, got {got}")

    atomic_write(dest, fetch_checked)
    logger.info("downloaded %s to %s", url, dest)
    return dest


def _fetch(url: str, out: IO[bytes], progress: bool, timeout: float) -> str:
    """Stream ``url`` into the open file ``out``; return the sha256 hex digest."""
    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "maskrcnn"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=Path(url).name,
                disable=not progress or not sys.stderr.isatty(),
            )
            with bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"could not download {url}: {e.reason}") from e
    except (OSError, ValueError) as e:  # timeouts, resets, malformed urls
        raise DownloadError(f"could not download {url}: {e}") from e
    if total is not None and received != total:
        raise DownloadError(f"could not download {url}: got {received} of {total} bytes")
    return digest.hexdigest()
