"""Region Proposal Network (seed section 3.3): objectness and box correction for every anchor,
then proposal selection (seed 3.3.7).

Shape shorthand: B images, A anchors per cell, L levels, N_l = H_l * W_l * A anchors on level
l, C = 1 objectness logit per anchor ("sigmoid") or 2 ("softmax": non-object, object).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.box_coder import BoxCoder
from ..ops.boxes import clip_boxes, remove_small_boxes
from ..ops.nms import batched_nms
from ..structures import ImageBatch, Targets
from .anchors import AnchorGenerator
from .layout import Conv2d
from .losses import rpn_losses
from .matcher import label_anchors, sample_balanced


class RPNHead(nn.Module):
    """Shared 3x3 sliding-window conv(s) + ReLU, then 1x1 convs for objectness and box deltas.

    ``conv_depth`` 3x3 convs are named ``conv``, ``conv2``, ``conv3``...: the first keeps the
    2019 torchvision name, so one-conv checkpoints load as they are.
    """

    def __init__(self, channels: int, num_anchors: int, logits_per_anchor: int = 1, conv_depth: int = 1) -> None:
        super().__init__()
        if conv_depth < 1:
            raise ValueError(f"the RPN head needs at least one 3x3 conv, got conv_depth={conv_depth}")
        self.conv_names = ["conv"] + [f"conv{i}" for i in range(2, conv_depth + 1)]
        for name in self.conv_names:
            self.add_module(name, Conv2d(channels, channels, 3, padding=1, winograd=True))
        self.cls_logits = Conv2d(channels, num_anchors * logits_per_anchor, 1)
        self.bbox_pred = Conv2d(channels, num_anchors * 4, 1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: logits (B, A*C, H_l, W_l) and deltas (B, A*4, H_l, W_l)."""
        logits, deltas = [], []
        for f in features:
            t = f
            for name in self.conv_names:
                t = F.relu_(getattr(self, name)(t))  # in place: the conv's output is not needed again
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def flatten_level(x: Tensor, per_anchor: int) -> Tensor:
    """(B, A*K, H, W) -> (B, H*W*A, K), ordered like ``AnchorGenerator``'s anchors."""
    b, _, h, w = x.shape
    x = x.view(b, -1, per_anchor, h, w)  # (B, A, K, H, W)
    return x.permute(0, 3, 4, 1, 2).reshape(b, -1, per_anchor)  # (B, H*W*A, K)


class RegionProposalNetwork(nn.Module):
    """Anchors + head + proposal selection, with the RPN losses when targets are given.

    Args:
        anchor_generator, head: the components.
        pre_nms_top_n, post_nms_top_n: dicts with "train" and "test" counts (per level before
            NMS, per image after).
        nms_thresh, score_thresh, min_size: proposal filtering.
        fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction: anchor labels and
            balanced sampling for the loss (seed 3.3.6).
        objectness: "sigmoid" or "softmax".
        rank_by: "prob" ranks proposals for NMS by their sigmoid probability (torchvision),
            "logit" by the raw logit (Detectron2). They differ where float32 probabilities
            saturate and tie (every logit above ~17 is 1.0).
        exclude_border_anchors: border-crossing anchors are neutral in the loss.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
        min_size: float = 1e-3,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        objectness: str = "sigmoid",
        exclude_border_anchors: bool = False,
        smooth_l1_beta: float = 1.0 / 9,
        rank_by: str = "prob",
    ) -> None:
        super().__init__()
        if objectness not in ("sigmoid", "softmax"):
            raise ValueError(f"objectness must be 'sigmoid' or 'softmax', got {objectness!r}")
        if rank_by not in ("prob", "logit"):
            raise ValueError(f"rank_by must be 'prob' or 'logit', got {rank_by!r}")
        self.rank_by = rank_by
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.objectness = objectness
        self.exclude_border_anchors = exclude_border_anchors
        self.smooth_l1_beta = smooth_l1_beta

    def forward(
        self, images: ImageBatch, features: list[Tensor], targets: list[Targets] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Returns one (P_i, 4) proposal tensor per image (resized frame, best first, no
        gradient) and the losses ``loss_objectness`` and ``loss_rpn_box_reg`` when targets are
        given."""
        logits, deltas = self.head(features)
        per_anchor = 1 if self.objectness == "sigmoid" else 2
        anchors = self.anchor_generator(
            tuple(images.tensors.shape[-2:]), [tuple(f.shape[-2:]) for f in features], features[0].device
        )
        logits_flat = torch.cat([flatten_level(x, per_anchor) for x in logits], 1)  # (B, sum N_l, C)
        deltas_flat = torch.cat([flatten_level(x, 4) for x in deltas], 1)  # (B, sum N_l, 4)
        proposals = self.select_proposals(anchors, logits_flat.detach(), deltas_flat.detach(), images.image_sizes)
        losses = {}
        if targets is not None:
            losses = self.losses(torch.cat(anchors), logits_flat, deltas_flat, targets, images.image_sizes)
        return proposals, losses

    def _object_logit(self, logits: Tensor) -> Tensor:
        """(..., C) -> (...) log-odds that the anchor holds an object."""
        return logits[..., 0] if self.objectness == "sigmoid" else logits[..., 1] - logits[..., 0]

    def select_proposals(
        self, anchors: list[Tensor], logits: Tensor, deltas: Tensor, image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """Seed 3.3.7: top-N anchors per level, decode, clip, drop small, NMS per level, top-N.

        Only the pre-NMS top-N anchors are decoded, which gives the same boxes as decoding
        all of them and is about 100x less work on the finest level.
        """
        mode = "train" if self.training else "test"
        scores = self._object_logit(logits)  # (B, sum N_l)
        idx, levels, start = [], [], 0
        for lvl, a in enumerate(anchors):
            n = a.shape[0]
            # Traced for ONNX export, n is a 0-dim tensor: Python's min would freeze the example
            # image's count into the graph (P6 of a small image has fewer anchors than the cap).
            k = min(self.pre_nms_top_n[mode], n) if isinstance(n, int) else n.clamp(max=self.pre_nms_top_n[mode])
            top = scores[:, start : start + n].topk(k, dim=1).indices + start  # (B, k)
            idx.append(top)
            levels.append(torch.full_like(top[0], lvl))
            start += n
        idx_all = torch.cat(idx, 1)  # (B, K)
        level_all = torch.cat(levels)
        all_anchors = torch.cat(anchors)
        out = []
        for b, size in enumerate(image_sizes):
            sel = idx_all[b]
            # float32: under bf16/fp16 autocast the deltas are low precision, and boxes rounded
            # to bf16 are off by up to 8 px at x >= 1024.
            boxes = self.box_coder.decode(deltas[b, sel].float(), all_anchors[sel])[:, 0]  # (K, 4)
            logit = scores[b, sel].float()
            prob = torch.sigmoid(logit)
            boxes = clip_boxes(boxes, size)
            if self.min_size > 0:
                keep = remove_small_boxes(boxes, self.min_size)
            else:  # Detectron2 drops only empty boxes
                keep = torch.where((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[0]
            boxes, prob, logit, lvl = boxes[keep], prob[keep], logit[keep], level_all[keep]
            keep = torch.where(prob >= self.score_thresh)[0]
            boxes, prob, logit, lvl = boxes[keep], prob[keep], logit[keep], lvl[keep]
            rank = prob if self.rank_by == "prob" else logit
            keep = batched_nms(boxes, rank, lvl, self.nms_thresh)[: self.post_nms_top_n[mode]]
            out.append(boxes[keep])
        return out

    def losses(
        self,
        anchors: Tensor,
        logits: Tensor,
        deltas: Tensor,
        targets: list[Targets],
        image_sizes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        labels, reg_targets, pos, neg = [], [], [], []
        offset = 0
        for t, size in zip(targets, image_sizes):
            lab, matched = label_anchors(
                anchors, t.boxes, size, self.fg_iou_thresh, self.bg_iou_thresh, self.exclude_border_anchors
            )
            p, n = sample_balanced(lab, self.batch_size_per_image, self.positive_fraction)
            labels.append(lab)
            reg_targets.append(self.box_coder.encode(matched, anchors))
            pos.append(p + offset)
            neg.append(n + offset)
            offset += anchors.shape[0]
        loss_obj, loss_box = rpn_losses(
            logits.reshape(-1, logits.shape[-1]).squeeze(-1) if self.objectness == "sigmoid" else logits.reshape(-1, 2),
            deltas.reshape(-1, 4),
            torch.cat(labels),
            torch.cat(reg_targets),
            torch.cat(pos),
            torch.cat(neg),
            mode=self.objectness,
            beta=self.smooth_l1_beta,
        )
        return {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_box}
