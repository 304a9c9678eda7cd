"""BatchNorm folding (``maskrcnn.model.fuse``): the folded network against the unfolded one in
float64, for every kind of pair the package builds; gradients through folded frozen norms
against float64; trainable norms' training and checkpoints as without folding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import maskrcnn
from maskrcnn.config import ModelConfig, apply_overrides
from maskrcnn.model.backbone import FrozenBatchNorm2d
from maskrcnn.model.fuse import FoldedConv2d, conv_norm_pairs, fold_batchnorm
from maskrcnn.weights.checkpoint import save_checkpoint

SMALL = [
    "num_classes=3",
    "backbone.name=resnet18",
    "backbone.fpn_channels=16",
    "transform.min_size=[64]",
    "transform.max_size=96",
    "roi_heads.representation_size=32",
    "roi_heads.mask_channels=[8,8]",
]
# torchvision v2's layout: BatchNorm in the FPN, a 4conv1fc box head with norms, mask head norms.
V2 = [
    "backbone.fpn_norm=batchnorm",
    "roi_heads.box_head=4conv1fc",
    "roi_heads.box_head_norm=batchnorm",
    "roi_heads.mask_head_norm=batchnorm",
]


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """BatchNorm statistics and affine terms far from the identity, as trained ones are."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            c = m.running_mean.shape[0]
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            with torch.no_grad():
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)


def build(overrides: list[str], frozen: bool = True) -> maskrcnn.MaskRCNN:
    torch.manual_seed(0)
    model = maskrcnn.build_model(apply_overrides(ModelConfig(), SMALL + overrides + [f"backbone.frozen_bn={frozen}"]))
    randomise_norms(model)
    return model.eval()


def features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return model.backbone(x)


def head_outputs(model: maskrcnn.MaskRCNN, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-head features and mask-head features for fixed boxes: the heads' folded pairs."""
    heads = model.roi_heads
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 2.0, 60.0, 30.0]], dtype=feats[0].dtype)]
    sizes = [(64, 96)]
    box_feats = heads.box_head(heads.pool(feats[:-1], boxes, sizes, heads.box_roi_size))
    mask_feats = heads.mask_head(heads.pool(feats[:-1], boxes, sizes, heads.mask_roi_size))
    return box_feats, mask_feats


def test_pairs_found_are_every_conv_norm_pair():
    """Hand count: ResNet-50 has 53 BatchNorms (stem 1, 16 bottlenecks x 3, 4 shortcuts), all after
    a conv; ResNet-18 20 (1 + 8 x 2 + 3). v2 adds 8 FPN norms, 4 box-head norms and one per mask-head layer (2 here)."""
    r50 = maskrcnn.build_model(apply_overrides(ModelConfig(), ["num_classes=3"]))
    assert len(conv_norm_pairs(r50)) == 53
    assert len(conv_norm_pairs(build([]))) == 20
    assert len(conv_norm_pairs(build(V2))) == 20  # trainable BatchNorms only when asked
    assert len(conv_norm_pairs(build([], frozen=False))) == 0
    assert len(conv_norm_pairs(build(V2), batchnorm=True)) == 20 + 8 + 4 + 2
    names = {n for n, _, _ in conv_norm_pairs(build(V2), batchnorm=True)}
    assert {
        "backbone.body.conv1",
        "backbone.body.layer2.0.downsample.0",
        "backbone.fpn.inner_blocks.3",
        "backbone.fpn.layer_blocks.0",
        "roi_heads.box_head.conv4",
        "roi_heads.mask_head.mask_fcn2",
    } <= names


@pytest.mark.parametrize(
    "overrides,frozen", [([], True), (V2, True), ([], False)], ids=["frozen", "v2", "trainable-bn"]
)
def test_folded_equals_unfolded_float64(overrides, frozen):
    """Backbone + FPN features and both heads' features, folded in float32, against the unfolded
    network in float64 (the exact value of both computations)."""
    model = build(overrides, frozen)
    reference = copy.deepcopy(model).double()
    assert fold_batchnorm(model, batchnorm=True) > 0
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = features(model, x)
        want = features(reference, x.double())
        got_heads = head_outputs(model, got)
        want_heads = head_outputs(reference, want)
    for g, w in zip([*got, *got_heads], [*want, *want_heads]):
        scale = w.abs().max().item()
        assert scale > 0
        assert (g.double() - w).abs().max().item() <= 1e-5 * scale
    # and every pair did run folded (each conv above is used): its folded weights are cached
    folded = [m for m in model.modules() if isinstance(m, FoldedConv2d)]
    assert folded and all(m._fold_cache is not None for m in folded)


def test_state_dict_is_unchanged_and_a_saved_checkpoint_holds_the_norms(tmp_path):
    model = build([])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model)
    with torch.no_grad():
        features(model, torch.rand(1, 3, 64, 64))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    save_checkpoint(tmp_path / "m.pth", model)
    loaded = maskrcnn.load(tmp_path / "m.pth", fold_bn=True)  # folds again
    saved = torch.load(tmp_path / "m.pth", weights_only=True)["model"]
    assert "backbone.body.bn1.running_var" in saved
    assert all(torch.equal(saved[k], before[k]) for k in before)
    assert {k for k in loaded.state_dict()} == set(before)


def test_frozen_norms_train_folded_with_the_gradients_of_the_unfolded_network():
    """Frozen BatchNorms fold in training too (the trainer folds): loss and every trainable
    parameter's gradient against the unfolded network in float64, and the trainable convs
    compute ``W s`` from the live weight (an optimiser step is seen without a cache miss)."""
    model = build([]).train()
    reference = copy.deepcopy(model).double()
    assert fold_batchnorm(model) == 20
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    got = sum(f.square().mean() for f in features(model, x))
    want = sum(f.square().mean() for f in features(reference, x.double()))
    got.backward()
    want.backward()
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()
    pairs = [(n, p, dict(reference.named_parameters())[n]) for n, p in model.named_parameters() if p.requires_grad]
    assert len(pairs) > 10
    for name, p, r in pairs:
        if r.grad is None:  # not on the path to the features (the heads)
            assert p.grad is None, name
            continue
        scale = r.grad.abs().max().item()
        assert (p.grad.double() - r.grad).abs().max().item() <= 1e-4 * scale, name
    convs = [m for m in model.modules() if isinstance(m, FoldedConv2d)]
    kinds = {m.weight.requires_grad: m._fold_cache[0][0] for m in convs}
    assert kinds == {True: "affine", False: "folded"}  # trainable: W s per call; frozen stem/layer1: cached

    conv = model.backbone.body.layer4[0].conv1
    before = conv._fold_cache
    with torch.no_grad():
        conv.weight.mul_(2.0)  # as an optimiser step changes it in place
    doubled = sum(f.square().mean() for f in features(model, x))
    assert conv._fold_cache is before  # the affine terms are kept ...
    assert not torch.isclose(doubled, got)  # ... and the new weight is used


def test_trainable_norms_in_training_and_eval_with_autograd_run_unfolded_bit_for_bit():
    """With trainable BatchNorms, train mode and eval mode with autograd on (a validation loss)
    compute exactly what the unfolded model computes, gradients and statistics included."""
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for train in (True, False):
        plain, folded = build([], frozen=False), build([], frozen=False)
        assert fold_batchnorm(folded, batchnorm=True) == 20
        outs = []
        for model in (plain, folded):
            model.train(train)
            loss = sum(f.square().mean() for f in features(model, x))
            loss.backward()
            outs.append(
                (
                    loss.detach(),
                    [p.grad.clone() for p in model.parameters() if p.grad is not None],
                    [b.clone() for b in model.buffers()],
                )
            )
        assert torch.equal(outs[0][0], outs[1][0])
        assert len(outs[0][1]) == len(outs[1][1]) > 0
        assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
        assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2]))  # running stats updated alike


def test_cache_follows_changed_weights():
    """An in-place change of a norm's statistics or a conv's weights (an optimiser step,
    load_state_dict) is seen by the next call."""
    model = build([])
    fold_batchnorm(model)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = features(model, x)[0]
        model.backbone.body.bn1.running_var.mul_(4.0)
        model.backbone.body.layer1[0].conv1.weight.mul_(-1.0)
        second = features(model, x)[0]
        reference = copy.deepcopy(model).double()
        for m in reference.modules():  # the reference runs unfolded
            if isinstance(m, FoldedConv2d):
                m.folds = lambda: False  # type: ignore[method-assign]
        want = features(reference, x.double())[0]
    assert not torch.allclose(first, second)
    assert (second.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_idempotent_and_copies_keep_their_own_pairs():
    model = build([])
    assert fold_batchnorm(model) == 20
    assert fold_batchnorm(model) == 0
    twin = copy.deepcopy(model)
    conv = twin.backbone.body.conv1
    assert conv._fold_norm is twin.backbone.body.bn1
    assert twin.backbone.body.bn1._fold_conv is conv
