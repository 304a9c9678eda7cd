"""Reading torchvision's Mask R-CNN checkpoints: key names of 2019 and of today, the config
they imply, and COCO's category names in torchvision's 91-slot order.

Two layouts are published: v1 (``maskrcnn_resnet50_fpn``, 2019 key names) and v2
(``maskrcnn_resnet50_fpn_v2``: BatchNorm in the FPN and both heads, a 2-conv RPN head, a
4-conv + 1-FC box head, an ordinary BatchNorm backbone). Our module names are torchvision's
2019 ones, so a 2019 file loads as it is; newer files wrap convolutions in
``Conv2dNormActivation`` (``...N.0.weight`` for the conv, ``...N.1.*`` for its BatchNorm) and
number the head layers, which the rules below undo.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor

from ..config import ModelConfig

# (pattern of a current torchvision key, our key from the match). Keys matching none are ours already.
_CURRENT_TO_OURS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (
        re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.(\w+)$"),
        lambda m: f"backbone.fpn.{m[1]}_blocks.{m[2]}.{m[3]}",
    ),
    (
        re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.1\.(\w+)$"),
        lambda m: f"backbone.fpn.{m[1]}_norms.{m[2]}.{m[3]}",
    ),
    # rpn.head.conv.K.0: the K-th 3x3 conv -> conv, conv2, conv3...
    (re.compile(r"^rpn\.head\.conv\.(\d+)\.0\.(\w+)$"), lambda m: f"rpn.head.conv{_suffix(m[1])}.{m[2]}"),
    # v2 box head: Sequential(conv block 0..3, Flatten, Linear, ReLU)
    (re.compile(r"^roi_heads\.box_head\.(\d+)\.0\.(\w+)$"), lambda m: f"roi_heads.box_head.conv{int(m[1]) + 1}.{m[2]}"),
    (re.compile(r"^roi_heads\.box_head\.(\d+)\.1\.(\w+)$"), lambda m: f"roi_heads.box_head.norm{int(m[1]) + 1}.{m[2]}"),
    (re.compile(r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$"), lambda m: f"roi_heads.box_head.fc.{m[2]}"),
    (
        re.compile(r"^roi_heads\.mask_head\.(\d+)\.0\.(\w+)$"),
        lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}",
    ),
    (
        re.compile(r"^roi_heads\.mask_head\.(\d+)\.1\.(\w+)$"),
        lambda m: f"roi_heads.mask_head.mask_norm{int(m[1]) + 1}.{m[2]}",
    ),
]


def _suffix(index: str) -> str:
    """RPN conv K (from 0) -> our name's suffix: "" for the first (2019's ``conv``), else K+1."""
    return "" if index == "0" else str(int(index) + 1)


# torchvision's COCO_V1 categories: slot i is COCO category id i; "N/A" marks unused ids.
COCO_91_NAMES: tuple[str, ...] = (
    "__background__",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "N/A",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "N/A",
    "backpack",
    "umbrella",
    "N/A",
    "N/A",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "N/A",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "N/A",
    "dining table",
    "N/A",
    "N/A",
    "toilet",
    "N/A",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "N/A",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


def is_torchvision_state_dict(state: dict[str, Tensor]) -> bool:
    return any(k.startswith("roi_heads.box_predictor.") for k in state) and not any(
        k.startswith("preprocess.") for k in state
    )


def convert_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision Mask R-CNN state dict (2019 or current names, v1 or v2) -> our key names.

    BatchNorm step counters (``num_batches_tracked``) are dropped: inference never reads them
    and ``checkpoint.load_state`` keeps the model's own.
    """
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = key
        for pattern, rename in _CURRENT_TO_OURS:
            m = pattern.match(key)
            if m:
                new = rename(m)
                break
        out[new] = value
    return out


def is_v2_layout(state: dict[str, Tensor]) -> bool:
    """Whether a converted torchvision state dict is ``maskrcnn_resnet50_fpn_v2``'s layout."""
    return "backbone.fpn.inner_norms.0.weight" in state


def infer_config(state: dict[str, Tensor], bn_eps: float | None = None) -> ModelConfig:
    """The ``ModelConfig`` of a torchvision-format state dict (already converted).

    ``bn_eps`` defaults to the value torchvision loads the layout's published COCO weights
    with: 0.0 for v1 (its loader overwrites the frozen BatchNorms' eps), BatchNorm's own 1e-5
    for v2. A v2 file gets trainable BatchNorm in the backbone, as torchvision builds it; in
    eval mode that computes exactly what frozen BatchNorm would.
    """
    cfg = ModelConfig()
    slots = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    cfg.num_classes = slots - 1
    blocks3 = {int(k.split(".")[3]) for k in state if k.startswith("backbone.body.layer3.")}
    deep = len(blocks3) > 6
    conv2 = state["backbone.body.layer1.0.conv2.weight"]
    grouped = conv2.shape[1] != conv2.shape[0]  # a grouped 3x3 has in-channels per group
    if "backbone.body.layer1.0.conv3.weight" not in state:
        cfg.backbone.name = "resnet34" if deep or len(blocks3) == 6 else "resnet18"
    elif grouped:
        cfg.backbone.name = "resnext101_32x8d" if deep else "resnext50_32x4d"
    else:
        cfg.backbone.name = "resnet101" if deep else "resnet50"
    v2 = is_v2_layout(state)
    cfg.backbone.bn_eps = (1e-5 if v2 else 0.0) if bn_eps is None else bn_eps
    if v2:
        cfg.backbone.frozen_bn = False
        cfg.backbone.fpn_norm = "batchnorm"
    cfg.rpn.conv_depth = sum(1 for k in state if re.fullmatch(r"rpn\.head\.conv\d*\.weight", k))
    if "roi_heads.box_head.fc.weight" in state:
        cfg.roi_heads.box_head = "4conv1fc"
        cfg.roi_heads.representation_size = state["roi_heads.box_head.fc.weight"].shape[0]
        if "roi_heads.box_head.norm1.weight" in state:
            cfg.roi_heads.box_head_norm = "batchnorm"
    if "roi_heads.mask_head.mask_norm1.weight" in state:
        cfg.roi_heads.mask_head_norm = "batchnorm"
    cfg.masks = "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
    if slots == 91:
        cfg.class_names = tuple("" if n == "N/A" else n for n in COCO_91_NAMES[1:])
    return cfg
