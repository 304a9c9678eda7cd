"""Backbone pretraining as an object-crop classifier (seed section 4.2).

"A separate ConvNet model is set up with the convolutional backbone [...] and a fully connected
frontend", trained on "one-object images (ca. the size of later bounding boxes)" labelled with
their class, the "no object" class included. Here:

* inputs: every ground-truth box of the training set, grown by ``context`` on each side and
  resized to ``crop_size`` x ``crop_size``, labelled with its class 1..K; plus
  ``background_per_image`` random crops per image that overlap no object (IoU < 0.3), of the
  sizes of that image's objects, labelled 0 ("no object").
* model: the detector's ResNet body (with trainable BatchNorm: crop batches are large enough)
  + global average pooling + one linear layer with K+1 outputs; softmax cross-entropy.
* result: the trained body weights are copied into the detector's body.

Shape shorthand: N crops, S crop side, K foreground classes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..model.backbone import ResNetBody
from ..ops.boxes import box_iou
from .config import PretrainConfig

log = logging.getLogger(__name__)

BACKGROUND_MAX_IOU = 0.3  # a background crop overlaps every object less than this


class CropClassifier(nn.Module):
    """ResNet body -> global average pool of C5 -> linear: (B, 3, S, S) -> (B, K+1) logits."""

    def __init__(self, body: ResNetBody, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.fc = nn.Linear(body.out_channels[-1], num_classes + 1)

    def forward(self, x: Tensor) -> Tensor:
        c5 = self.body(x)[-1]  # (B, C, S/32, S/32)
        return self.fc(c5.mean(dim=(2, 3)))  # (B, K+1)


def _crop(image: Tensor, box: Tensor, size: int) -> Tensor:
    """(3, H, W) float image, box (4,) x1 y1 x2 y2 -> (3, size, size) float crop."""
    h, w = image.shape[-2:]
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, y1 = max(0, math.floor(x1)), max(0, math.floor(y1))
    x2, y2 = min(w, max(x1 + 1, math.ceil(x2))), min(h, max(y1 + 1, math.ceil(y2)))
    patch = image[None, :, y1:y2, x1:x2]  # (1, 3, h', w')
    return F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def _grow(boxes: Tensor, context: float, h: int, w: int) -> Tensor:
    """Boxes (N, 4) grown by ``context`` of their width/height on each side, clipped."""
    wh = (boxes[:, 2:] - boxes[:, :2]) * context  # (N, 2)
    grown = torch.cat([boxes[:, :2] - wh, boxes[:, 2:] + wh], 1)
    return torch.stack(
        [grown[:, 0].clamp(0, w), grown[:, 1].clamp(0, h), grown[:, 2].clamp(0, w), grown[:, 3].clamp(0, h)], 1
    )


def _background_box(gt: Tensor, h: int, w: int, g: torch.Generator, tries: int = 10) -> Tensor | None:
    """A random box the size of one of ``gt`` (or 1/4 of the image without objects) that
    overlaps no object by ``BACKGROUND_MAX_IOU`` or more; None if ``tries`` draws all do."""
    for _ in range(tries):
        if len(gt):
            k = int(torch.randint(len(gt), (), generator=g))
            bw, bh = float(gt[k, 2] - gt[k, 0]), float(gt[k, 3] - gt[k, 1])
        else:
            bw, bh = w / 4, h / 4
        bw, bh = min(max(bw, 4.0), w), min(max(bh, 4.0), h)
        x1 = float(torch.rand((), generator=g)) * (w - bw)
        y1 = float(torch.rand((), generator=g)) * (h - bh)
        box = torch.tensor([x1, y1, x1 + bw, y1 + bh])
        if not len(gt) or float(box_iou(box[None], gt).max()) < BACKGROUND_MAX_IOU:
            return box
    return None


def extract_crops(
    dataset: Dataset, cfg: PretrainConfig, generator: torch.Generator, progress: bool = False
) -> tuple[Tensor, Tensor]:
    """Object and background crops of every image of ``dataset`` (items ``(image, targets, info)``).

    Returns:
        crops: (N, 3, S, S) uint8 RGB.
        labels: (N,) int64, 0 for background, 1..K for objects.
    """
    crops: list[Tensor] = []
    labels: list[int] = []
    n_objects = 0
    for i in tqdm(range(len(dataset)), desc="crops", unit="img", disable=not progress, leave=False):
        image, targets, _ = dataset[i]
        h, w = image.shape[-2:]
        gt = targets.boxes.float()
        for box, label in zip(_grow(gt, cfg.context, h, w), targets.labels.tolist()):
            crops.append(_crop(image, box, cfg.crop_size))
            labels.append(label)
            n_objects += 1
        for _ in range(cfg.background_per_image):
            box = _background_box(gt, h, w, generator)
            if box is not None:
                crops.append(_crop(image, box, cfg.crop_size))
                labels.append(0)
    if not crops:
        raise ValueError(
            "pretraining found no crops: the training set has no objects and pretrain.background_per_image is 0"
        )
    x = (torch.stack(crops) * 255).round().clamp(0, 255).to(torch.uint8)  # (N, 3, S, S)
    y = torch.tensor(labels, dtype=torch.int64)
    objects = (y > 0).nonzero()[:, 0]
    if len(objects) > cfg.max_crops:  # keep every background crop, a random subset of objects
        keep = objects[torch.randperm(len(objects), generator=generator)[: cfg.max_crops]]
        keep = torch.cat([keep, (y == 0).nonzero()[:, 0]]).sort().values
        x, y = x[keep], y[keep]
    return x, y


def pretrain_body(
    body: ResNetBody,
    backbone_name: str,
    bn_eps: float,
    dataset: Dataset,
    num_classes: int,
    cfg: PretrainConfig,
    image_mean: tuple[float, float, float],
    image_std: tuple[float, float, float],
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``body`` as a crop classifier and copy the trained weights back into it.

    The classifier gets a copy of ``body`` with trainable BatchNorm and every stage trainable
    (the detector's ``trainable_layers`` applies to detection training only); ``body`` keeps its
    own norm layers and freezing, and receives the weights (BatchNorm statistics included).

    Args:
        body: the detector's body, updated in place.
        backbone_name, bn_eps: to build the classifier's body.
        dataset: training set without augmentation, items ``(image, targets, info)``.
        num_classes: K foreground classes.
        cfg: the ``pretrain`` section (epochs, crop size, lr, ...).
        image_mean, image_std: the detector's input normalisation, used here too.
        device: where to train.
        seed: seeds crop sampling and batch order.
        on_epoch: called with each epoch's summary ``{"pretrain_epoch", "pretrain_loss", "pretrain_acc"}``.

    Returns:
        The per-epoch summaries.
    """
    g = torch.Generator().manual_seed(seed)
    crops, labels = extract_crops(dataset, cfg, g, progress)
    log.info(
        "pretraining the %s body on %d crops (%d objects, %d background) for %d epochs",
        backbone_name,
        len(crops),
        int((labels > 0).sum()),
        int((labels == 0).sum()),
        cfg.epochs,
    )

    cls_body = ResNetBody(backbone_name, frozen_bn=False, bn_eps=bn_eps, trainable_layers=5)
    missing, unexpected = cls_body.load_state_dict(body.state_dict(), strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(
            f"body weights do not fit a {backbone_name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model = CropClassifier(cls_body, num_classes).to(device)
    mean = torch.tensor(image_mean, device=device)[None, :, None, None]
    std = torch.tensor(image_std, device=device)[None, :, None, None]

    steps_per_epoch = math.ceil(len(crops) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    history = []
    step = 0
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(crops), generator=g)
        loss_sum, correct = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"pretrain {epoch + 1}/{cfg.epochs}",
            unit="it",
            disable=not progress,
            leave=False,
        )
        for b in bar:
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x = crops[idx].to(device).float().div_(255.0)  # (B, 3, S, S)
            flip = torch.rand(len(idx), generator=g) < 0.5
            x[flip.to(device)] = x[flip.to(device)].flip(-1)
            y = labels[idx].to(device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            logits = model((x - mean) / std)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"pretraining loss is {loss.item()} at epoch {epoch + 1}, step {b + 1}; lower pretrain.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        summary = {
            "pretrain_epoch": epoch + 1,
            "pretrain_loss": loss_sum / len(crops),
            "pretrain_acc": correct / len(crops),
        }
        log.info(
            "pretrain epoch %d/%d: loss %.4f, accuracy %.3f",
            epoch + 1,
            cfg.epochs,
            summary["pretrain_loss"],
            summary["pretrain_acc"],
        )
        history.append(summary)
        if on_epoch is not None:
            on_epoch(summary)

    body.load_state_dict(cls_body.state_dict())  # a FrozenBatchNorm2d drops num_batches_tracked itself
    return history
