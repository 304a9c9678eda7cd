"""Typed configuration: the method's values as defaults, YAML files and ``key=value`` overrides.

Defaults are torchvision's ``maskrcnn_resnet50_fpn`` settings, so a torchvision checkpoint
loaded with the default config computes what torchvision computes. Only the builders
(``maskrcnn.model.build``, ``maskrcnn.train.trainer``) read a config; modules take explicit
arguments.

``num_classes`` counts foreground classes. The predictors have ``num_classes + 1`` outputs and
index 0 is background, everywhere in this package.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # resnet18/34/50/101, resnext50_32x4d, resnext101_32x8d
    frozen_bn: bool = True  # BatchNorm as a fixed affine map (detection batches are too small to train it)
    sync_bn: bool = False  # trainable BatchNorm (frozen_bn=false) takes its statistics over all processes of a distributed run (CUDA)
    bn_eps: float = 1e-5  # torchvision's 2019 COCO weights were trained with eps 0.0; its loader sets that
    trainable_layers: int = 3  # ResNet stages trained counting from the top (0..5); the rest frozen
    fpn_channels: int = 256  # channels of every FPN output P2..P6
    stride_in_1x1: bool = False  # a downsampling bottleneck strides in its first 1x1 conv, not the 3x3 (MSRA ResNets: Detectron2's R50/R101)
    fpn_norm: str = (
        "none"  # "none" (convs with bias, torchvision v1) or "batchnorm" after each FPN conv (torchvision v2)
    )
    weights: str = (
        ""  # optional ImageNet-classifier state dict for the body (torchvision key names), loaded when training starts
    )


@dataclass
class AnchorConfig:
    sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one anchor size (sqrt area, pixels) per level P2..P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width, the same on every level
    round_cells: bool = True  # cell anchor corners rounded to integers (torchvision); Detectron2 keeps them exact
    strides: tuple[
        int, ...
    ] = ()  # cell step per level in pixels (Detectron2: 4..64); () = padded size // grid (torchvision)


@dataclass
class RPNConfig:
    pre_nms_top_n_train: int = 2000  # best-scored anchors kept per level before NMS, training
    pre_nms_top_n_test: int = 1000  # same, inference
    post_nms_top_n_train: int = 2000  # proposals kept per image after NMS, training
    post_nms_top_n_test: int = 1000  # same, inference
    nms_thresh: float = 0.7  # IoU above which a lower-scored proposal is dropped
    score_thresh: float = 0.0  # minimum objectness probability of a proposal
    min_size: float = (
        1e-3  # proposals narrower or shorter than this (pixels) are dropped; 0 drops only empty ones (Detectron2)
    )
    rank_by: str = "prob"  # proposals ordered for NMS by sigmoid "prob" (torchvision) or raw "logit" (Detectron2; saturated probabilities tie)
    fg_iou_thresh: float = 0.7  # anchor is positive at IoU >= this (or if best for a ground-truth box)
    bg_iou_thresh: float = 0.3  # anchor is negative at IoU < this; neutral in between
    batch_size_per_image: int = 256  # anchors sampled per image for the loss
    positive_fraction: float = 0.5  # at most this share of the sampled anchors is positive
    objectness: str = "sigmoid"  # "sigmoid": one logit per anchor; "softmax": 2-class (seed 3.3.7)
    exclude_border_anchors: bool = False  # anchors crossing the image border are neutral (seed 3.3.7)
    smooth_l1_beta: float = 1.0 / 9  # transition point of the smooth L1 box loss
    conv_depth: int = 1  # 3x3 conv + ReLU layers of the shared head (torchvision v2 has 2)


@dataclass
class RoIHeadsConfig:
    box_roi_size: int = 7  # RoIAlign output for the box head
    mask_roi_size: int = 14  # RoIAlign output for the mask head (masks are predicted at 2x this)
    sampling_ratio: int = 2  # bilinear samples per bin side; <= 0 adapts to the RoI size
    aligned: bool = False  # RoIAlign half-pixel shift: False as torchvision, True as Detectron2
    level_mapper: str = "torchvision"  # FPN level of a RoI: floor(4 + log2(s/224) + 1e-6) ("torchvision") or floor(4 + log2(s/224 + 1e-8)) ("detectron2")
    pooler: str = "align"  # "align" (RoIAlign, seed 3.4.2) or "pool" (quantised max, seed 3.4.1)
    pooler_strides: tuple[int, ...] = (
        4,
        8,
        16,
        32,
    )  # pooling scale 1/stride per level P2..P5, as Detectron2 and torchvision after its first call; () = inferred per batch from the height
    box_head: str = (
        "2fc"  # "2fc" (two FC layers, the paper) or "4conv1fc" (four 3x3 convs of 256, one FC: torchvision v2)
    )
    box_head_norm: str = "none"  # "none" or "batchnorm" after each 3x3 conv of a "4conv1fc" box head
    representation_size: int = 1024  # width of the FC layers of the box head
    mask_channels: tuple[int, ...] = (256, 256, 256, 256)  # 3x3 convs of the mask head
    mask_head_norm: str = "none"  # "none" or "batchnorm" after each 3x3 conv of the mask head (torchvision v2)
    fg_iou_thresh: float = 0.5  # a proposal is foreground at IoU >= this with a ground-truth box
    bg_iou_thresh: float = 0.5  # and background below this
    batch_size_per_image: int = 512  # RoIs sampled per image for the loss
    positive_fraction: float = 0.25  # at most this share of the sampled RoIs is foreground
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # dx, dy, dw, dh scales
    score_thresh: float = 0.05  # detections below this class probability are dropped
    nms_thresh: float = 0.5  # per-class NMS IoU threshold
    detections_per_img: int = 100  # best detections kept per image
    box_min_size: float = 1e-2  # detections narrower or shorter than this (pixels) are dropped before NMS; 0: only empty ones, after the top-k (Detectron2)
    mask_thresh: float = 0.5  # probability above which a pasted mask pixel is foreground
    paste: str = "torchvision"  # mask pasting: "torchvision" (padded box, interpolate, > thresh) or "detectron2" (grid_sample, >= thresh)


@dataclass
class TransformConfig:
    min_size: tuple[int, ...] = (800,)  # short side after resizing; training picks one at random
    max_size: int = 1333  # long side is at most this
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet RGB mean (inputs in 0..1)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet RGB std
    size_divisible: int = 32  # batch padded to a multiple of this (the coarsest FPN stride)
    bgr: bool = False  # feed channels as B, G, R (Detectron2's MSRA / caffe2-trained weights)
    pixel_scale: float = 1.0  # white is this value before normalisation: 1 (torchvision), 255 (Detectron2); mean and std in the same units
    resize: str = "torchvision"  # "torchvision": bilinear interpolate, sides floored; "detectron2": sides rounded, PIL bilinear on uint8 pixels
    percentiles: tuple[
        float, ...
    ] = ()  # (low, high), e.g. (1, 99.8): each image's values between these percentiles stretched to 0..255 when read (12/16-bit microscopy, data.normalize); () = the fixed rule of data.images


@dataclass
class ModelConfig:
    num_classes: int = 90  # foreground classes; torchvision's COCO weights have 90 (+ background)
    class_names: tuple[str, ...] = ()  # name of label 1..num_classes ("" where unknown)
    category_ids: tuple[int, ...] = ()  # dataset category id of label 1..num_classes; () = identity
    masks: bool = True  # build the mask branch
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)

    def label_names(self) -> list[str]:
        """Name of every label 0..num_classes ("__background__" for 0, "" where unknown)."""
        names = list(self.class_names) + [""] * (self.num_classes - len(self.class_names))
        return ["__background__", *names]

    def label_categories(self) -> list[int]:
        """Dataset category id of every label 0..num_classes (0 for background; the label itself
        without ``category_ids``, as torchvision's COCO weights predict COCO ids directly)."""
        return [0, *self.category_ids] if self.category_ids else list(range(self.num_classes + 1))


# ----------------------------------------------------------------------------------------
# Dict / YAML / key=value round trips, shared by every config dataclass of the package.


class ConfigError(ValueError):
    """A config file or override names an unknown key or has a value of the wrong type."""


def check_probability(name: str, value: Any) -> Any:
    """``value`` if None or a number in [0, 1]; otherwise a one-line ValueError naming ``name``.

    The one check of the score and mask thresholds, wherever they are given (``maskrcnn.load``
    overrides, ``predict`` arguments, the command line): a threshold of 2 or NaN would silently
    give no detections or empty masks.
    """
    ok = (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and 0.0 <= value <= 1.0
    )
    if value is not None and not ok:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(hint, value, prefix=key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, key) for v in value)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or float(value) != int(float(value)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(float(value))
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        return str(value)
    return value


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else f"; known keys: {', '.join(names)}"
    return ConfigError(f"unknown config key '{prefix}{name}'{hint}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys fail with suggestions."""
    hints = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in hints:
            raise _unknown_key(cls, name, prefix)
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) of a config dataclass, ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Return a copy of ``config`` with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    data = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        node, cls = data, type(config)
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            hints = _field_types(cls)
            if part not in hints:
                raise _unknown_key(cls, part, ".".join(parts[:depth]) + ("." if depth else ""))
            if depth == len(parts) - 1:
                node[part] = yaml.safe_load(raw) if raw.strip() else ""
            else:
                cls = hints[part]
                if not dataclasses.is_dataclass(cls):
                    raise ConfigError(f"'{'.'.join(parts[: depth + 1])}' is a value, not a section")
                node = node[part]
    return from_dict(type(config), data)


def load_yaml(cls: type, path: str | Path, overrides: list[str] = ()) -> Any:
    """Read a YAML file into dataclass ``cls`` and apply ``key=value`` overrides."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        config = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(config, list(overrides))
