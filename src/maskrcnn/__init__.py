"""Mask R-CNN instance segmentation in pure PyTorch.

import maskrcnn
model = maskrcnn.load("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")   # or our own checkpoint
result = model.predict("photo.jpg")
result.boxes, result.scores, result.labels, result.masks, result.class_names
result.save("overlay.png")
predictor = maskrcnn.Predictor(model, maskrcnn.PredictOptions(score_thresh=0.5, tile=1024))
results = predictor(["a.jpg", "b.png"])   # the same options for every call
maskrcnn.load("model.onnx").predict("photo.jpg")   # the same, on ONNX Runtime (maskrcnn export)
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _moved
from .config import ModelConfig
from .inference.options import PredictOptions
from .inference.predictor import Predictor, predict
from .inference.results import Result
from .model.build import build_model
from .model.mask_rcnn import MaskRCNN
from .structures import Detections, ImageBatch, ModelOutput, Targets
from .weights.checkpoint import CheckpointError, load, save_checkpoint
from .weights.onnx_model import OnnxModel

_moved.install()  # maskrcnn.checkpoint, maskrcnn.engine.train, ...: the old paths, with a warning

# ``model.predict(images)``: the user surface of the model, bound here rather than defined in
# ``model/mask_rcnn.py`` so that the model package never imports the predictor above it.
MaskRCNN.predict = predict  # type: ignore[attr-defined]
OnnxModel.predict = predict  # type: ignore[attr-defined]  an exported model predicts the same way

__all__ = [
    "CheckpointError",
    "Detections",
    "ImageBatch",
    "MaskRCNN",
    "ModelConfig",
    "ModelOutput",
    "OnnxModel",
    "PredictOptions",
    "Predictor",
    "Result",
    "Targets",
    "build_model",
    "load",
    "save_checkpoint",
]
