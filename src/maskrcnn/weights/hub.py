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

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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
        raise ValueError(f"{uri}: no model repository {ref.repo_id} on the Hub (or it is private: set HF_TOKEN)") from None
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


@dataclass(frozen=True)
class PushOptions:
    """What ``push`` uploads besides the weights."""

    private: bool = False  # create the repository as private
    metrics: str | None = None  # a metrics.json of maskrcnn evaluate, for the model card
    message: str = "Upload Mask R-CNN model"  # commit message
    token: str | None = None  # default: HF_TOKEN or the login's token


def push(weights: str | Path, repo_id: str, options: PushOptions = PushOptions()) -> str:
    """Upload ``weights`` (any file ``maskrcnn.load`` reads, except ONNX) to ``repo_id`` as
    safetensors with its config and a model card; the repository is created if missing.

    The card's training data and metrics come from the training run folder the checkpoint
    sits in (``config.yaml``, the metrics a ``best.pth`` carries) and from ``options.metrics``.
    Optimizer state is not uploaded. Returns the commit's URL.
    """
    from .checkpoint import FORMAT, read_file, read_weights, torchvision_config
    from ..config import to_dict
    from .safetensors_io import save

    if not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repository id (owner/name)")
    weights = Path(weights)
    config, state = read_weights(weights)
    if config is None:
        config = torchvision_config(state, weights)
    train_state = read_file(weights).get("train_state") or {}
    metrics = _metrics(train_state, options.metrics)
    hub = _hub()
    api = hub.HfApi(token=options.token)
    with tempfile.TemporaryDirectory(prefix="maskrcnn-push-") as tmp:
        folder = Path(tmp)
        save({"format": FORMAT, "config": to_dict(config), "model": state}, folder / WEIGHTS_FILE)
        (folder / "config.json").write_text(json.dumps(to_dict(config), indent=1))
        (folder / "README.md").write_text(model_card(repo_id, to_dict(config), _training_data(weights), metrics))
        from huggingface_hub import errors

        try:
            api.create_repo(repo_id, private=options.private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=options.message)
        except errors.HfHubHTTPError as e:  # no token, no rights, server down: one line
            raise ValueError(f"push to {repo_id}: the Hub answered {_first_line(e)}") from None
    log.info("pushed %s to %s", weights, repo_id)
    return str(info.commit_url) if hasattr(info, "commit_url") else str(info)


def _metrics(train_state: dict[str, Any], metrics_file: str | None) -> dict[str, float]:
    """Flat ``{"segm_AP": 0.41, ...}`` from a ``best.pth``'s record and a metrics file: evaluate's
    ``{"bbox": {"AP": ..}, "segm": {..}}`` or a flat ``{"segm_AP": ..}`` (the demo's)."""
    found = _ap_values(train_state.get("metrics") if isinstance(train_state.get("metrics"), dict) else {})
    if metrics_file:
        try:
            evaluated = json.loads(Path(metrics_file).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--metrics {metrics_file}: cannot read it as JSON ({e})") from None
        flat = dict(evaluated) if isinstance(evaluated, dict) else {}
        for kind in ("bbox", "segm"):
            if isinstance(flat.get(kind), dict):
                flat.update({f"{kind}_{k}": v for k, v in flat.pop(kind).items()})
        from_file = _ap_values(flat)
        if not from_file:
            raise ValueError(f"--metrics {metrics_file}: no AP values in it (expected maskrcnn evaluate's metrics.json)")
        found.update(from_file)
    return found


def _ap_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The box and mask AP, AP50, AP75 entries of a flat metrics dict (-1, COCO's "no data", left out)."""
    return {k: float(v) for k, v in metrics.items()
            if k in {f"{t}_{s}" for t in ("bbox", "segm") for s in ("AP", "AP50", "AP75")}
            and isinstance(v, (int, float)) and v >= 0}


def _training_data(weights: Path) -> dict[str, Any]:
    """The ``data`` and ``solver`` sections of the run's ``config.yaml`` beside the weights, if any."""
    run_config = weights.parent / "config.yaml"
    if not run_config.is_file():
        return {}
    try:
        cfg = yaml.safe_load(run_config.read_text()) or {}
    except yaml.YAMLError:
        return {}
    data, solver = cfg.get("data") or {}, cfg.get("solver") or {}
    summary = {k: data[k] for k in ("train_ann", "val_ann", "synthetic", "max_train_images") if data.get(k)}
    summary.update({k: solver[k] for k in ("epochs",) if solver.get(k)})
    return summary


def model_card(repo_id: str, config: dict[str, Any], data: dict[str, Any], metrics: dict[str, float]) -> str:
    """README.md of a pushed model: Hub metadata, classes, training data, metrics, usage."""
    names = list(config.get("class_names") or [])
    num = int(config.get("num_classes", len(names)))
    backbone = (config.get("backbone") or {}).get("name", "resnet50")
    header = yaml.safe_dump({"library_name": "maskrcnn", "pipeline_tag": "image-segmentation",
                             "tags": ["mask-rcnn", "instance-segmentation", "safetensors"]}, sort_keys=False)
    lines = [f"---\n{header}---", f"# {repo_id}", "",
             f"Mask R-CNN ({backbone} FPN) for instance segmentation, {num} classes.", "", "## Classes", ""]
    lines += [f"{i}. {n or '(unnamed)'}" for i, n in enumerate(names or [""] * num, 1)] if num <= 200 else [f"{num} classes"]
    lines += ["", "## Training data", ""]
    lines += [f"- {k}: {v}" for k, v in data.items()] or ["Not recorded (the weights were not pushed from a training run folder)."]
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {100 * v:.1f} |" for k, v in sorted(metrics.items()))]
        lines += ["", "COCO AP in percent."]
    else:
        lines += ["Not recorded."]
    lines += ["", "## Use", "", "```python", "import maskrcnn", f'model = maskrcnn.load("hf://{repo_id}")',
              'result = model.predict("photo.jpg")', "```", "", "```bash",
              f"maskrcnn predict photo.jpg --weights hf://{repo_id}", f"maskrcnn serve --weights hf://{repo_id}", "```", ""]
    return "\n".join(lines)
