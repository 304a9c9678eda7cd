"""Reading Detectron2's model zoo files (``model_final_*.pkl``) of its Mask R-CNN FPN configs.

Such a file is a plain pickle (not ``torch.save``) of::

    {"model": {name: numpy.ndarray}, "__author__": "Detectron2 Model Zoo", ...}

with Detectron2's module names (``backbone.bottom_up.res2.0.conv1.norm.weight``,
``backbone.fpn_lateral2.weight``, ``proposal_generator.rpn_head.objectness_logits.weight``,
``roi_heads.mask_head.predictor.weight``, ...). It is read with an unpickler that admits only
the numpy and container types such a file holds, so no pickled code ever runs.

Detectron2 puts the background logit last and predicts boxes and masks for the K foreground
classes only; this package has background in slot 0 everywhere. ``convert_keys`` moves the
classifier's last row first and gives the box and mask predictors an all-zero background slot,
which no detection ever reads: the softmax and every foreground output are unchanged.

The config comes from the file's architecture (``infer_config``), as Detectron2's
``mask_rcnn_{R_50,R_101,X_101_32x8d}_FPN_3x.yaml`` set it: BGR input in 0..255 with its pixel
mean and std (std 1 for the MSRA R50/R101, ImageNet's for X101), its resize rounding, the stride
in the bottleneck's 1x1 conv for the MSRA ResNets, exact anchors, RoIAlign aligned=True with
adaptive sampling, its FPN level rule, proposals ranked by logit, no box-size filter, and its
grid-sample mask pasting.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig
from .torchvision import COCO_91_NAMES
from .torchvision import infer_config as infer_torchvision_config

# Detectron2's BGR pixel mean (0..255) and the std of its X101-32x8d config (the FAIR ResNeXt
# was trained on inputs scaled like torchvision's); its MSRA R50/R101 weights use std 1.
PIXEL_MEAN = (103.530, 116.280, 123.675)
PIXEL_STD_MSRA = (1.0, 1.0, 1.0)
PIXEL_STD_X101 = (57.375, 57.120, 58.395)

# Every global a Detectron2 weight file may name: numpy's array reconstruction (numpy 1 and 2
# module paths), the containers, and the latin-1 ``_codecs.encode`` through which a protocol-2
# pickle written by Python 3 stores bytes. Anything else is refused before it is looked up.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}

# Buffers some Detectron2 versions saved: the normalisation (read into the config) and the
# anchors (recomputed from the config).
_IGNORED = re.compile(
    r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+)$|num_batches_tracked$"
)

# (pattern of a Detectron2 key, our key); numbered stages res2..res5 are our layer1..layer4.
_RULES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"^backbone\.bottom_up\.stem\.conv1\.weight$"), "backbone.body.conv1.weight"),
    (re.compile(r"^backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)$"), r"backbone.body.bn1.\1"),
    (
        re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight$"),
        lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight",
    ),
    (
        re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)$"),
        lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}",
    ),
    (
        re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight$"),
        lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight",
    ),
    (
        re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)$"),
        lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}",
    ),
    (
        re.compile(r"^backbone\.fpn_lateral(\d)\.(weight|bias)$"),
        lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 2}.{m[2]}",
    ),
    (
        re.compile(r"^backbone\.fpn_output(\d)\.(weight|bias)$"),
        lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 2}.{m[2]}",
    ),
    (re.compile(r"^proposal_generator\.rpn_head\.conv\.(weight|bias)$"), r"rpn.head.conv.\1"),
    (re.compile(r"^proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)$"), r"rpn.head.cls_logits.\1"),
    (re.compile(r"^proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)$"), r"rpn.head.bbox_pred.\1"),
    (re.compile(r"^roi_heads\.box_head\.fc1\.(weight|bias)$"), r"roi_heads.box_head.fc6.\1"),
    (re.compile(r"^roi_heads\.box_head\.fc2\.(weight|bias)$"), r"roi_heads.box_head.fc7.\1"),
    (re.compile(r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$"), r"roi_heads.box_predictor.\1.\2"),
    (re.compile(r"^roi_heads\.mask_head\.(mask_fcn\d)\.(weight|bias)$"), r"roi_heads.mask_head.\1.\2"),
    (re.compile(r"^roi_heads\.mask_head\.deconv\.(weight|bias)$"), r"roi_heads.mask_predictor.conv5_mask.\1"),
    (re.compile(r"^roi_heads\.mask_head\.predictor\.(weight|bias)$"), r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside ``_ALLOWED_GLOBALS``."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.what = f"{module}.{name}"


class _WeightsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(module, name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids (a torch.save file?) are not part of a Detectron2 .pkl")


def load_pickle(data: bytes) -> Any:
    """Unpickle ``data`` admitting only numpy arrays, dtypes and containers.

    ``encoding="latin1"`` reads the Python 2 pickles of older files, as Detectron2 does.
    Raises ``UnsafePickleError`` (naming the global) for anything else.
    """
    return _WeightsUnpickler(io.BytesIO(data), encoding="latin1").load()


def read_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """The ``{name: array}`` weights of a Detectron2 ``.pkl`` file; ``ValueError`` with one line
    naming the file and the problem otherwise (including a refused global)."""
    path = Path(path)
    try:
        obj = load_pickle(path.read_bytes())
    except UnsafePickleError as e:
        raise ValueError(
            f"cannot read {path}: it asks for {e.what}, which a Detectron2 weight file never holds; "
            "it was not unpickled, as that could run arbitrary code"
        ) from None
    except Exception as e:  # truncated or not a pickle
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"cannot read {path}: not a Detectron2 weight pickle ({type(e).__name__}: {first_line})"
        ) from None
    model = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(model, dict):
        what = (
            "a Detectron (v1) 'blobs' file" if isinstance(obj, dict) and "blobs" in obj else f"a {type(obj).__name__}"
        )
        raise ValueError(f"{path}: expected a dict with a 'model' dict of arrays (Detectron2's layout), got {what}")
    bad = [k for k, v in model.items() if not isinstance(v, np.ndarray) or v.dtype.kind not in "fiub"]
    if bad:
        raise ValueError(f"{path}: 'model' holds {len(bad)} entries that are not numeric arrays, e.g. {bad[0]!r}")
    return dict(model)


def is_detectron2_state_dict(state: dict[str, Any]) -> bool:
    return any(k.startswith("backbone.bottom_up.") for k in state) and any(
        k.startswith("roi_heads.box_predictor.") for k in state
    )


def _background_first(name: str, value: Tensor) -> Tensor:
    """Detectron2's K-class predictors -> our K+1 slots with background in slot 0."""
    if name.startswith("roi_heads.box_predictor.cls_score."):
        return torch.cat([value[-1:], value[:-1]])  # background logit: last -> first
    if name.startswith("roi_heads.box_predictor.bbox_pred."):
        return torch.cat([value.new_zeros((4, *value.shape[1:])), value])  # (4 (K+1), ...)
    if name.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
        return torch.cat([value.new_zeros((1, *value.shape[1:])), value])  # (K+1, ...)
    return value


def convert_keys(state: dict[str, Any]) -> dict[str, Tensor]:
    """Detectron2 state dict (arrays or tensors) -> our names and slot layout, float32 tensors.

    Keys no rule knows are kept under their own names, so loading reports them as unexpected.
    """
    out: dict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        if _IGNORED.search(key):
            continue
        tensor = torch.as_tensor(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        new = key
        for pattern, repl in _RULES:
            m = pattern.match(key)
            if m:
                new = repl(m) if callable(repl) else m.expand(repl)
                break
        out[new] = _background_first(new, tensor.float() if tensor.is_floating_point() else tensor)
    bbox = out.get("roi_heads.box_predictor.bbox_pred.weight")
    cls = out.get("roi_heads.box_predictor.cls_score.weight")
    if bbox is not None and cls is not None and bbox.shape[0] != 4 * cls.shape[0]:
        raise ValueError(
            "class-agnostic box regression (one box per RoI) is not supported; "
            f"bbox_pred has {bbox.shape[0] - 4} rows for {cls.shape[0] - 1} classes"
        )
    return out


def infer_config(state: dict[str, Tensor], raw: dict[str, Any] | None = None) -> ModelConfig:
    """The ``ModelConfig`` of a converted Detectron2 Mask R-CNN FPN state dict.

    The architecture (R50 / R101 / X101-32x8d, classes, masks) is read from the shapes, and the
    inference settings are those of Detectron2's model zoo configs for it. ``raw``: the file's
    own keys, whose ``pixel_mean`` / ``pixel_std`` (saved by some Detectron2 versions) win over
    the defaults for the architecture, as they do when Detectron2 loads the file.
    """
    cfg = infer_torchvision_config(state, bn_eps=1e-5)  # the same shapes name the same backbone
    grouped = cfg.backbone.name.startswith("resnext")
    cfg.backbone.stride_in_1x1 = not grouped  # the MSRA ResNets; FAIR's ResNeXt strides in the 3x3
    cfg.anchors.round_cells = False
    cfg.anchors.strides = (4, 8, 16, 32, 64)  # Detectron2's fixed level strides, never padded // grid
    cfg.rpn.min_size = 0.0
    cfg.rpn.rank_by = "logit"
    cfg.rpn.pre_nms_top_n_test = 1000
    cfg.rpn.post_nms_top_n_test = 1000
    h = cfg.roi_heads
    h.aligned, h.sampling_ratio, h.level_mapper = True, 0, "detectron2"
    h.box_min_size, h.paste = 0.0, "detectron2"
    h.pooler_strides = (
        4,
        8,
        16,
        32,
    )  # ROIPooler's fixed 1/stride scales: a 30:1 image pooled P2 at 1/2 with torchvision's rule
    t = cfg.transform
    t.bgr, t.pixel_scale, t.resize = True, 255.0, "detectron2"
    t.min_size, t.max_size, t.size_divisible = (800,), 1333, 32
    t.image_mean = PIXEL_MEAN
    t.image_std = PIXEL_STD_X101 if grouped else PIXEL_STD_MSRA
    for key, field in (("pixel_mean", "image_mean"), ("pixel_std", "image_std")):
        if raw is not None and key in raw:
            setattr(t, field, tuple(float(v) for v in np.asarray(raw[key]).reshape(-1)))
    cfg.class_names = ()
    cfg.category_ids = ()
    if cfg.num_classes == 80:  # COCO: Detectron2's contiguous classes in COCO id order
        coco = [(i, n) for i, n in enumerate(COCO_91_NAMES) if i > 0 and n != "N/A"]
        cfg.class_names = tuple(n for _, n in coco)
        cfg.category_ids = tuple(i for i, _ in coco)
    return cfg
