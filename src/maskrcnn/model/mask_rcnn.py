"""Mask R-CNN (seed section 3.1.2): backbone + FPN, region proposals, frontend heads.

The contract of ``MaskRCNN.forward``:

    images:  list of B tensors (3, H_i, W_i), float RGB in 0..1 (or uint8 in 0..255), any sizes.
    targets: optional list of B ``Targets`` in each image's pixel frame (boxes x1 y1 x2 y2,
             labels 1..num_classes, masks (N, H_i, W_i) uint8).
    returns: ``ModelOutput`` with
             .losses      {loss_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg,
                           loss_mask} whenever targets are given (training or eval mode), and
             .detections  in eval mode: per image ``Detections`` in the original frame,
                          boxes (N, 4), scores (N,), labels (N,) int64, masks (N, M, M)
                          float32 probabilities over each box, not yet pasted into the image
                          (``Result.from_detections`` pastes and encodes them box by box;
                          ``ops.paste_masks(masks, boxes, (H_i, W_i)) > 0.5`` gives full frames).

The return type never depends on ``self.training``; only which fields are filled does.
``forward`` is ``preprocess`` -> ``detect`` (the network on the resized, padded batch:
detections in the resized frame, the graph that ``maskrcnn.weights.export`` writes to ONNX) ->
``to_original_frame``. Thresholds are arguments, never module state set around a call.
``model.predict`` (images in any form in, ``Result`` objects out) is ``maskrcnn.inference.predictor.predict``,
bound to the class by the package's ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..structures import Detections, ImageBatch, ModelOutput, Targets
from .backbone import ResNetBody
from .fpn import FPN
from .layout import conv_layout
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork
from .transform import Preprocessor, to_original_frame


class Backbone(nn.Module):
    """ResNet body + FPN: image batch (B, 3, Hp, Wp) -> [P2, P3, P4, P5, P6]."""

    def __init__(self, body: ResNetBody, fpn: FPN) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = fpn.out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.fpn(self.body(conv_layout(x)))  # NHWC where oneDNN is faster with it


class MaskRCNN(nn.Module):
    def __init__(
        self,
        preprocess: Preprocessor,
        backbone: Backbone,
        rpn: RegionProposalNetwork,
        roi_heads: RoIHeads,
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.config = config or ModelConfig()

    def forward(
        self,
        images: list[Tensor],
        targets: list[Targets] | None = None,
        propose: Callable[[ImageBatch], list[Tensor]] | None = None,
        score_thresh: float | None = None,
    ) -> ModelOutput:
        """See the module docstring. Masks are returned per box, as probabilities, and
        thresholded when pasted (``Result.from_detections(mask_thresh=)``). ``propose``: an
        outside proposal source that replaces this
        model's RPN (and its losses), as the alternating schedule's frontend stage uses.
        ``score_thresh``: detections need a class probability above this (default the
        config's ``roi_heads.score_thresh``)."""
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        if targets is not None and self.roi_heads.has_mask:
            for i, t in enumerate(targets):
                if t.masks is None:
                    raise ValueError(
                        f"targets[{i}] has no masks, but this model has a mask head (build it with masks=False)"
                    )
        if self.training and targets is None:
            raise ValueError("training mode needs targets; call model.eval() for detections")
        batch, targets = self.preprocess(images, targets)
        detections, losses = self.detect(batch, targets, propose, score_thresh)
        if detections is not None:
            detections = to_original_frame(detections, batch)
        return ModelOutput(losses=losses, detections=detections)

    def detect(
        self,
        batch: ImageBatch,
        targets: list[Targets] | None = None,
        propose: Callable[[ImageBatch], list[Tensor]] | None = None,
        score_thresh: float | Tensor | None = None,
    ) -> tuple[list[Detections] | None, dict[str, Tensor]]:
        """The network on a preprocessed batch: detections (eval mode) in the *resized* frame,
        one ``Detections`` per image, and the losses when ``targets`` (resized frame) are given.
        Arguments as for ``forward``; ``score_thresh`` may be a 0-dim tensor (an ONNX input)."""
        features = self.backbone(batch.tensors)
        if propose is None:
            proposals, rpn_losses = self.rpn(batch, features, targets)
        else:
            proposals, rpn_losses = propose(batch), {}
        # P6 only serves the RPN's largest anchors; the heads pool from P2..P5, channels-last
        # (RoIAlign gathers rows of (H*W, C) tables; NNPACK gave the FPN's outputs in NCHW).
        pooled = [conv_layout(f) for f in features[:-1]]
        detections, head_losses = self.roi_heads(pooled, proposals, batch.image_sizes, targets, score_thresh)
        return detections, {**rpn_losses, **head_losses}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
