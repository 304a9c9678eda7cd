"""Backbone bodies, FPN and anchors on tiny shapes, against hand-computed facts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskrcnn.model.anchors import AnchorGenerator, cell_anchors
from maskrcnn.model.backbone import RESNETS, FrozenBatchNorm2d, ResNetBody
from maskrcnn.model.fpn import FPN

# Parameter counts of the ImageNet classifiers without their fc layer (published figures:
# resnet18 11.69M, resnet50 25.56M, resnext50_32x4d 25.03M, minus fc = 512*1000+1000 or 2048*1000+1000).
BODY_PARAMS = {
    "resnet18": 11_689_512 - 513_000,
    "resnet50": 25_557_032 - 2_049_000,
    "resnext50_32x4d": 25_028_904 - 2_049_000,
}


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_body_strides_and_channels(name):
    body = ResNetBody(name, trainable_layers=5).eval()
    with torch.no_grad():
        feats = body(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [f.shape[1] for f in feats] == body.out_channels
    expected = [64, 128, 256, 512] if name in ("resnet18", "resnet34") else [256, 512, 1024, 2048]
    assert body.out_channels == expected


@pytest.mark.parametrize("name", sorted(BODY_PARAMS))
def test_body_parameter_counts_match_the_published_architectures(name):
    body = ResNetBody(name, frozen_bn=False, trainable_layers=5)
    assert sum(p.numel() for p in body.parameters()) == BODY_PARAMS[name]


def test_trainable_layers_freeze_from_the_bottom():
    body = ResNetBody("resnet18", trainable_layers=2)
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    with pytest.raises(ValueError, match="trainable_layers"):
        ResNetBody("resnet18", trainable_layers=6)
    with pytest.raises(ValueError, match="unknown backbone 'resnet5'"):
        ResNetBody("resnet5")


def test_frozen_batchnorm_equals_batchnorm_in_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8, eps=1e-3).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    frozen = FrozenBatchNorm2d(8, eps=1e-3).double()
    frozen.load_state_dict({**bn.state_dict()})  # num_batches_tracked is dropped
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False).double()
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    ref = bn(conv(x))
    torch.testing.assert_close(frozen(conv(x)), ref)


def _frozen_pair(channels: int) -> tuple[FrozenBatchNorm2d, FrozenBatchNorm2d]:
    torch.manual_seed(1)
    stats = {
        "weight": torch.rand(channels) + 0.5,
        "bias": torch.randn(channels),
        "running_mean": torch.randn(channels),
        "running_var": torch.rand(channels) + 0.5,
    }
    pair = FrozenBatchNorm2d(channels), FrozenBatchNorm2d(channels, inplace=True)
    for bn in pair:
        bn.load_state_dict(stats)
    return pair


def test_inplace_frozen_batchnorm_rounds_as_the_out_of_place_form_and_writes_its_input():
    plain, inplace = _frozen_pair(16)
    # Channels-last and NCHW, an odd grid: bit-identical, not merely close (parity margins).
    for fmt in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(2, 16, 13, 7).contiguous(memory_format=fmt)
        expected = plain(x)
        with torch.no_grad():
            y = x.clone(memory_format=torch.preserve_format)
            out = inplace(y)
        assert out.data_ptr() == y.data_ptr()
        assert torch.equal(out, expected)
    # float64 reference of the formula itself.
    x = torch.randn(1, 16, 5, 5)
    w, b, m, v = (
        getattr(plain, k).double()[None, :, None, None] for k in ("weight", "bias", "running_mean", "running_var")
    )
    ref = (x.double() - m) / (v + plain.eps).sqrt() * w + b
    torch.testing.assert_close(inplace(x.clone()).double(), ref, atol=1e-5, rtol=1e-5)


def test_inplace_frozen_batchnorm_leaves_a_map_autograd_needs():
    plain, inplace = _frozen_pair(4)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    h = x * 2  # a non-leaf map with a graph behind it
    before = h.detach().clone()
    out = inplace(h)
    assert torch.equal(h.detach(), before) and out.data_ptr() != h.data_ptr()
    out.sum().backward()
    scale = plain.weight * (plain.running_var + plain.eps).rsqrt()
    torch.testing.assert_close(x.grad, 2 * scale[None, :, None, None].expand_as(x))


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_body_with_inplace_norms_gives_the_same_maps_bit_for_bit(autocast):
    # Under autocast a bf16 conv output times a float32 scale is float32: writing it into the
    # bf16 map would round the whole residual stream to bf16 (found by review).
    torch.manual_seed(2)
    body = ResNetBody("resnet50", trainable_layers=5).eval()
    norms = [m for m in body.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(m.inplace for m in norms)  # the body builds them in place
    for m in norms:
        m.running_var.uniform_(0.5, 2)
        m.running_mean.uniform_(-0.1, 0.1)
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        fast = body(x)
        for m in norms:
            m.inplace = False
        slow = body(x)
    for f, s in zip(fast, slow):
        assert f.dtype == s.dtype == torch.float32
        assert torch.equal(f, s)


def test_fpn_levels_and_top_down_sum():
    fpn = FPN([4, 8], out_channels=6)
    c2, c3 = torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4)
    p2, p3, p6 = fpn([c2, c3])
    assert p2.shape == (1, 6, 8, 8) and p3.shape == (1, 6, 4, 4) and p6.shape == (1, 6, 2, 2)
    # P6 is P3 subsampled by 2; P2 sees C3 through nearest upsampling of its lateral.
    torch.testing.assert_close(p6, p3[:, :, ::2, ::2])
    inner3 = fpn.inner_blocks[1](c3)
    inner2 = fpn.inner_blocks[0](c2) + inner3.repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(p2, fpn.layer_blocks[0](inner2))


def test_cell_anchors_by_hand():
    # size 32, ratio h/w = 1: a 32x32 square; ratio 0.5: w = 32*sqrt(2) = 45.25, h = 22.63 -> rounded halves.
    a = cell_anchors(32, (0.5, 1.0))
    assert a.tolist() == [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0]]


def test_anchor_grid_order_and_strides():
    gen = AnchorGenerator(sizes=(8, 16), aspect_ratios=(1.0,))
    lvl0, lvl1 = gen((16, 24), [(4, 6), (2, 3)], torch.device("cpu"))
    assert lvl0.shape == (24, 4) and lvl1.shape == (6, 4)
    # Row-major cells, stride 4 on level 0: cell (row 1, col 2) is index 8, centred at (8, 4).
    assert lvl0[8].tolist() == [4.0, 0.0, 12.0, 8.0]
    assert lvl1[4].tolist() == [0.0, 0.0, 16.0, 16.0]  # (row 1, col 1), stride 8, size 16


def test_p6_anchor_step_torchvision_vs_detectron2():
    """An 800-px side padded to 800 has a 13-cell P6 grid (25 cells on P5, halved up).
    torchvision steps by 800 // 13 = 61 px there, Detectron2 by its nominal stride 64."""
    sizes, hw = (32, 64, 128, 256, 512), [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    tv = AnchorGenerator(sizes, (1.0,))((800, 1216), hw, torch.device("cpu"))
    d2 = AnchorGenerator(sizes, (1.0,), round_cells=False, strides=(4, 8, 16, 32, 64))(
        (800, 1216), hw, torch.device("cpu")
    )
    cell = 19 + 1  # P6 cell (row 1, col 1)
    assert tv[4][cell].tolist() == [64 - 256, 61 - 256, 64 + 256, 61 + 256]  # x step 1216 // 19 = 64, y 61
    assert d2[4][cell].tolist() == [64 - 256, 64 - 256, 64 + 256, 64 + 256]
    assert d2[4][-1].tolist() == [18 * 64 - 256, 12 * 64 - 256, 18 * 64 + 256, 12 * 64 + 256]
    for level in range(4):  # the grids divide evenly below P6: both agree
        torch.testing.assert_close(tv[level][:, :2] - tv[level][:1, :2], d2[level][:, :2] - d2[level][:1, :2])
    with pytest.raises(ValueError, match="strides"):
        AnchorGenerator(sizes, (1.0,), strides=(4, 8))


def test_stride_in_1x1_moves_the_stride_to_the_first_conv():
    """MSRA bottleneck: the same tensors, the stride in conv1 (1x1) instead of conv2 (3x3)."""
    torch.manual_seed(0)
    body = ResNetBody("resnet50", stride_in_1x1=True).eval()
    block = body.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert body.layer1[0].conv1.stride == (1, 1)  # layer1 does not downsample
    x = torch.randn(1, 256, 16, 16)
    relu = torch.relu
    out = relu(block.bn1(torch.nn.functional.conv2d(x, block.conv1.weight, stride=2)))
    out = relu(block.bn2(torch.nn.functional.conv2d(out, block.conv2.weight, padding=1)))
    out = block.bn3(torch.nn.functional.conv2d(out, block.conv3.weight))
    shortcut = block.downsample[1](torch.nn.functional.conv2d(x, block.downsample[0].weight, stride=2))
    torch.testing.assert_close(block(x), relu(out + shortcut))
    assert [c.shape[-1] for c in body(torch.randn(1, 3, 64, 64))] == [16, 8, 4, 2]
    with pytest.raises(ValueError, match="bottleneck"):
        ResNetBody("resnet18", stride_in_1x1=True)


def test_exact_cell_anchors_by_hand():
    """Detectron2's anchors are not rounded: w = sqrt(size^2 / ratio), h = ratio * w."""
    got = cell_anchors(32, (0.5, 1.0, 2.0), round_corners=False)
    w = (1024 / 0.5) ** 0.5  # 45.2548
    expected = torch.tensor([[-w / 2, -w / 4, w / 2, w / 4], [-16, -16, 16, 16], [-w / 4, -w / 2, w / 4, w / 2]])
    torch.testing.assert_close(got, expected)
    assert torch.equal(cell_anchors(32, (0.5,))[0], torch.tensor([-23.0, -11.0, 23.0, 11.0]))  # rounded
