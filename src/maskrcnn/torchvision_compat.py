"""Reading torchvision's Mask R-CNN checkpoints: key names of 2019 and of today, the config
they imply, and COCO's category names in torchvision's 91-slot order.

Our module names are torchvision's 2019 ones, so a 2019 file loads as it is; newer files
wrap some convolutions in ``Conv2dNormActivation`` (``...0.0.weight``) and number the mask
head's layers, which the rules below undo.
"""
from __future__ import annotations

import re

from torch import Tensor

from .config import ModelConfig

# (pattern of a current torchvision key, replacement giving our / the 2019 key)
_CURRENT_TO_2019 = [
    (re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.(weight|bias)$"), r"backbone.fpn.\1_blocks.\2.\3"),
    (re.compile(r"^rpn\.head\.conv\.0\.0\.(weight|bias)$"), r"rpn.head.conv.\1"),
    (re.compile(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$"), None),  # numbered from 0 -> mask_fcn1
]

# torchvision's COCO_V1 categories: slot i is COCO category id i; "N/A" marks unused ids.
COCO_91_NAMES: tuple[str, ...] = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A",
    "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet",
    "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


def is_torchvision_state_dict(state: dict[str, Tensor]) -> bool:
    return any(k.startswith("roi_heads.box_predictor.") for k in state) and not any(k.startswith("preprocess.") for k in state)


def convert_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision Mask R-CNN state dict (2019 or current names) -> our key names."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = key
        for pattern, repl in _CURRENT_TO_2019:
            m = pattern.match(key)
            if m and repl is None:
                new = f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}"
            elif m:
                new = pattern.sub(repl, key)
        out[new] = value
    return out


def infer_config(state: dict[str, Tensor], bn_eps: float = 0.0) -> ModelConfig:
    """The ``ModelConfig`` of a torchvision-format state dict (already converted).

    ``bn_eps`` defaults to 0.0 because torchvision loads its published COCO weights that way.
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
    cfg.backbone.bn_eps = bn_eps
    cfg.masks = "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
    if slots == 91:
        cfg.class_names = tuple("" if n == "N/A" else n for n in COCO_91_NAMES[1:])
    return cfg
