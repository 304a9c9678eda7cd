"""Frontend (seed section 3.5): RoI pooling of proposals, then three decoupled heads —
classification, class-specific box regression and per-class masks — with their losses and
the detection postprocessing (score threshold, per-class NMS, top detections).

Shape shorthand: R RoIs over the batch, F feature channels, K foreground classes (K+1 slots,
slot 0 = background), P = pooled size (7 boxes, 14 masks), M = 28 mask size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.box_coder import BoxCoder
from ..ops.boxes import clip_boxes, remove_small_boxes
from ..ops.nms import batched_nms
from ..ops.poolers import multiscale_roi_align
from ..structures import Detections, Targets
from .layout import Conv2d, conv_layout
from .losses import fast_rcnn_losses, mask_loss, mask_targets
from .mask_head import MaskHead, MaskPredictor
from .matcher import sample_rois


class BoxHead(nn.Module):
    """Two fully connected layers ("fc6", "fc7") on flattened RoI features."""

    def __init__(self, in_features: int, representation_size: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_features = representation_size

    def forward(self, x: Tensor) -> Tensor:
        """(R, F, P, P) -> (R, representation_size)."""
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class ConvFCBoxHead(nn.Module):
    """3x3 convs (each with an optional BatchNorm, then ReLU) and one FC layer: torchvision v2's
    "4conv1fc" head (Wu & He 2018's choice for heads with BatchNorm).

    Layers are ``conv1..convN``, ``norm1..normN`` (with ``batchnorm``) and ``fc``. A conv
    followed by BatchNorm has no bias: the norm's shift replaces it.
    """

    def __init__(
        self,
        in_channels: int,
        roi_size: int,
        conv_channels: tuple[int, ...] = (256, 256, 256, 256),
        representation_size: int = 1024,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.num_convs = len(conv_channels)
        for i, out in enumerate(conv_channels, 1):
            conv = Conv2d(in_channels, out, 3, padding=1, bias=not batchnorm)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            self.add_module(f"conv{i}", conv)
            if batchnorm:
                self.add_module(f"norm{i}", nn.BatchNorm2d(out))
            in_channels = out
        self.batchnorm = batchnorm
        self.fc = nn.Linear(in_channels * roi_size**2, representation_size)
        self.out_features = representation_size

    def forward(self, x: Tensor) -> Tensor:
        """(R, F, P, P) -> (R, representation_size)."""
        x = conv_layout(x)  # as the mask head: oneDNN's fast layout
        for i in range(1, self.num_convs + 1):
            x = getattr(self, f"conv{i}")(x)
            if self.batchnorm:
                x = getattr(self, f"norm{i}")(x)
            x = F.relu(x)
        return F.relu(self.fc(x.flatten(1)))  # flatten in (C, P, P) order whatever the memory layout


class BoxPredictor(nn.Module):
    """Class logits over K+1 slots (softmax, "no object" included) and per-class box deltas."""

    def __init__(self, in_features: int, num_slots: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_slots)
        self.bbox_pred = nn.Linear(in_features, num_slots * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(R, D) -> class logits (R, K+1), box deltas (R, (K+1)*4)."""
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Box and mask branches. See ``maskrcnn.config.RoIHeadsConfig`` for the arguments."""

    def __init__(
        self,
        box_head: BoxHead | ConvFCBoxHead,
        box_predictor: BoxPredictor,
        mask_head: MaskHead | None,
        mask_predictor: MaskPredictor | None,
        box_roi_size: int = 7,
        mask_roi_size: int = 14,
        sampling_ratio: int = 2,
        aligned: bool = False,
        level_mapper: str = "torchvision",
        pooler: str = "align",
        pooler_strides: tuple[int, ...] = (4, 8, 16, 32),
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        box_min_size: float = 1e-2,
    ) -> None:
        super().__init__()
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.box_roi_size = box_roi_size
        self.mask_roi_size = mask_roi_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.level_mapper = level_mapper
        self.pooler = pooler
        self.pooler_strides = tuple(pooler_strides)
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.box_coder = BoxCoder(box_coder_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.box_min_size = box_min_size

    @property
    def has_mask(self) -> bool:
        return self.mask_head is not None

    def pool(
        self, features: list[Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]], size: int
    ) -> Tensor:
        """RoI features (R, F, size, size) from P2..P5, each box on its FPN level."""
        return multiscale_roi_align(
            features,
            boxes,
            image_sizes,
            size,
            self.sampling_ratio,
            aligned=self.aligned,
            pool=self.pooler,
            level_mapper=self.level_mapper,
            strides=self.pooler_strides,
        )

    def box_outputs(
        self, features: list[Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Class logits (R, K+1) and box deltas (R, (K+1)*4) for RoIs ``boxes``."""
        x = self.box_head(self.pool(features, boxes, image_sizes, self.box_roi_size))
        return self.box_predictor(x)

    def mask_logits(
        self,
        features: list[Tensor],
        boxes: list[Tensor],
        image_sizes: list[tuple[int, int]],
        labels: Tensor | None = None,
    ) -> Tensor:
        """Mask logits (R, K+1, M, M) for RoIs ``boxes``; given ``labels`` (R,), only each RoI's
        own class, (R, M, M)."""
        assert self.mask_head is not None and self.mask_predictor is not None
        x = self.pool(features, boxes, image_sizes, self.mask_roi_size)
        x = self.mask_head(conv_layout(x, winograd=True))  # the layout its convolutions run fastest in
        return self.mask_predictor(x, labels)

    def forward(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[Targets] | None = None,
        score_thresh: float | Tensor | None = None,
    ) -> tuple[list[Detections] | None, dict[str, Tensor]]:
        """Args:
            features: P2..P5, each (B, F, H_l, W_l).
            proposals: per image (P_i, 4) boxes in the resized frame.
            image_sizes: per image (h, w) of the resized image.
            targets: ground truth in the resized frame; losses are computed when given.
            score_thresh: detections need a class probability above this (default: the
                module's ``score_thresh``); a 0-dim tensor in an exported graph.
        Returns:
            detections (eval mode only): per image, boxes in the resized frame and masks as
            (N, M, M) probabilities of the detected class; losses (with targets only).
        """
        losses = self.losses(features, proposals, image_sizes, targets) if targets is not None else {}
        detections = None if self.training else self.detect(features, proposals, image_sizes, score_thresh)
        return detections, losses

    # ------------------------------------------------------------------ inference
    def detect(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        score_thresh: float | Tensor | None = None,
    ) -> list[Detections]:
        class_logits, box_deltas = self.box_outputs(features, proposals, image_sizes)
        detections = self.postprocess(class_logits, box_deltas, proposals, image_sizes, score_thresh)
        if self.has_mask:
            labels = torch.cat([d.labels for d in detections])
            logits = self.mask_logits(features, [d.boxes for d in detections], image_sizes, labels)  # (R, M, M)
            probs = logits.sigmoid()
            # shape[0], not len(): traced for export, a count must stay a tensor, not an int.
            for d, p in zip(detections, probs.split([d.boxes.shape[0] for d in detections])):
                d.masks = p
        return detections

    def postprocess(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        score_thresh: float | Tensor | None = None,
    ) -> list[Detections]:
        """Decode per-class boxes, drop background and scores not above ``score_thresh`` (default
        the module's), per-class NMS, keep the best."""
        score_thresh = self.score_thresh if score_thresh is None else score_thresh
        num_slots = class_logits.shape[-1]
        # float32 whatever the autocast dtype: boxes and scores are outputs, not features.
        boxes_all = self.box_coder.decode(box_deltas.float(), torch.cat(proposals).float())  # (R, K+1, 4)
        scores_all = F.softmax(class_logits.float(), -1)  # (R, K+1)
        counts = [p.shape[0] for p in proposals]
        out = []
        for boxes, scores, size in zip(boxes_all.split(counts), scores_all.split(counts), image_sizes):
            boxes = clip_boxes(boxes, size)
            labels = torch.arange(num_slots, device=scores.device).expand_as(scores)
            # Drop the background slot, then one candidate per (RoI, class).
            boxes = boxes[:, 1:].reshape(-1, 4)  # (R_i*K, 4)
            scores, labels = scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            if self.box_min_size > 0:  # Detectron2 (0) keeps every box
                keep = remove_small_boxes(boxes, self.box_min_size)
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            if self.box_min_size <= 0:  # Detectron2 drops empty boxes after the top-k, not before
                keep = keep[(boxes[keep, 2] > boxes[keep, 0]) & (boxes[keep, 3] > boxes[keep, 1])]
            out.append(Detections(boxes=boxes[keep], scores=scores[keep], labels=labels[keep]))
        return out

    # ------------------------------------------------------------------ training
    def losses(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[Targets],
    ) -> dict[str, Tensor]:
        rois, labels, matched = [], [], []
        for props, t in zip(proposals, targets):
            r, lab, m = sample_rois(
                props.detach(),
                t.boxes,
                t.labels,
                self.fg_iou_thresh,
                self.bg_iou_thresh,
                self.batch_size_per_image,
                self.positive_fraction,
            )
            rois.append(r)
            labels.append(lab)
            matched.append(m)
        class_logits, box_deltas = self.box_outputs(features, rois, image_sizes)
        reg_targets = torch.cat(
            [
                self.box_coder.encode(t.boxes[m] if len(t) else torch.zeros_like(r), r)
                for t, r, m in zip(targets, rois, matched)
            ]
        )
        loss_cls, loss_box = fast_rcnn_losses(class_logits, box_deltas, torch.cat(labels), reg_targets)
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        if self.has_mask:
            pos = [torch.where(lab > 0)[0] for lab in labels]
            pos_rois = [r[p] for r, p in zip(rois, pos)]
            logits = self.mask_logits(features, pos_rois, image_sizes)  # (R+, K+1, M, M)
            m_size = logits.shape[-1]
            gt = [
                mask_targets(t.masks, r, m[p], m_size) if len(p) else logits.new_zeros((0, m_size, m_size))
                for t, r, m, p in zip(targets, pos_rois, matched, pos)
            ]
            pos_labels = torch.cat([lab[p] for lab, p in zip(labels, pos)])
            losses["loss_mask"] = mask_loss(logits, pos_labels, torch.cat(gt))
        return losses
