"""Checkpoints as safetensors files: tensors plus JSON, no pickle, so loading runs no code.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and byte range, and a ``__metadata__`` dict of strings), then the raw bytes.
Our checkpoint dict (``checkpoint.FORMAT``: format, config, model weights, optional
train_state) is stored as:

    tensors:   each model weight under its state-dict name ("backbone.body.conv1.weight"),
               each tensor of train_state under "train_state/<path>" (optimizer moments...)
    metadata:  {"format": "maskrcnn-checkpoint/1", "maskrcnn": JSON of the dict with every
               tensor replaced by {"__tensor__": name}}

so other tools (the Hub's file viewer, ``safetensors.torch.load_file``) see the model weights
under their usual names, and ``read`` gives back the same dict that ``torch.load`` would. A
safetensors file without our metadata (e.g. someone's plain state dict) reads as its tensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_write

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"  # markers in the JSON skeleton
MAX_HEADER = 100_000_000  # bytes; safetensors' own limit on the JSON header


CHECKPOINT_SUFFIXES = {"pth": ".pth", "safetensors": ".safetensors"}  # checkpoint_format -> file suffix


def checkpoint_suffix(checkpoint_format: str) -> str:
    """The file suffix of a training run's checkpoints; a one-line ValueError for an unknown format."""
    if checkpoint_format not in CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"checkpoint_format must be one of {', '.join(CHECKPOINT_SUFFIXES)}, got {checkpoint_format!r}"
        )
    if checkpoint_format == "safetensors":
        try:
            import safetensors  # noqa: F401  told before training, not at the first checkpoint
        except ImportError:
            raise _missing() from None
    return CHECKPOINT_SUFFIXES[checkpoint_format]


def _missing() -> ValueError:
    return ValueError("safetensors files need the safetensors package: pip install 'maskrcnn[hub]'")


def looks_like(head: bytes, size: int) -> bool:
    """True when a file of ``size`` bytes starting with ``head`` (at least 9 bytes) is laid out
    as safetensors: a header length that fits the file, then a JSON object."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= min(MAX_HEADER, size - 8) and head[8:9] == b"{"


def save(obj: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint dict (tensors, and dicts, lists, tuples, str, int, float, bool, None
    around them) as one safetensors file, atomically.

    Raises:
        TypeError: a value that is neither a tensor nor plain data (it cannot be stored without pickle).
    """
    try:
        from safetensors.torch import save as save_bytes
    except ImportError:
        raise _missing() from None
    tensors: dict[str, Tensor] = {}
    model = obj.get("model")
    skeleton = {k: _encode(v, "" if k == "model" and isinstance(model, dict) else k, tensors) for k, v in obj.items()}
    metadata = {"maskrcnn": json.dumps(skeleton)}
    if isinstance(obj.get("format"), str):
        metadata["format"] = obj["format"]
    # safetensors refuses tensors that share memory (tied or viewed weights): each gets its own copy.
    data = save_bytes({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))


def _encode(value: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """``value`` as JSON, its tensors moved to ``tensors`` under ``name``-based keys."""
    if isinstance(value, np.ndarray):  # a Detectron2 .pkl's weights
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Tensor):
        key = name or "tensor"
        if key in tensors:
            raise ValueError(f"two tensors would be stored under the name {key!r}")
        tensors[key] = value
        return {_TENSOR: key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TENSOR not in value:
            # Model weights keep their state-dict names; everything else is prefixed by its path.
            return {k: _encode(v, f"{name}/{k}" if name else k, tensors) for k, v in value.items()}
        if not all(isinstance(k, (str, int, float, bool)) or k is None for k in value):
            raise TypeError(f"{name}: dict keys must be str, int, float, bool or None to be stored without pickle")
        return {_ITEMS: [[k, _encode(v, f"{name}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):  # json writes nan and inf as NaN and Infinity and reads them back
        return value
    raise TypeError(
        f"{name or 'value'}: a {type(value).__name__} cannot be stored in a safetensors file "
        "(only tensors and plain values: dict, list, tuple, str, int, float, bool, None)"
    )


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR}:
        return tensors[value[_TENSOR]]
    if set(value) == {_TUPLE}:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if set(value) == {_ITEMS}:
        return {k: _decode(v, tensors) for k, v in value[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def read(path: str | Path) -> dict[str, Any]:
    """A safetensors file -> our checkpoint dict (as written by ``save``), or a foreign file's
    ``{name: tensor}``. Only the JSON header is parsed and tensor bytes copied: no code runs.

    Raises:
        ValueError: a file that is not valid safetensors, or whose metadata names tensors it lacks.
    """
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise _missing() from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  safe_open has no __iter__
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"cannot read {path}: not a valid safetensors file ({e})") from None
    if "maskrcnn" not in metadata:
        return tensors
    try:
        return _decode(json.loads(metadata["maskrcnn"]), tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {path}: its maskrcnn metadata is damaged ({type(e).__name__}: {e})") from None
