"""Share models on the Hugging Face Hub: ``maskrcnn.load("hf://owner/name")`` and ``maskrcnn push``.

A model repository written by ``push`` holds:

    model.safetensors   weights and the resolved ModelConfig (``safetensors_io``: no pickle)
    config.json         the same ModelConfig, readable without the package
    README.md           a model card: classes, training data, metrics, how to load it

``hf://owner/name[@revision][/file]`` names a file in such a repository (default
``model.safetensors`` at ``main``); ``download`` fetches it with huggingface_hub into that
library's cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), which keeps one copy
per content and checks it against the Hub's ETag. ``HF_ENDPOINT`` selects another server and
``HF_TOKEN`` (or ``hf auth login``) gives the token for uploads and private repositories.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "hf://"
WEIGHTS_FILE = "model.safetensors"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class HubRef:
    """A file in a Hub model repository, as ``hf://owner/name[@revision][/file]`` names it."""

    repo_id: str  # "owner/name"
    revision: str = "main"  # branch, tag or commit
    filename: str = WEIGHTS_FILE  # path inside the repository


def is_hub(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def parse(uri: str) -> HubRef:
    """``"hf://owner/name@v1/sub/model.safetensors"`` -> ``HubRef``; a one-line ValueError otherwise."""
    rest = uri.removeprefix(PREFIX)
    parts = rest.split("/")
    if len(parts) < 2:
        raise ValueError(f"{uri}: expected hf://owner/name[@revision][/file]")
    owner, name = parts[0], parts[1]
    revision = "main"
    if "@" in name:
        name, revision = name.split("@", 1)
    repo_id = f"{owner}/{name}"
    if not _REPO_ID.fullmatch(repo_id) or not revision:
        raise ValueError(f"{uri}: {repo_id!r} is not a Hub repository id (owner/name: letters, digits, '.', '_', '-')")
    filename = "/".join(parts[2:]) or WEIGHTS_FILE
    return HubRef(repo_id, revision, filename)


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError("hf:// models and maskrcnn push need huggingface_hub: pip install 'maskrcnn[hub]'") from None
    return huggingface_hub


def download(uri: str) -> Path:
    """The local path of ``uri``'s file, downloaded into huggingface_hub's cache if needed.

    Raises:
        ValueError: a malformed name, a repository, revision or file the Hub does not have, or
            a network failure, in one line.
    """
    ref = parse(uri)
    hub = _hub()
    from huggingface_hub import errors

    try:
        return Path(hub.hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision))
    except errors.RepositoryNotFoundError:
        raise ValueError(
            f"{uri}: no model repository {ref.repo_id} on the Hub (or it is private: set HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"{uri}: repository {ref.repo_id} has no revision {ref.revision!r}") from None
    except errors.EntryNotFoundError:
        raise ValueError(f"{uri}: repository {ref.repo_id} has no file {ref.filename}") from None
    except errors.LocalEntryNotFoundError as e:  # offline and not cached
        raise ValueError(f"{uri}: cannot reach the Hub and the file is not cached ({_first_line(e)})") from None
    except errors.HfHubHTTPError as e:
        raise ValueError(f"{uri}: the Hub answered {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
