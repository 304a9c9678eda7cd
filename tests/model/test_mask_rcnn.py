"""The assembled model: mixed precision keeps boxes exact, input checks, degenerate batches."""

from __future__ import annotations

import pytest
import torch

import maskrcnn
from maskrcnn.config import ModelConfig, apply_overrides
from maskrcnn.model.losses import fast_rcnn_losses
from maskrcnn.model.matcher import sample_rois
from maskrcnn.ops.roi_align import roi_align
from maskrcnn.structures import Targets

from ..helpers import TINY


def tiny_train_model() -> maskrcnn.MaskRCNN:
    torch.manual_seed(0)
    return maskrcnn.build_model(apply_overrides(ModelConfig(), TINY)).train()


def targets_for(h: int, w: int) -> Targets:
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, 20:60, 30:70] = 1
    return Targets(torch.tensor([[30.3, 20.7, 70.1, 60.2]]), torch.tensor([2]), masks)


def test_bf16_autocast_keeps_proposals_and_gt_rois_in_float32():
    # In bf16, 661.1 would become 660.0: a ground-truth RoI must survive exactly.
    gt = torch.tensor([[333.3, 101.7, 661.1, 301.2]])
    proposals = torch.tensor([[300.0, 100.0, 650.0, 300.0]]).bfloat16()
    rois, labels, matched = sample_rois(proposals, gt, torch.tensor([1]), batch_size=8)
    assert rois.dtype == torch.float32
    assert (rois == gt).all(dim=1).any()

    model = tiny_train_model()
    image = torch.rand(3, 80, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch, t = model.preprocess([image], [targets_for(80, 100)])
        feats = model.backbone(batch.tensors)
        props, rpn_losses = model.rpn(batch, feats, t)
        assert props[0].dtype == torch.float32
        losses = model([image], [targets_for(80, 100)]).losses
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_roi_align_on_bf16_features_samples_at_float32_positions():
    torch.manual_seed(0)
    feats = torch.randn(1, 4, 40, 40)
    rois = torch.tensor([[0, 3.3, 5.7, 33.1, 29.9]])
    ref = roi_align(feats, rois, 7, 1.0, 2)
    low = roi_align(feats.bfloat16(), rois, 7, 1.0, 2)
    assert low.dtype == torch.bfloat16
    # Only the output's own bf16 rounding remains (about 3 significant digits).
    torch.testing.assert_close(low.float(), ref, atol=0.02, rtol=0.01)


def test_box_only_targets_on_a_mask_model_fail_clearly():
    model = tiny_train_model()
    t = targets_for(80, 100)
    t.masks = None
    with pytest.raises(ValueError, match=r"targets\[0\] has no masks"):
        model([torch.rand(3, 80, 100)], [t])


def test_fast_rcnn_loss_with_no_rois_is_zero_not_nan():
    logits = torch.zeros(0, 4, requires_grad=True)
    deltas = torch.zeros(0, 16, requires_grad=True)
    cls, box = fast_rcnn_losses(logits, deltas, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert cls.item() == 0.0 and box.item() == 0.0
    (cls + box).backward()


def test_resizing_never_gives_an_empty_side():
    from maskrcnn.model.transform import Preprocessor

    pre = Preprocessor(min_size=(800,), max_size=1333).eval()
    # torchvision's sizes: floor(side * scale), scale = min(800 / short, 1333 / long)
    batch, _ = pre([torch.rand(3, 576, 768)])
    assert batch.image_sizes == [(800, 1066)]
    # 5000 x 1: scale min(800, 0.2666) makes the 1-pixel side 0.27 -> floor 0; kept at 1 pixel
    batch, _ = pre([torch.rand(3, 1, 5000), torch.rand(3, 5000, 1)])
    assert batch.image_sizes == [(1, 1333), (1333, 1)]
    with pytest.raises(ValueError, match=r"image 0: has no pixels \(size 0x7\)"):
        pre([torch.rand(3, 0, 7)])


def test_uint8_images_give_the_same_numbers_as_float_ones():
    from maskrcnn.data.images import to_tensor
    from maskrcnn.model.transform import Preprocessor

    pre = Preprocessor(min_size=(64,), max_size=100).eval()
    rgb = torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8)
    a, _ = pre([to_tensor(rgb.numpy())])
    b, _ = pre([rgb.permute(2, 0, 1)])
    assert torch.equal(a.tensors, b.tensors)


def test_detectron2_preprocessing_by_hand():
    """Detectron2's input: sides rounded half up (torchvision floors), PIL-resized uint8 pixels,
    channels reversed to BGR, normalised in 0..255 units."""
    from maskrcnn.model.transform import Preprocessor, detectron2_resized_size, resize_scale, resized_size

    assert detectron2_resized_size(576, 768, 800, 1333) == (800, 1067)
    assert resized_size(576, 768, resize_scale(576, 768, 800, 1333)) == (800, 1066)
    assert detectron2_resized_size(768, 509, 800, 1333) == (1207, 800)
    assert detectron2_resized_size(100, 1000, 800, 1333) == (133, 1333)  # long side capped
    pre = Preprocessor(
        (8,), 1333, (1.0, 2.0, 3.0), (2.0, 2.0, 2.0), 32, bgr=True, pixel_scale=255.0, resize="detectron2"
    ).eval()
    rgb = torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 6).contiguous()
    for image in (rgb, rgb.float() / 255):  # uint8, or floats that are k / 255
        batch, _ = pre([image])
        assert batch.image_sizes == [(8, 12)]
        x = batch.tensors[0, :, :8, :12]
        torch.testing.assert_close(
            x, torch.tensor([(30 - 1) / 2, (20 - 2) / 2, (10 - 3) / 2]).view(3, 1, 1).expand_as(x)
        )
    with pytest.raises(ValueError, match="resize"):
        Preprocessor(resize="cv2")


def test_rpn_ranks_by_logit_where_probabilities_saturate():
    """One anchor on each of two levels with logits 20 and 30: both sigmoids are 1.0 in float32.
    Ranked by probability the tie keeps level order (the finer level's box first); ranked by
    logit, as Detectron2 ranks them, the logit-30 box comes first."""
    from maskrcnn.model.anchors import AnchorGenerator
    from maskrcnn.model.rpn import RegionProposalNetwork, RPNHead

    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 10.0, 11.0]])]
    logits = torch.tensor([[[20.0], [30.0]]])  # (B, anchors over both levels, 1)
    deltas = torch.zeros(1, 2, 4)
    assert torch.sigmoid(logits).eq(1.0).all()
    for rank_by, first in (("prob", 10.0), ("logit", 11.0)):
        rpn = RegionProposalNetwork(
            AnchorGenerator(),
            RPNHead(4, 3),
            {"train": 10, "test": 10},
            {"train": 10, "test": 10},
            min_size=0.0,
            rank_by=rank_by,
        ).eval()
        (props,) = rpn.select_proposals(anchors, logits, deltas, [(20, 20)])
        assert props.shape == (2, 4) and props[0, 3] == first, rank_by


def test_detectron2_drops_empty_detections_after_the_top_k():
    """A proposal right of the image decodes to a box clipped to zero width. torchvision's rule
    (box_min_size 1e-2) drops it before NMS, so the other detection fills the one slot;
    Detectron2's (0) keeps it through NMS and the top-k, then drops it (detector_postprocess)."""
    from maskrcnn.model.roi_heads import BoxHead, BoxPredictor, RoIHeads

    proposals = [torch.tensor([[30.0, 2.0, 40.0, 8.0], [2.0, 2.0, 8.0, 8.0]])]  # image 10 x 20
    logits = torch.tensor([[0.0, 5.0], [0.0, 3.0]])  # (R, K+1): background, one class
    deltas = torch.zeros(2, 8)
    counts = {}
    for min_size in (1e-2, 0.0):
        heads = RoIHeads(BoxHead(4, 4), BoxPredictor(4, 2), None, None, detections_per_img=1, box_min_size=min_size)
        (det,) = heads.postprocess(logits, deltas, proposals, [(10, 20)])
        counts[min_size] = len(det)
    assert counts == {1e-2: 1, 0.0: 0}


@pytest.mark.parametrize("layout", ["ours", "detectron2"])
def test_pooling_scales_do_not_depend_on_the_image_height(layout):
    """Level l is pooled at 1 / 2**(l+2) whatever the image. torchvision's MultiScaleRoIAlign infers
    its scales from the heights once, at its first call, and keeps them (``if self.scales is
    None``): from any first image over 74 px high they are 1/4..1/32. Inferring them per batch, as
    we did, pooled a 30:1 image (44 x 1333, padded 64 x 1344) at 1/2 on P2 and 1/16 on P5: the parity
    sweep's 30:1 case then lost all 100 of torchvision's (and Detectron2's) detections."""
    cfg = apply_overrides(ModelConfig(), TINY)
    if layout == "detectron2":
        cfg.roi_heads.aligned, cfg.roi_heads.sampling_ratio, cfg.roi_heads.level_mapper = True, 0, "detectron2"
    model = maskrcnn.build_model(cfg).eval()
    torch.manual_seed(0)
    channels = cfg.backbone.fpn_channels
    feats = [torch.randn(1, channels, 64 // s, 1344 // s) for s in (4, 8, 16, 32)]
    boxes = [torch.tensor([[10.0, 5.0, 60.0, 40.0], [100.0, 0.0, 700.0, 44.0], [0.0, 0.0, 1300.0, 44.0]])]
    with torch.no_grad():
        thin = model.roi_heads.pool(feats, boxes, [(44, 1333)], 7)
        tall = model.roi_heads.pool(feats, boxes, [(800, 1333)], 7)  # the same maps; an ordinary height
    torch.testing.assert_close(thin, tall, rtol=0, atol=0)


def test_mask_predictor_for_own_classes_equals_the_all_class_output_selected():
    """``predict`` computes each RoI's own class logits only: they must be the all-class
    output's rows of those classes (float64 reference), for any labels and RoI count."""
    from maskrcnn.model.mask_head import MaskPredictor, select_class_masks

    gen = torch.Generator().manual_seed(3)
    predictor = MaskPredictor(16, 16, 7).double().eval()
    for p in predictor.parameters():
        torch.nn.init.normal_(p, generator=gen)
    for rois in (0, 1, 5):
        x = torch.randn(rois, 16, 14, 14, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 7, (rois,), generator=gen)
        with torch.no_grad():
            want = select_class_masks(predictor(x), labels)
            got = predictor(x, labels)
        assert got.shape == (rois, 28, 28)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
