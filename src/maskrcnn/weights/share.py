"""Sharing a model: ``maskrcnn push`` uploads it to the Hugging Face Hub as safetensors with its
config and a generated model card; ``convert`` rewrites any checkpoint as safetensors.

Kept apart from ``hub`` (reading ``hf://`` names) and ``safetensors_io`` (the file format) because
both read checkpoints through ``checkpoint``, which itself reads those two.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import to_dict
from .checkpoint import FORMAT, read_file, read_weights, torchvision_config
from .hub import _REPO_ID, WEIGHTS_FILE, _first_line, _hub
from .safetensors_io import save

log = logging.getLogger(__name__)


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
            raise ValueError(
                f"--metrics {metrics_file}: no AP values in it (expected maskrcnn evaluate's metrics.json)"
            )
        found.update(from_file)
    return found


def _ap_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The box and mask AP, AP50, AP75 entries of a flat metrics dict (-1, COCO's "no data", left out)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k in {f"{t}_{s}" for t in ("bbox", "segm") for s in ("AP", "AP50", "AP75")}
        and isinstance(v, (int, float))
        and v >= 0
    }


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
    header = yaml.safe_dump(
        {
            "library_name": "maskrcnn",
            "pipeline_tag": "image-segmentation",
            "tags": ["mask-rcnn", "instance-segmentation", "safetensors"],
        },
        sort_keys=False,
    )
    lines = [
        f"---\n{header}---",
        f"# {repo_id}",
        "",
        f"Mask R-CNN ({backbone} FPN) for instance segmentation, {num} classes.",
        "",
        "## Classes",
        "",
    ]
    lines += (
        [f"{i}. {n or '(unnamed)'}" for i, n in enumerate(names or [""] * num, 1)] if num <= 200 else [f"{num} classes"]
    )
    lines += ["", "## Training data", ""]
    lines += [f"- {k}: {v}" for k, v in data.items()] or [
        "Not recorded (the weights were not pushed from a training run folder)."
    ]
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {100 * v:.1f} |" for k, v in sorted(metrics.items()))]
        lines += ["", "COCO AP in percent."]
    else:
        lines += ["Not recorded."]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import maskrcnn",
        f'model = maskrcnn.load("hf://{repo_id}")',
        'result = model.predict("photo.jpg")',
        "```",
        "",
        "```bash",
        f"maskrcnn predict photo.jpg --weights hf://{repo_id}",
        f"maskrcnn serve --weights hf://{repo_id}",
        "```",
        "",
    ]
    return "\n".join(lines)


def convert(source: str | Path, dest: str | Path) -> Path:
    """Rewrite any model file the package reads (``checkpoint.read_file``) as safetensors at
    ``dest``; refuses to replace an existing file."""

    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise ValueError(f"{dest} exists; choose another name (a file is never replaced)")
    return save(read_file(source), dest)
