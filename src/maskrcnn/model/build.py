"""The one place that reads a ``ModelConfig`` and assembles the modules."""

from __future__ import annotations

from torch import nn

from ..config import ConfigError, ModelConfig, TransformConfig
from ..data.normalize import check_percentiles
from .anchors import AnchorGenerator
from .backbone import ResNetBody
from .fpn import FPN
from .mask_head import MaskHead, MaskPredictor
from .mask_rcnn import Backbone, MaskRCNN
from .roi_heads import BoxHead, BoxPredictor, ConvFCBoxHead, RoIHeads
from .rpn import RegionProposalNetwork, RPNHead
from .transform import Preprocessor


def build_model(config: ModelConfig | None = None) -> MaskRCNN:
    """Mask R-CNN with randomly initialised weights.

    Weights come from files in ``maskrcnn.weights.checkpoint``: ``load`` (a trained model),
    ``load_backbone_weights`` (``backbone.weights``, which training loads before its first step)
    and ``init_from_checkpoint``.
    """
    cfg = config or ModelConfig()
    b = cfg.backbone
    body = ResNetBody(
        b.name,
        frozen_bn=b.frozen_bn,
        bn_eps=b.bn_eps,
        trainable_layers=b.trainable_layers,
        stride_in_1x1=b.stride_in_1x1,
    )
    backbone = Backbone(body, FPN(body.out_channels, b.fpn_channels, _batchnorm("backbone.fpn_norm", b.fpn_norm)))

    a, r = cfg.anchors, cfg.rpn
    anchors = AnchorGenerator(a.sizes, a.aspect_ratios, a.round_cells, a.strides)
    head = RPNHead(b.fpn_channels, anchors.num_anchors_per_cell, 1 if r.objectness == "sigmoid" else 2, r.conv_depth)
    rpn = RegionProposalNetwork(
        anchors,
        head,
        pre_nms_top_n={"train": r.pre_nms_top_n_train, "test": r.pre_nms_top_n_test},
        post_nms_top_n={"train": r.post_nms_top_n_train, "test": r.post_nms_top_n_test},
        nms_thresh=r.nms_thresh,
        score_thresh=r.score_thresh,
        min_size=r.min_size,
        rank_by=r.rank_by,
        fg_iou_thresh=r.fg_iou_thresh,
        bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        objectness=r.objectness,
        exclude_border_anchors=r.exclude_border_anchors,
        smooth_l1_beta=r.smooth_l1_beta,
    )

    h = cfg.roi_heads
    slots = cfg.num_classes + 1  # slot 0 is background
    if h.box_head == "2fc":
        box_head: BoxHead | ConvFCBoxHead = BoxHead(b.fpn_channels * h.box_roi_size**2, h.representation_size)
    elif h.box_head == "4conv1fc":
        box_norm = _batchnorm("roi_heads.box_head_norm", h.box_head_norm)
        box_head = ConvFCBoxHead(b.fpn_channels, h.box_roi_size, (256,) * 4, h.representation_size, box_norm)
    else:
        raise ConfigError(f"roi_heads.box_head: {h.box_head!r} is not one of '2fc', '4conv1fc'")
    mask_head = mask_predictor = None
    if cfg.masks:
        mask_head = MaskHead(
            b.fpn_channels, h.mask_channels, batchnorm=_batchnorm("roi_heads.mask_head_norm", h.mask_head_norm)
        )
        mask_predictor = MaskPredictor(mask_head.out_channels, mask_head.out_channels, slots)
    roi_heads = RoIHeads(
        box_head,
        BoxPredictor(h.representation_size, slots),
        mask_head,
        mask_predictor,
        box_roi_size=h.box_roi_size,
        mask_roi_size=h.mask_roi_size,
        sampling_ratio=h.sampling_ratio,
        aligned=h.aligned,
        level_mapper=h.level_mapper,
        pooler=h.pooler,
        pooler_strides=h.pooler_strides,
        fg_iou_thresh=h.fg_iou_thresh,
        bg_iou_thresh=h.bg_iou_thresh,
        batch_size_per_image=h.batch_size_per_image,
        positive_fraction=h.positive_fraction,
        box_coder_weights=h.box_coder_weights,
        score_thresh=h.score_thresh,
        nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img,
        box_min_size=h.box_min_size,
    )
    model = MaskRCNN(build_preprocessor(cfg.transform), backbone, rpn, roi_heads, cfg)
    if b.sync_bn:  # every trainable BatchNorm (body, FPN, heads); FrozenBatchNorm2d is no _BatchNorm and stays
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _batchnorm(key: str, value: str) -> bool:
    """A ``*_norm`` config value as a flag: "batchnorm" -> True, "none" -> False."""
    if value not in ("none", "batchnorm"):
        raise ConfigError(f"{key}: {value!r} is not one of 'none', 'batchnorm'")
    return value == "batchnorm"


def build_preprocessor(t: TransformConfig) -> Preprocessor:
    """The image normalisation and resizing of a model (also what an ONNX model runs before its graph)."""
    try:  # applied when images are read (data.normalize); a bad value fails here, at build
        check_percentiles(t.percentiles)
    except ValueError as e:
        raise ConfigError(f"transform.{e}") from None
    return Preprocessor(
        t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.bgr, t.pixel_scale, t.resize
    )
