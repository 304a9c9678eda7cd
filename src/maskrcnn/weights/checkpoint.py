"""Checkpoints: our own format, torchvision's Mask R-CNN files and Detectron2's model zoo files.

Our format is a ``torch.save`` of a dict of tensors and plain values only, read back with
``weights_only=True``, so loading a checkpoint never executes pickled code:

    {"format": "maskrcnn-checkpoint/1", "config": {...resolved ModelConfig...},
     "model": state_dict, "train_state": {...optional: optimizer, epoch, step...}}

Files are written to a temporary name beside the target and renamed over it, so a crash or a
full disk never leaves a half-written checkpoint where a good one was. Every weight file the
package reads (to predict, to resume, to start training from, ImageNet body weights) is read
here. Detectron2's ``.pkl`` files are plain pickles of numpy arrays, read by
``detectron2_compat``'s restricted unpickler (no code runs either).
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, apply_overrides, check_probability, from_dict, to_dict
from ..files import atomic_write
from ..model.build import build_model
from ..model.fuse import fold_batchnorm
from ..model.mask_rcnn import MaskRCNN
from . import detectron2 as detectron2_compat
from . import hub, safetensors_io
from .onnx_model import OnnxModel
from .openvino_model import OpenVinoModel, is_ir
from .torchvision import convert_keys, infer_config, is_torchvision_state_dict

FORMAT = "maskrcnn-checkpoint/1"

# Config fields that say which layers exist and how they are wired (not their values): a run that starts from a
# checkpoint takes them from it, so fine-tuning torchvision's v2 file needs no architecture keys.
LAYOUT_FIELDS = (
    ("backbone", "fpn_norm"),
    ("backbone", "stride_in_1x1"),
    ("rpn", "conv_depth"),
    ("roi_heads", "box_head"),
    ("roi_heads", "box_head_norm"),
    ("roi_heads", "mask_head_norm"),
)

# Layers whose shape depends on the number of classes: re-initialised when a checkpoint to
# start from was trained on another class count ("new class heads").
CLASS_HEADS = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed, then renamed over it; a
    ``.safetensors`` path gets a safetensors file instead (no pickle: ``safetensors_io``)."""
    if Path(path).suffix.lower() == ".safetensors":
        safetensors_io.save(obj, path)
        return
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str | Path, model: MaskRCNN, train_state: dict[str, Any] | None = None) -> None:
    """Write weights, the resolved config and optional training state atomically."""
    obj = {"format": FORMAT, "config": to_dict(model.config), "model": model.state_dict()}
    if train_state is not None:
        obj["train_state"] = train_state
    atomic_save(obj, path)


# How each kind of model file starts. A ``torch.save`` file is a zip archive (or, before
# PyTorch 1.6, a pickle that opens with torch's magic number); a Detectron2 ``.pkl`` is a plain
# pickle (protocol 2 or later: 0x80, then the protocol); an ONNX file is a ModelProto whose
# first field is ir_version (tag 0x08, then a small varint), then another ModelProto field.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ONNX_FIELD_TAGS = frozenset(b"\x12\x1a\x22\x28\x32\x3a\x42\x72\x7a\x82")  # ModelProto fields 2..16
ACCEPTED = (
    "a maskrcnn checkpoint or a torchvision Mask R-CNN .pth (torch.save or safetensors files), a Detectron2 model-zoo "
    ".pkl, or (to predict and evaluate only) an ONNX file written by maskrcnn export"
)


def file_kind(path: str | Path) -> str:
    """What a model file is, by its first bytes, whatever its name: ``"torch"`` (a ``torch.save``
    file), ``"safetensors"``, ``"pickle"`` (a plain pickle, as Detectron2's ``.pkl``), ``"onnx"``, ``"openvino"`` (an IR's
    .xml) or ``"unknown"``."""
    with open(path, "rb") as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    if safetensors_io.looks_like(head, size):
        return "safetensors"
    if head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and head[2] in _ONNX_FIELD_TAGS:
        return "onnx"
    if head.lstrip().startswith(b"<") and is_ir(path):
        return "openvino"
    return "unknown"


def read_file(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (no code execution) into a dict: ``torch.save`` files with
    ``weights_only=True``, Detectron2 ``.pkl`` pickles with a numpy-only unpickler. The reader is
    chosen by the file's content (``file_kind``); only a file of unknown content goes by its
    suffix (``.pkl``: the Detectron2 reader, which names the problem)."""
    path = Path(path)
    if path.is_dir():  # was "checkpoint not found" for a folder that exists
        raise CheckpointError(f"checkpoint {path} is a folder, not a file; name the checkpoint file in it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    kind = file_kind(path)
    if kind in ("onnx", "openvino"):
        raise CheckpointError(
            f"{path} is an {'ONNX' if kind == 'onnx' else 'OpenVINO'} model (maskrcnn export): it runs in predict, "
            "evaluate and serve only; to train or export, use the PyTorch checkpoint it was exported from"
        )
    if kind == "pickle" or (kind == "unknown" and path.suffix == ".pkl"):
        try:
            return {"model": detectron2_compat.read_pickle(path)}
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if kind == "safetensors":  # a JSON header and raw tensor bytes: nothing to execute
        try:
            return safetensors_io.read(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if kind == "unknown":
        raise CheckpointError(f"cannot read {path}: not a model file this package reads; expected {ACCEPTED}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects beyond tensors and plain values, e.g. code
        # torch's own message suggests weights_only=False, i.e. running the file's code: never relay it.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" (it asks for {found.group(1)})" if found else ""
        raise CheckpointError(
            f"cannot read checkpoint {path}: it holds Python objects other than tensors and plain values{what}, "
            "which are never unpickled because that can run arbitrary code; save the weights as a plain state dict"
        ) from None
    except Exception as e:  # corrupt zip, truncated file...
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(obj).__name__}")
    return obj


def load_state(model: nn.Module, state: dict[str, Tensor], source: str, strict: bool = True) -> None:
    """``load_state_dict`` with an error that names missing and unexpected keys and bad shapes."""
    own = model.state_dict()
    # Trainable BatchNorm counts its steps; checkpoints of a frozen one (and converted
    # torchvision files) have no counter: the model keeps its own.
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        parts = [f"checkpoint {source} does not fit the model"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if keys:
                parts.append(f"{title}: {_first_few(keys)}")
        raise CheckpointError("; ".join(parts))
    # A NaN or inf weight loads fine and then silently detects nothing: refuse it by name.
    bad = [k for k in own if k in state and state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {source} has NaN or infinite values in {len(bad)} tensor(s): {_first_few(bad)}"
        )
    model.load_state_dict(state, strict=False)


def _first_few(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)`` if this machine has it, else a one-line ValueError saying so."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {dev} asked for, but CUDA is not available on this machine (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {dev} asked for, but Apple MPS is not available on this machine (use cpu)")
    return dev


def read_weights(path: str | Path) -> tuple[ModelConfig | None, dict[str, Tensor]]:
    """The weights in our checkpoint, a torchvision or a Detectron2 Mask R-CNN file, under our
    names, and the checkpoint's config: our own's, the one a Detectron2 file's architecture
    implies (``detectron2_compat.infer_config``), or None for a torchvision file (whose config
    ``infer_config`` reads from the weights, with a BatchNorm eps chosen by the caller)."""
    obj = read_file(path)
    if obj.get("format") == FORMAT:
        try:
            config = from_dict(ModelConfig, obj["config"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: bad config in checkpoint: {e}") from None
        state = obj.get("model")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: a maskrcnn checkpoint without its 'model' dict of weights")
        check_state_dict(state, path)
        return config, dict(state)
    state = obj["model"] if isinstance(obj.get("model"), dict) else obj
    check_state_dict(state, path)
    if detectron2_compat.is_detectron2_state_dict(state):
        try:
            converted = detectron2_compat.convert_keys(state)
            return detectron2_compat.infer_config(converted, state), converted
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"{path}: not a Detectron2 Mask R-CNN FPN checkpoint this package can load: {e}"
            ) from None
    if not is_torchvision_state_dict(state):
        raise CheckpointError(
            f"{path}: neither a maskrcnn checkpoint nor a torchvision or Detectron2 Mask R-CNN state dict"
        )
    return None, convert_keys(state)


def check_state_dict(state: dict[Any, Any], path: str | Path) -> None:
    """A one-line CheckpointError unless ``state`` maps names (str) to tensors (or arrays)."""
    names = [k for k in state if not isinstance(k, str)]
    if names:
        raise CheckpointError(
            f"{path}: expected a dict of weights keyed by name, found the key {names[0]!r} "
            f"({type(names[0]).__name__}; {len(names)} such keys)"
        )
    values = [k for k, v in state.items() if not isinstance(v, (Tensor, np.ndarray))]
    if values:
        raise CheckpointError(
            f"{path}: expected a dict of weight tensors, but {values[0]!r} holds a "
            f"{type(state[values[0]]).__name__} ({len(values)} such entries)"
        )


def torchvision_config(state: dict[str, Tensor], path: str | Path, bn_eps: float | None = None) -> ModelConfig:
    """``infer_config`` of a torchvision file, with a one-line CheckpointError naming a key that
    the architecture is read from when the file lacks it."""
    try:
        return infer_config(state, bn_eps)
    except KeyError as e:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model (a torchvision Mask R-CNN file): missing keys: {e.args[0]}"
        ) from None


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    bn_eps: float | None = None,
    fold_bn: bool = False,
    **overrides: Any,
) -> MaskRCNN | OnnxModel:
    """Load a model from our checkpoint, a torchvision or a Detectron2 Mask R-CNN file, in eval mode; a
    ``.onnx`` file from ``maskrcnn export`` gives an ``OnnxModel`` (ONNX Runtime, CPU) and an
    OpenVINO ``.xml`` from it an ``OpenVinoModel``, each predicting the same way.

    Args:
        path: checkpoint file, or ``hf://owner/name[@revision][/file]`` on the Hugging Face Hub.
        device: where to put the model (an ONNX model runs on the CPU).
        bn_eps: BatchNorm epsilon for torchvision files (default: as torchvision loads its
            published COCO weights, 0.0 for v1 and 1e-5 for v2).
        fold_bn: run each frozen BatchNorm folded into the convolution before it
            (``model.fuse``; the weights stay as read, and training through it gets the same
            gradients to rounding; weights edited through ``.data`` are not seen): 0.56x
            torchvision's time at 2 threads instead of 0.65x. Off by default: folded, the mask
            logits of one torchvision parity batch on the AVX2 kernels are 0.0117 from
            torchvision's at our boxes, past the fixture's 1e-2 (at torchvision's boxes the
            mask head is within 2e-4 either way).
        **overrides: ``RoIHeadsConfig`` fields to change at inference, e.g. ``score_thresh``
            (for an ONNX model only ``score_thresh`` and ``mask_thresh``: the rest is in its graph).
    """
    if bn_eps is not None and not (
        isinstance(bn_eps, numbers.Real) and not isinstance(bn_eps, bool) and math.isfinite(bn_eps) and bn_eps >= 0
    ):
        raise ValueError(f"bn_eps must be a finite number >= 0, got {bn_eps!r}")  # -1 or NaN: no detections
    if hub.is_hub(path):  # hf://owner/name: into huggingface_hub's cache, then read as any local file
        path = hub.download(str(path))
    kind = file_kind(path) if Path(path).is_file() else "unknown"
    if kind in ("onnx", "openvino"):  # by content: an ONNX file need not end in .onnx
        if bn_eps is not None:
            raise ValueError(
                f"{path}: bn_eps applies to torchvision .pth files only; an exported model's BatchNorm is in its graph"
            )
        return _load_exported(Path(path), device, overrides, OnnxModel if kind == "onnx" else OpenVinoModel)
    if Path(path).suffix.lower() == ".onnx" and not Path(path).exists():
        raise CheckpointError(f"ONNX model not found: {path}")
    device = check_device(device)
    config, state = read_weights(path)
    if config is None:
        config = torchvision_config(state, path, bn_eps)
    elif bn_eps is not None:
        raise ValueError(f"{path}: bn_eps applies to torchvision .pth files only; this file's config sets its own")
    config = with_head_overrides(config, overrides)
    model = build_model(config)
    load_state(model, state, str(path))
    if fold_bn:
        fold_batchnorm(model)
    return model.to(device).eval()


def _load_exported(
    path: Path, device: str | torch.device, overrides: dict[str, Any], runtime: type[OnnxModel]
) -> OnnxModel:
    """An ONNX file (ONNX Runtime) or an OpenVINO IR (OpenVINO) of ``maskrcnn export``."""
    if check_device(device).type != "cpu":
        raise ValueError(f"{path}: exported models run on the CPU (ONNX Runtime's or OpenVINO's), not {device}")
    if overrides:  # an unknown key is told as one (with suggestions), not as one that cannot change
        apply_overrides(ModelConfig(), [f"roi_heads.{k}={v}" for k, v in overrides.items()])
    fixed = sorted(set(overrides) - {"score_thresh", "mask_thresh"})
    if fixed:
        raise CheckpointError(
            f"{path}: {', '.join(fixed)} cannot change in an exported model (only score_thresh "
            "and mask_thresh); export again from a checkpoint loaded with them"
        )
    try:
        model = runtime(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model.config = with_head_overrides(model.config, overrides)
    return model


def with_head_overrides(config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """``config`` with ``RoIHeadsConfig`` overrides applied (typed like any config override:
    unknown keys get suggestions) and its score and mask thresholds checked to be in [0, 1]."""
    if overrides:
        config = apply_overrides(config, [f"roi_heads.{k}={v}" for k, v in overrides.items()])
    check_probability("score_thresh", config.roi_heads.score_thresh)
    check_probability("mask_thresh", config.roi_heads.mask_thresh)
    check_probability("nms_thresh", config.roi_heads.nms_thresh)  # 1.5 would silently suppress nothing
    keep = config.roi_heads.detections_per_img
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:  # -1 silently dropped the last detection
        raise ValueError(f"detections_per_img must be an integer >= 1, got {keep!r}")
    return config


def with_layout_of(config: ModelConfig, path: str | Path) -> ModelConfig:
    """``config`` with the ``LAYOUT_FIELDS`` of the checkpoint at ``path`` (ours or torchvision's)."""
    saved, state = read_weights(path)
    source = saved if saved is not None else torchvision_config(state, path)
    out = copy.deepcopy(config)
    changed = []
    for section, name in LAYOUT_FIELDS:
        value = getattr(getattr(source, section), name)
        if getattr(getattr(out, section), name) != value:
            setattr(getattr(out, section), name, value)
            changed.append(f"model.{section}.{name}={value}")
    if changed:
        log.info("layers laid out as in %s: %s", path, " ".join(changed))
    return out


def init_from_checkpoint(model: MaskRCNN, path: str | Path, bn_eps: float) -> list[str]:
    """Load our or a torchvision checkpoint into ``model`` to start training from it.

    Class-specific layers (``CLASS_HEADS``): where the file names classes and every class of
    ``model`` is among them, each class takes the file's rows of its name (fine-tuning COCO
    weights on "person, car" keeps what they know of people and cars; a reordered class list
    is followed). Otherwise, where the file names other classes or has another class count,
    they keep their fresh initialisation. Returns the names of those re-initialised tensors.
    """
    config, state = read_weights(path)
    if config is None:
        published_eps = torchvision_config(state, path).backbone.bn_eps
        if bn_eps != published_eps:
            log.warning(
                "%s is a torchvision file; its COCO weights were trained with BatchNorm eps %g "
                "(model.backbone.bn_eps=%g reproduces its features exactly)",
                path,
                published_eps,
                published_eps,
            )
    else:  # e.g. a Detectron2 file: the same tensors can mean another network
        own_cfg = model.config
        differ = [
            f"{k}={getattr(ours, f)!r} (file: {getattr(theirs, f)!r})"
            for k, ours, theirs, f in (
                ("model.backbone.stride_in_1x1", own_cfg.backbone, config.backbone, "stride_in_1x1"),
                ("model.transform.bgr", own_cfg.transform, config.transform, "bgr"),
                ("model.transform.pixel_scale", own_cfg.transform, config.transform, "pixel_scale"),
                ("model.transform.image_std", own_cfg.transform, config.transform, "image_std"),
            )
            if getattr(ours, f) != getattr(theirs, f)
        ]
        if differ:
            log.warning(
                "%s was trained with other input or backbone settings than this config: %s", path, "; ".join(differ)
            )
    own = model.state_dict()
    heads = [k for k in own if k.startswith(CLASS_HEADS)]
    file_names = list((config or torchvision_config(state, path)).class_names)
    own_names = list(model.config.class_names)
    rows = _class_rows(own_names, file_names, model.config.num_classes)
    taken = _take_class_rows(state, own, heads, rows, len(file_names) + 1) if rows is not None else None
    reinit: list[str] = []
    if taken is not None and rows != list(range(len(file_names) + 1)):
        state.update(taken)
        log.info(
            "class heads taken from %s's classes by name (%s)",
            path,
            ", ".join(f"{n}: {file_names[r - 1]!r}" for n, r in zip(model.config.class_names, rows[1:])),
        )
    elif any(k in state and state[k].shape != own[k].shape for k in heads) or (
        taken is None and _named(file_names) and _named(own_names)
    ):
        reinit = heads
        state.update({k: own[k] for k in heads})
        log.info(
            "new class heads: %s re-initialised for %d classes (%s)",
            ", ".join(sorted({k.rsplit(".", 1)[0] for k in heads})),
            model.config.num_classes,
            "the file's classes do not include them all by name" if _named(file_names) else "another class count",
        )
    load_state(model, state, str(path))
    log.info("initialised from %s", path)
    return reinit


def _named(names: list[str]) -> bool:
    return any(names)


def _class_rows(own: list[str], theirs: list[str], num_classes: int) -> list[int] | None:
    """For each label 0..num_classes of the model, the file's label with the same class name
    (0 for background); the same list maps row for row (even with repeated or empty names).
    Otherwise None when a class is unnamed on either side or missing in the file, or a name is
    not unique there."""
    if own == theirs and len(own) == num_classes:  # the same list: row for row, whatever its names
        return list(range(num_classes + 1))
    if len(own) != num_classes or not all(own) or not _named(theirs):
        return None
    index = {n: i + 1 for i, n in enumerate(theirs) if n and theirs.count(n) == 1}
    if not all(n in index for n in own):
        return None
    return [0, *(index[n] for n in own)]


def _take_class_rows(
    state: dict[str, Tensor], own: dict[str, Tensor], heads: list[str], rows: list[int], file_slots: int
) -> dict[str, Tensor] | None:
    """The class heads' tensors with the file's rows ``rows`` (first dim: ``file_slots`` blocks,
    one per label: a score, a bias, 4 box deltas or a mask's logits); None when a tensor is
    missing or not laid out per class as the model's is."""
    taken = {}
    for k in heads:
        t = state.get(k)
        if t is None or t.shape[0] % file_slots or t.shape[1:] != own[k].shape[1:]:
            return None
        per_class = t.reshape(file_slots, t.shape[0] // file_slots, *t.shape[1:])  # (slots, block, ...)
        if per_class[0].numel() * len(rows) != own[k].numel():
            return None
        taken[k] = per_class[rows].reshape(own[k].shape).clone()
    return taken


def load_backbone_weights(body: nn.Module, path: str | Path) -> None:
    """Load an ImageNet classifier state dict (torchvision ResNet names) into a body; ``fc`` is
    dropped. Training does this for ``model.backbone.weights`` before its first step."""
    obj = read_file(path)
    state = obj.get("model", obj) if isinstance(obj.get("model"), dict) else obj
    state = {
        k.removeprefix("backbone.body."): v
        for k, v in state.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    load_state(body, state, str(path))
