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
        lambda x, w, b: layout._NchwWeightGradConv.apply(x, w, b, (s, s), (p, p), (d, d), g),
    )
    assert got[0].grad_fn is not None and "NchwWeightGrad" in type(got[0].grad_fn).__name__
    assert got[1] is None if not input_grad else got[1].is_contiguous(memory_format=torch.channels_last)
    for name, a, b in zip(["output", "input grad", "weight grad", "bias grad"], got, want):
        assert (a is None) == (b is None), name
        if b is not None:
            assert (a.double() - b).abs().max().item() <= 1e-5 * b.abs().max().item(), name


def _picked(x: torch.Tensor, kernel: int, stride: int = 1) -> bool:
    w = torch.randn(4, x.shape[1], kernel, kernel, requires_grad=True)
    y = layout.conv2d(x, w, None, (stride, stride), (kernel // 2,) * 2, (1, 1), 1)
    return "NchwWeightGrad" in type(y.grad_fn).__name__


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
