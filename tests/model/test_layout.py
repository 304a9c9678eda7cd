"""The convolutions' layout (``maskrcnn.model.layout``): the NCHW weight gradient that the AVX2
kernels get is the gradient of the convolution, checked against float64; and ``conv2d`` takes
it only where the measurement says it pays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.model import layout

CASES = [  # (in, out, kernel, stride, padding, dilation, groups, bias)
    (8, 6, 3, 1, 1, 1, 1, False),
    (8, 6, 3, 2, 1, 1, 1, True),
    (8, 8, 3, 1, 2, 2, 1, True),
    (8, 16, 3, 1, 1, 1, 4, False),
    (3, 4, 7, 2, 3, 1, 1, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "in{}-out{}-k{}-s{}-p{}-d{}-g{}-bias{}".format(*c))
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "weight-grad-only"])
def test_nchw_weight_gradient_is_the_convolutions_gradient(case, input_grad):
    cin, cout, k, s, p, d, g, has_bias = case
    gen = torch.Generator().manual_seed(sum(case))
    x64 = torch.randn(2, cin, 37, 30, generator=gen, dtype=torch.float64)  # odd sizes: uneven strides
    w64 = torch.randn(cout, cin // g, k, k, generator=gen, dtype=torch.float64)
    b64 = torch.randn(cout, generator=gen, dtype=torch.float64) if has_bias else None
    upstream = None

    def run(x, w, b, conv):  # type: ignore[no-untyped-def]
        nonlocal upstream
        x, w = x.clone().requires_grad_(input_grad), w.clone().requires_grad_()
        b = b.clone().requires_grad_() if b is not None else None
        y = conv(x, w, b)
        if upstream is None:
            upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        y.backward(upstream.to(y.dtype).contiguous(memory_format=torch.channels_last))
        return [y, x.grad, w.grad, None if b is None else b.grad]

    want = run(x64, w64, b64, lambda x, w, b: F.conv2d(x, w, b, s, p, d, g))
    x32 = x64.float().contiguous(memory_format=torch.channels_last)
    got = run(
        x32,
        w64.float(),
        None if b64 is None else b64.float(),
        lambda x, w, b: layout._TrainConv.apply(x, w, b, (s, s), (p, p), (d, d), g, False, True),
    )
    assert got[0].grad_fn is not None and "TrainConv" in type(got[0].grad_fn).__name__
    assert got[1] is None if not input_grad else got[1].is_contiguous(memory_format=torch.channels_last)
    for name, a, b in zip(["output", "input grad", "weight grad", "bias grad"], got, want):
        assert (a is None) == (b is None), name
        if b is not None:
            assert (a.double() - b).abs().max().item() <= 1e-5 * b.abs().max().item(), name


def _picked(x: torch.Tensor, kernel: int, stride: int = 1) -> bool:
    w = torch.randn(4, x.shape[1], kernel, kernel, requires_grad=True)
    y = layout.conv2d(x, w, None, (stride, stride), (kernel // 2,) * 2, (1, 1), 1)
    return "TrainConv" in type(y.grad_fn).__name__


def test_conv2d_takes_the_nchw_weight_gradient_only_where_it_pays(monkeypatch):
    big = torch.rand(1, 4, 64, 64).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(layout, "_avx512_kernels", lambda: True)
    assert not _picked(big, 3)  # AVX-512 kernels: channels-last throughout
    monkeypatch.setattr(layout, "_avx512_kernels", lambda: False)
    assert _picked(big, 3)
    assert not _picked(big, 1)  # 1x1: channels-last is the faster there too
    assert _picked(big, 3, stride=2)  # 32x32 outputs ...
    assert not _picked(torch.rand(1, 4, 62, 62).contiguous(memory_format=torch.channels_last), 3, stride=2)  # ... 31x31
    assert not _picked(torch.rand(8, 4, 14, 14).contiguous(memory_format=torch.channels_last), 3)  # RoI maps
    assert not _picked(big.contiguous(), 3)  # an NCHW input stays as it is
    with torch.no_grad():
        assert not _picked(big, 3)
    with torch.autocast("cpu", torch.bfloat16):
        assert not _picked(big, 3)


# --- the heads' 3x3 convolutions at inference: NNPACK's Winograd algorithm --------------------

needs_nnpack = pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="NNPACK needs AVX2")


def _nnpack_calls(run) -> int:  # type: ignore[no-untyped-def]
    """How many times ``run()`` called NNPACK's convolution, by torch's profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_nnpack_spatial_convolution")


def _ran_nnpack(run) -> bool:  # type: ignore[no-untyped-def]
    return _nnpack_calls(run) > 0


@needs_nnpack
@pytest.mark.parametrize(
    "shape",
    [
        (1, 32, 200, 272),
        (2, 16, 37, 30),
        (3, 8, 1, 1),
        (1, 8, 2, 3),
        (1, 8, 1, 61),
        (1, 8, 61, 1),
        (6, 8, 40, 9),
        (100, 16, 14, 14),
        (7, 16, 13, 17),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
def test_winograd_convolution_is_the_convolution(shape, has_bias):
    """Against float64, on maps tiny to 1:61 and 61:1, odd and even, one image to 100 RoIs:
    within 2e-5 of the output's scale (NNPACK's rounding; measured 0.7e-5 to 1.1e-5 for 64 to
    256 channels at 100x136 and 200x272, where oneDNN's is 3e-7), and in NCHW."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=torch.float64).relu()  # post-ReLU features
    w = torch.randn(24, shape[1], 3, 3, generator=gen, dtype=torch.float64) * (2 / (9 * shape[1])) ** 0.5
    b = torch.randn(24, generator=gen, dtype=torch.float64) if has_bias else None
    want = F.conv2d(x, w, b, padding=1)
    xf = x.float().contiguous(memory_format=torch.channels_last)  # as the FPN gives it
    bf = None if b is None else b.float()
    with torch.no_grad():
        assert _ran_nnpack(lambda: layout.conv2d(xf, w.float(), bf, (1, 1), (1, 1), (1, 1), 1, winograd=True))
        got = layout.conv2d(xf, w.float(), bf, (1, 1), (1, 1), (1, 1), 1, winograd=True)
    assert got.shape == want.shape and got.is_contiguous()
    assert (got.double() - want).abs().max().item() <= 2e-5 * want.abs().max().item()


@needs_nnpack
def test_winograd_runs_only_where_it_applies():
    """Inference on float32 with ``winograd``: NNPACK; a gradient, autocast, another dtype, a
    stride, a dilation, groups, a 1x1 kernel, an empty batch, or no ``winograd``: oneDNN."""
    x = torch.randn(2, 8, 20, 20)
    w = torch.randn(8, 8, 3, 3)

    def conv(x=x, w=w, stride=1, dilation=1, groups=1, winograd=True):  # type: ignore[no-untyped-def]
        return lambda: layout.conv2d(x, w, None, (stride,) * 2, (dilation,) * 2, (dilation,) * 2, groups, winograd)

    with torch.no_grad():
        assert _ran_nnpack(conv())
        assert not _ran_nnpack(conv(winograd=False))
        assert not _ran_nnpack(conv(stride=2))
        assert not _ran_nnpack(conv(dilation=2))
        assert not _ran_nnpack(conv(w=torch.randn(8, 2, 3, 3), groups=4))
        assert not _ran_nnpack(conv(w=torch.randn(8, 8, 1, 1)))
        assert not _ran_nnpack(conv(x=x.double(), w=w.double()))
        assert conv(x=x[:0])().shape == (0, 8, 20, 20)
        # images one by one (NNPACK's batch algorithm is slower for them), RoI stacks at once
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            conv()()  # 2 maps of 20x20
            conv(x=torch.randn(8, 8, 14, 14))()  # 8 RoIs of 14x14
        calls = [e.count for e in prof.key_averages() if e.key == "aten::_nnpack_spatial_convolution"]
        assert calls == [3]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not _ran_nnpack(conv())
    assert _ran_nnpack(conv())  # autograd on, but nothing requires a gradient


@needs_nnpack
@pytest.mark.parametrize(
    "shape", [(2, 16, 37, 30), (12, 16, 14, 14), (1, 8, 1, 61)], ids=lambda s: "x".join(map(str, s))
)
def test_winograd_training_step_is_the_convolution_and_its_gradient(monkeypatch, shape):
    """On the AVX2 kernels a training step's forward pass and input gradient run NNPACK, in the
    input's layout; output and gradients are the convolution's (float64), with the NCHW weight
    gradient (the first shape) and without it (RoI stacks, a 1x61 map)."""
    monkeypatch.setattr(layout, "_avx512_kernels", lambda: False)
    gen = torch.Generator().manual_seed(sum(shape))
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64).relu()
    w64 = torch.randn(24, shape[1], 3, 3, generator=gen, dtype=torch.float64) * (2 / (9 * shape[1])) ** 0.5
    b64 = torch.randn(24, generator=gen, dtype=torch.float64)
    up = torch.randn(shape[0], 24, *shape[2:], generator=gen, dtype=torch.float64)

    def step(x, w, b, conv):  # type: ignore[no-untyped-def]
        x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
        y = conv(x, w, b)
        y.backward(up.to(y.dtype).contiguous(memory_format=torch.channels_last))
        return y, [x.grad, w.grad, b.grad]

    want, want_grads = step(x64, w64, b64, lambda x, w, b: F.conv2d(x, w, b, padding=1))
    x32 = x64.float().contiguous(memory_format=torch.channels_last)

    def ours(x, w, b):  # type: ignore[no-untyped-def]
        return layout.conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1, winograd=True)

    forward_calls = _nnpack_calls(lambda: ours(x32, w64.float().requires_grad_(), b64.float()))
    assert forward_calls > 0
    assert _nnpack_calls(lambda: step(x32, w64.float(), b64.float(), ours)) == 2 * forward_calls  # input grad too
    got, got_grads = step(x32, w64.float(), b64.float(), ours)
    assert "TrainConv" in type(got.grad_fn).__name__
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got.double() - want).abs().max().item() <= 2e-5 * want.abs().max().item()
    for name, a, b in zip(["input", "weight", "bias"], got_grads, want_grads):
        assert (a.double() - b).abs().max().item() <= 1e-5 * b.abs().max().item(), name


@needs_nnpack
def test_winograd_training_takes_onednn_where_nnpack_was_not_measured_to_pay(monkeypatch):
    x = torch.randn(2, 8, 40, 40).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)

    def conv():  # type: ignore[no-untyped-def]
        return layout.conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, winograd=True)

    monkeypatch.setattr(layout, "_avx512_kernels", lambda: True)
    assert not _ran_nnpack(conv)  # AVX-512: little gain for more memory and rounding
    monkeypatch.setattr(layout, "_avx512_kernels", lambda: False)
    assert _ran_nnpack(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _ran_nnpack(conv)


def test_train_conv_has_a_second_derivative(monkeypatch):
    """``create_graph`` (gradient penalties, Hessian-vector products) takes oneDNN's
    differentiable backward: the double backward equals the plain convolution's."""
    monkeypatch.setattr(layout, "_avx512_kernels", lambda: False)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 6, 33, 33, generator=gen).contiguous(memory_format=torch.channels_last)
    w0 = torch.randn(6, 6, 3, 3, generator=gen) * 0.2

    def penalty(conv):  # type: ignore[no-untyped-def]
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(conv(x, w).square().sum(), x, create_graph=True)
        gx.square().sum().backward()
        return w.grad

    want = penalty(lambda x, w: F.conv2d(x, w, None, 1, 1))
    got = penalty(lambda x, w: layout.conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, winograd=True))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@needs_nnpack
def test_winograd_gives_way_when_nnpacks_pool_no_longer_fits(monkeypatch):
    """NNPACK's thread pool is sized at its first call: after ``set_num_threads`` changes the
    count, and in a forked child (where the pool has lost its threads), oneDNN runs instead."""
    monkeypatch.setattr(layout, "_nnpack_pool", None)
    x, w = torch.randn(1, 8, 20, 20), torch.randn(8, 8, 3, 3)

    def conv():  # type: ignore[no-untyped-def]
        return layout.conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, winograd=True)

    threads = torch.get_num_threads()
    with torch.no_grad():
        assert _ran_nnpack(conv)
        try:
            torch.set_num_threads(threads + 1)
            assert not _ran_nnpack(conv)
        finally:
            torch.set_num_threads(threads)
        assert _ran_nnpack(conv)
        monkeypatch.setattr(layout.os, "getpid", lambda: -1)  # as a forked child sees it
        assert not _ran_nnpack(conv)


@needs_nnpack
def test_heads_run_winograd_and_the_body_does_not():
    """Which convolutions of an R50-FPN run NNPACK: the FPN outputs', the RPN's and the mask
    head's 3x3; none of the ResNet body's (its depth compounds NNPACK's rounding)."""
    from maskrcnn.config import ModelConfig
    from maskrcnn.model.build import build_model

    model = build_model(ModelConfig()).eval()
    winograd = sorted(n for n, m in model.named_modules() if getattr(m, "winograd", False))
    assert winograd == sorted(
        [f"backbone.fpn.layer_blocks.{i}" for i in range(4)]
        + ["rpn.head.conv"]
        + [f"roi_heads.mask_head.mask_fcn{i}" for i in range(1, 5)]
    )


@needs_nnpack
def test_forward_mode_derivatives_pass_through_the_oneDNN_path():
    """``torch.func.jvp`` / forward AD at inference: NNPACK and the 1x1 product have no forward
    derivative, so dual tensors take F.conv2d; the tangent of a convolution without bias is the
    convolution of the tangent."""
    from torch.autograd import forward_ad as fwAD

    gen = torch.Generator().manual_seed(5)
    x, v = torch.randn(2, 8, 12, 9, generator=gen), torch.randn(2, 8, 12, 9, generator=gen)
    for k in (3, 1):
        w = torch.randn(6, 8, k, k, generator=gen)
        with torch.no_grad(), fwAD.dual_level():
            y = layout.conv2d(fwAD.make_dual(x, v), w, None, (1, 1), (k // 2,) * 2, (1, 1), 1, winograd=True)
            tangent = fwAD.unpack_dual(y).tangent
        torch.testing.assert_close(tangent, F.conv2d(v, w, padding=k // 2), rtol=1e-4, atol=1e-5)
