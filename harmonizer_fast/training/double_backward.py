"""Depthwise convolutions with a fast double backward on CPU.

The harmonization loss differentiates the input gradient again. PyTorch's double backward
of a grouped convolution computes one of its terms with a Python-level loop of one
convolution *per group* (``_convolution_double_backward``): for the depthwise layers of
EfficientNet, MobileNet or ConvNeXt (hundreds of groups each) a single harmonized step of
efficientnet_lite0 launches ~9,000 tiny convolutions. Their fixed cost dominates small
batches (and is dreadful with oversubscribed CPU threads); at larger batches the native loop
is the faster one (measured in ``benchmarks/RESULTS.md``), so the trainer uses this module
only when asked (``TrainerConfig(fast_depthwise=True)``).

:class:`ShiftDepthwiseConv2d` computes the same depthwise convolution as a sum of
``k * k`` shifted, per-channel-scaled views of the padded input:

.. math:: y_{n,c,h,w} = b_c + \\sum_{i,j} W_{c,i,j}\\, x^{pad}_{n,c,\\, s h + d i,\\, s w + d j}

Every term is an elementwise product of a strided view, so the first and second
derivatives are elementwise products and sums too: no per-group loop, and nothing but a
padded copy of the input is saved. In eval mode (or with gradients off) the module runs
the native convolution. :func:`use_fast_depthwise` switches a model's depthwise layers in
place (the state dict is unchanged) and :func:`restore_depthwise` switches them back.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F


def shifted_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation) -> torch.Tensor:
    """Depthwise ``conv2d`` (groups = channels, one filter per channel) as a sum of shifted views.

    Args:
        x: (N, C, H, W).
        weight: (C, 1, kh, kw).
        bias: (C,) or None.
        stride, padding, dilation: pairs of ints, as ``F.conv2d``'s.
    """
    kh, kw = weight.shape[-2:]
    sh, sw = stride
    dh, dw = dilation
    ph, pw = padding
    padded = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
    out_h = (padded.shape[-2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    w = weight.view(1, -1, kh, kw)
    out = None
    for i in range(kh):
        for j in range(kw):
            view = padded[:, :, i * dh: i * dh + sh * (out_h - 1) + 1: sh, j * dw: j * dw + sw * (out_w - 1) + 1: sw]
            term = view * w[:, :, i:i + 1, j:j + 1]
            out = term if out is None else out + term
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


class ShiftDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with groups = in = out channels whose training forward is :func:`shifted_depthwise_conv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return shifted_depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return super().forward(x)


def _is_plain_depthwise(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def use_fast_depthwise(model: nn.Module) -> List[str]:
    """Switch ``model``'s plain depthwise ``nn.Conv2d`` layers to :class:`ShiftDepthwiseConv2d` in place.

    Returns the names of the switched modules (subclasses of Conv2d, such as timm's
    ``Conv2dSame``, and string paddings are left alone).
    """
    switched = []
    for name, module in model.named_modules():
        if _is_plain_depthwise(module):
            module.__class__ = ShiftDepthwiseConv2d
            switched.append(name)
    return switched


def restore_depthwise(model: nn.Module) -> int:
    """Undo :func:`use_fast_depthwise`; returns the number of modules restored."""
    count = 0
    for module in model.modules():
        if type(module) is ShiftDepthwiseConv2d:
            module.__class__ = nn.Conv2d
            count += 1
    return count
