"""The shifted depthwise convolution equals F.conv2d, with first and second derivatives."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harmonizer_fast.training.double_backward import (
    ShiftDepthwiseConv2d,
    restore_depthwise,
    shifted_depthwise_conv2d,
    use_fast_depthwise,
)


def _second_order(conv_fn, x, w, b):
    """Gradients wrt (x, w, b) of ||d sum(conv * r) / dx||^2: the harmonizer's double backward."""
    out = conv_fn(x, w, b)
    weights = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    (gx,) = torch.autograd.grad((out * weights).sum(), x, create_graph=True)
    second = torch.autograd.grad(gx.square().sum() + (gx * x).sum() + out.sum(), (x, w, b))
    return out, gx, second


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 2, 2, 1), (3, 1, 2, 2), (5, 1, 0, 1)])
def test_matches_conv2d_to_second_order(kernel, stride, padding, dilation):
    g = torch.Generator().manual_seed(kernel * 10 + stride)
    c = 6
    x = torch.randn(2, c, 11, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, 1, kernel, kernel, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)
    native = lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups=c)
    shifted = lambda x, w, b: shifted_depthwise_conv2d(x, w, b, (stride, stride), (padding, padding), (dilation, dilation))
    out_n, gx_n, second_n = _second_order(native, x, w, b)
    out_s, gx_s, second_s = _second_order(shifted, x, w, b)
    torch.testing.assert_close(out_s, out_n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_s, gx_n, rtol=1e-12, atol=1e-12)
    for a, e in zip(second_s, second_n):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_switch_and_restore_keep_state_and_outputs():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 3, groups=2))
    x = torch.randn(2, 3, 10, 10)
    before = model(x)
    names = use_fast_depthwise(model)
    assert names == ["1"] and type(model[1]) is ShiftDepthwiseConv2d and type(model[2]) is nn.Conv2d
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)  # training forward: shifted
    model.eval()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)  # eval forward: native
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert restore_depthwise(model) == 1 and type(model[1]) is nn.Conv2d
