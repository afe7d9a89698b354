r"""Convolutions whose double backward uses the backend's own kernels (part of
:func:`harmonizer_fast.training.double_backward.fast_double_backward`).

**Convolution** :math:`y = W \star x`. The saliency pass computes :math:`g_x = W^\top \star g_y`
(a transposed convolution); the training backward then needs, for an upstream
:math:`\bar g_x`,

.. math::

    \bar g_y = W \star \bar g_x \quad\text{(a forward convolution)}, \qquad
    \bar W = \nabla_W \langle g_y,\, W \star \bar g_x \rangle
    \quad\text{(the weight gradient of that forward convolution)}.

PyTorch (``_convolution_double_backward``) obtains :math:`\bar W` as a convolution of
:math:`\bar g_x` with :math:`g_y` *as the kernel* (batch and channels swapped; for a dense 3x3
layer on a CPU as fast as the weight-gradient kernel, within noise), and for grouped or depthwise
convolutions as a Python loop of one convolution per group (~9,000 per efficientnet_lite0 step;
4.4x slower for a 5x5 depthwise layer, see ``benchmarks/test_bench_double_backward.py``). Here
both terms are ordinary kernels: ``aten.convolution`` and ``aten.convolution_backward`` with only
the weight output requested. String paddings and non-4-D convolutions run natively.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from harmonizer_fast.training._second_order import autocast_dtype as _autocast_dtype
from harmonizer_fast.training._second_order import bind as _bind
from harmonizer_fast.training._second_order import differentiable_param_grads as _differentiable_param_grads
from harmonizer_fast.training._second_order import needs_grad as _needs_grad
from harmonizer_fast.training._second_order import will_be_used as _will_be_used

__all__ = ["Conv2dFunction", "conv2d_fast_double_backward"]

_aten = torch.ops.aten
_Params = Tuple[List[int], List[int], List[int], int]  # stride, padding, dilation, groups


def _slow_nchw_weight_grad(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """oneDNN's weight gradient of a large-kernel depthwise convolution is 2-5x faster on
    channels-last tensors, copies included: 8 x 240 x 28 x 28, 5 x 5: 57 ms NCHW vs 11 ms;
    8 x 672 x 14 x 14: 17 ms vs 7.5 ms (2-core CPU). For 3 x 3 kernels the copies eat the gain."""
    return (x.device.type == "cpu" and groups > 1 and groups == x.shape[1] == weight.shape[0]
            and weight.shape[-1] * weight.shape[-2] >= 25 and x.is_contiguous())


def _is_patchify(x: torch.Tensor, weight: torch.Tensor, p: _Params) -> bool:
    """A dense convolution over non-overlapping patches tiling the whole (NCHW) input: a ViT
    patch embedding, a ConvNeXt stem (:func:`_patchify_input_grad`)."""
    stride, padding, dilation, groups = p
    kernel = list(weight.shape[-2:])
    return (x.device.type == "cpu" and groups == 1 and stride == kernel and padding == [0, 0]
            and dilation == [1, 1] and kernel[0] * kernel[1] >= 16 and x.is_contiguous()
            and x.shape[-2] % kernel[0] == 0 and x.shape[-1] % kernel[1] == 0)


def _patchify_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    r"""Input gradient of a patchify convolution (:func:`_is_patchify`) as one matrix product:
    :math:`g_x[n, c, i k_h + a, j k_w + b] = \sum_o g_y[n, o, i, j]\, W[o, c, a, b]`. oneDNN's
    transposed convolution for these shapes is 2-7x slower on a CPU: 8 x 3 x 224 x 224 input,
    16 x 16 patches, 192 channels: 15 ms vs 4 ms; 768 channels: 39 ms vs 5.5 ms; 4 x 4 patches,
    40 channels: 2.6 ms vs 1.1 ms (2-core CPU)."""
    n, c, h, w = x_shape
    out_channels, _, kh, kw = weight.shape
    oh, ow = grad_out.shape[-2:]
    patches = grad_out.permute(0, 2, 3, 1).reshape(-1, out_channels) @ weight.reshape(out_channels, -1)
    return patches.view(n, oh, ow, c, kh, kw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def _conv_grads(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, p: _Params,
                need_x: bool, need_w: bool, need_b: bool = False):
    """(input, weight, bias) gradients of ``conv(x, weight)`` for ``grad_out`` (None where not
    needed): one native call, except that a large-kernel depthwise weight gradient runs on
    channels-last copies (:func:`_slow_nchw_weight_grad`) and a patchify input gradient is a
    matrix product (:func:`_patchify_input_grad`)."""
    stride, padding, dilation, groups = p
    if need_x and _is_patchify(x, weight, p):
        gx = _patchify_input_grad(grad_out, weight, x.shape)
        rest = _conv_grads(grad_out, x, weight, p, False, need_w, need_b) if need_w or need_b else (None, None, None)
        return gx, rest[1], rest[2]

    def native(g, inp, mask):
        return _aten.convolution_backward(g, inp, weight, [weight.shape[0]] if mask[2] else None, stride, padding,
                                          dilation, False, [0, 0], groups, mask)

    if need_w and _slow_nchw_weight_grad(x, weight, groups):
        gx = native(grad_out, x, [True, False, False])[0] if need_x else None
        last = torch.channels_last
        gw = native(grad_out.contiguous(memory_format=last), x.contiguous(memory_format=last), [False, True, False])[1]
        return gx, gw, grad_out.sum((0, 2, 3)) if need_b else None
    return native(grad_out, x, [need_x, need_w, need_b])


class _ConvInputGrad(torch.autograd.Function):
    r""":math:`g_x = W^\top \star g_y` with the backward described in the module docstring."""

    @staticmethod
    def forward(ctx, grad_out: torch.Tensor, weight: torch.Tensor, x_like: torch.Tensor, p: _Params) -> torch.Tensor:
        ctx.save_for_backward(grad_out, weight)
        ctx.params = p
        return _conv_grads(grad_out, x_like, weight, p, need_x=True, need_w=False)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_x: torch.Tensor):
        grad_out, weight = ctx.saved_tensors
        stride, padding, dilation, groups = p = ctx.params
        gg_out = gg_w = None
        if ctx.needs_input_grad[0]:
            gg_out = _aten.convolution(gg_x, weight, None, stride, padding, dilation, False, [0, 0], groups)
        if ctx.needs_input_grad[1]:
            gg_w = _conv_grads(grad_out, gg_x, weight, p, need_x=False, need_w=True)[1]
        return gg_out, gg_w, None, None


class Conv2dFunction(torch.autograd.Function):
    """``F.conv2d`` (zero padding given as ints) whose input gradient is :class:`_ConvInputGrad`
    when the backward builds a graph, so its own backward uses the fast kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], p: _Params) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.params = p
        stride, padding, dilation, groups = p
        return _aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        p = ctx.params
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        # the images of a harmonized step require a gradient for the saliency; the training
        # backward (Trainer: inputs=parameters) does not reach them, so their gradient through
        # the first convolution is skipped (ViT-Tiny's patch embedding: ~8 ms of a step)
        need_x = need_x and _will_be_used(x)
        if not torch.is_grad_enabled():  # ordinary backward
            return (*_conv_grads(grad_out, x, weight, p, need_x, need_w, need_b), None)
        gx = _ConvInputGrad.apply(grad_out, weight, x.detach(), p) if need_x else None
        gw = None
        if need_w and _will_be_used(weight):
            stride, padding, dilation, groups = p
            conv = lambda w, _: _aten.convolution(x, w, None, stride, padding, dilation, False, [0, 0], groups)
            gw = _differentiable_param_grads(conv, grad_out, weight, None)[0]
        gb = grad_out.sum((0, 2, 3)) if need_b and _will_be_used(bias) else None
        return gx, gw, gb, None


def _pair(value: object, name: str) -> List[int]:
    if isinstance(value, int):
        return [value, value]
    values = [int(v) for v in value]  # type: ignore[union-attr]
    if len(values) == 1:
        return values * 2
    if len(values) != 2:
        raise ValueError(f"conv2d `{name}` must be an int or a pair, got {value!r}")
    return values


_CONV2D = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1),
           ("groups", 1))


def conv2d_fast_double_backward(*args, **kwargs) -> Optional[torch.Tensor]:
    """``F.conv2d(*args, **kwargs)`` through :class:`Conv2dFunction`, or None when the call is
    not one it handles (string padding, non-4-D input, no gradient needed)."""
    x, weight, bias, stride, padding, dilation, groups = _bind(_CONV2D, args, kwargs)
    if isinstance(padding, str) or not isinstance(x, torch.Tensor) or x.dim() != 4 or not _needs_grad(x, weight, bias):
        return None
    params = (_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), int(groups))
    autocast_dtype = _autocast_dtype(x.device.type)
    if autocast_dtype is None:
        return Conv2dFunction.apply(x, weight, bias, params)
    # Autocast would cast inside forward() and leave the saved tensors in another dtype than
    # the backward's; cast here instead (convolutions run in the autocast dtype, as natively).
    cast = lambda t: None if t is None else t.to(autocast_dtype)
    with torch.autocast(x.device.type, enabled=False):
        return Conv2dFunction.apply(cast(x), cast(weight), cast(bias), params)

