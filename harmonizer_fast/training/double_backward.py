r"""Convolutions and normalization layers whose double backward uses the backend's own kernels.

The harmonization loss differentiates the input gradient of the network again, so every
layer's backward is itself differentiated. PyTorch's generic second-order formulas are slow
for the layers that dominate CNNs and ViTs:

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
the weight output requested.

**Batch norm in training mode and layer norm.** The derivative of a standardization's input
gradient is a closed form of a few per-group sums (:func:`_standardization_x_term`): one native
normalization backward call, a few reductions and one fused update, against ~30 elementwise
and reduction ops in PyTorch's ``batchnorm_double_backward`` / ``layer_norm_double_backward``.

The math is unchanged: gradients equal native autograd's (tested in float64 to second order).
:func:`fast_double_backward` is a context manager that routes the ``F.conv2d``, training-mode
``F.batch_norm`` and ``F.layer_norm`` calls made under it (``nn.Conv2d``, ``nn.BatchNorm2d``,
``nn.LayerNorm``, timm's ``Conv2dSame``, ``StdConv2d``, ``BatchNormAct2d``, ``LayerNorm2d``,
functional calls) through :class:`Conv2dFunction`, :class:`BatchNormFunction` and
:class:`LayerNormFunction` while gradients are enabled; string paddings, non-4-D convolutions,
evaluation-mode batch norm and normalization under autocast run natively. The first backward
computes only the gradients the running backward pass uses (the saliency pass needs input
gradients, not weight gradients). Third-order derivatives are not supported
(``once_differentiable``). The same mode routes ``F.scaled_dot_product_attention``, softmax and
``F.gelu`` (transformers) through :mod:`harmonizer_fast.training.attention_double_backward`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from harmonizer_fast.training import attention_double_backward
from harmonizer_fast.training._second_order import autocast_dtype as _autocast_dtype
from harmonizer_fast.training._second_order import bind as _bind
from harmonizer_fast.training._second_order import needs_grad as _needs_grad
from harmonizer_fast.training._second_order import row_dot as _row_dot
from harmonizer_fast.training._second_order import will_be_used as _will_be_used

__all__ = [
    "BatchNormFunction",
    "Conv2dFunction",
    "LayerNormFunction",
    "batch_norm_fast_double_backward",
    "layer_norm_fast_double_backward",
    "conv2d_fast_double_backward",
    "fast_double_backward",
]

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


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def _standardization_x_term(x, h, gg, mean, invstd, scale, a, b, v_sum, c_sum, p_sum, count):
    r"""The :math:`x` part of the second derivative of a standardization's input gradient.

    For :math:`g_x = c\,(h - a - \hat x\, b)` with :math:`c` = ``scale`` (constant over a group
    of :math:`M` = ``count`` values), :math:`\hat x = (x - \mu) s`, :math:`a = \bar h`,
    :math:`b = \overline{h \hat x}`, and an upstream :math:`\bar g` (``gg``) with sums
    :math:`V = \sum \bar g`, :math:`C = \sum \bar g \hat x`, :math:`P = \sum \bar g h`:

    .. math:: \bar x = c\, s \bigl[\hat x\,(3bC - P + aV)/M - (C/M)(h - a) - b\,(\bar g - V/M)\bigr]

    (the dependence of :math:`\hat x`, :math:`\mu` and :math:`s` on :math:`x`, with
    :math:`\partial s/\partial x_i = -s^2 \hat x_i / M`). Group quantities come broadcastable;
    the result is folded into one coefficient each for :math:`x`, :math:`h`, :math:`\bar g` and a
    constant, so it costs three fused elementwise passes.
    """
    k1 = (3.0 * b * c_sum - p_sum + a * v_sum) / count
    k2 = c_sum / count
    f = scale * invstd
    out = (f * k1 * invstd) * x + f * (-k1 * invstd * mean + k2 * a + b * v_sum / count)
    return out.addcmul_(-f * k2, h).addcmul_(-f * b, gg)


class _BatchNormInputGrad(torch.autograd.Function):
    r"""Training-mode batch-norm input gradient :math:`g_x = \gamma s\,(g_y - a - \hat x\, b)` with a
    closed-form backward.

    Per channel, over its :math:`M` values: :math:`s = 1/\sqrt{\sigma^2 + \epsilon}`,
    :math:`\hat x = (x - \mu) s`, :math:`a = \overline{g_y}`, :math:`b = \overline{g_y \hat x}`.
    For an upstream :math:`\bar g` of :math:`g_x`, with :math:`V = \sum \bar g`,
    :math:`C = \sum \bar g \hat x`, :math:`P = \sum \bar g g_y`:

    .. math::

        \bar g_y &= \gamma s\,(\bar g - V/M - \hat x\, C/M) \quad\text{(a batch-norm backward of } \bar g)\\
        \bar\gamma &= s\,(P - aV - bC)

    and :math:`\bar x` from :func:`_standardization_x_term` (with :math:`h = g_y`, scale
    :math:`\gamma s`). The first line is one native batch-norm backward call, which also returns
    :math:`V` and :math:`C`; PyTorch's generic formula takes ~30 elementwise and reduction ops.
    """

    @staticmethod
    def forward(ctx, grad_out, x, weight, mean, invstd, eps):
        gx, sum_gy_xhat, sum_gy = _aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(grad_out, x, weight, mean, invstd, sum_gy_xhat, sum_gy)
        ctx.eps = eps
        return gx

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_x):
        grad_out, x, weight, mean, invstd, sum_gy_xhat, sum_gy = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        ndim = x.dim()
        dims = [0] + list(range(2, ndim))
        count = x.numel() // x.shape[1]
        gg_gy, c_sum, v_sum = _aten.native_batch_norm_backward(
            gg_x, x, weight, None, None, mean, invstd, True, ctx.eps, [need_gy, True, True])
        p_sum = (gg_x * grad_out).sum(dims)
        a, b = sum_gy / count, sum_gy_xhat / count
        gg_w = invstd * (p_sum - a * v_sum - b * c_sum) if need_w and weight is not None else None
        gg_xin = None
        if need_x:
            view = lambda t: _channel_view(t, ndim)
            scale = invstd if weight is None else weight * invstd
            gg_xin = _standardization_x_term(x, grad_out, gg_x, view(mean), view(invstd), view(scale),
                                             view(a), view(b), view(v_sum), view(c_sum), view(p_sum), count)
        return gg_gy if need_gy else None, gg_xin, gg_w, None, None, None


class _LayerNormInputGrad(torch.autograd.Function):
    r"""Layer-norm input gradient :math:`g_x = s\,(h - a - \hat x\, b)`, :math:`h = \gamma \odot g_y`
    (statistics over the normalized trailing dimensions of each row), with a closed-form backward:
    :math:`\bar h = s(\bar g - \overline{\bar g} - \hat x\,\overline{\bar g \hat x})` (one native
    layer-norm backward call), :math:`\bar g_y = \gamma \bar h`, :math:`\bar\gamma = \sum_{rows}
    g_y \bar h`, and :math:`\bar x` from :func:`_standardization_x_term`."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, mean, rstd, shape):
        gx = _aten.native_layer_norm_backward(grad_out, x, shape, mean, rstd, weight, None, [True, False, False])[0]
        ctx.save_for_backward(grad_out, x, weight, mean, rstd)
        ctx.shape = shape
        return gx

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_x):
        grad_out, x, weight, mean, rstd = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        shape = ctx.shape
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        gg_h = _aten.native_layer_norm_backward(gg_x, x, shape, mean, rstd, None, None, [True, False, False])[0]
        gg_gy = gg_h if weight is None else gg_h * weight
        gg_w = None
        if need_w and weight is not None:
            lead = tuple(range(x.dim() - len(shape)))
            gg_w = (gg_h * grad_out).sum(lead) if lead else gg_h * grad_out  # sum(()) would sum everything
        gg_xin = None
        if need_x:
            h = grad_out if weight is None else grad_out * weight
            x_hat = (x - mean) * rstd
            count = math.prod(shape)
            row_sum = lambda t: t.sum(dims, keepdim=True)
            # one normalized dimension (transformers): the products-and-sums in one pass each
            dot = _row_dot if len(dims) == 1 else (lambda a, b: row_sum(a * b))
            gg_xin = _standardization_x_term(
                x, h, gg_x, mean, rstd, rstd, row_sum(h) / count, dot(h, x_hat) / count,
                row_sum(gg_x), dot(gg_x, x_hat), dot(gg_x, h), count)
        return gg_gy if need_gy else None, gg_xin, gg_w, None, None, None


class LayerNormFunction(torch.autograd.Function):
    """``F.layer_norm`` whose input gradient is :class:`_LayerNormInputGrad` when the backward
    builds a graph."""

    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps):
        y, mean, rstd = _aten.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape, ctx.eps = shape, eps
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        need_w, need_b = need_w and weight is not None, need_b and bias is not None
        if not torch.is_grad_enabled():
            gx, gw, gb = _aten.native_layer_norm_backward(
                grad_out, x, ctx.shape, mean, rstd, weight, bias, [need_x, need_w, need_b])
            return gx, None, gw, gb, None
        gx = _LayerNormInputGrad.apply(grad_out, x, weight, mean, rstd, ctx.shape) if need_x else None
        gw = gb = None
        if (need_w and _will_be_used(weight)) or (need_b and _will_be_used(bias)):
            gw, gb = _differentiable_param_grads(
                lambda w, b: F.layer_norm(x, ctx.shape, w, b, ctx.eps), grad_out, weight, bias)
        return gx, None, gw if need_w else None, gb if need_b else None, None


class BatchNormFunction(torch.autograd.Function):
    """Training-mode ``F.batch_norm`` (running statistics updated as natively) whose input
    gradient is :class:`_BatchNormInputGrad` when the backward builds a graph."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = _aten.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w, need_b = need_w and weight is not None, need_b and bias is not None
        if not torch.is_grad_enabled():
            gx, gw, gb = _aten.native_batch_norm_backward(
                grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, [need_x, need_w, need_b])
            return gx, gw, gb, None, None, None, None
        gx = _BatchNormInputGrad.apply(grad_out, x, weight, mean, invstd, ctx.eps) if need_x else None
        gw = gb = None
        if (need_w and _will_be_used(weight)) or (need_b and _will_be_used(bias)):
            gw, gb = _differentiable_param_grads(
                lambda w, b: F.batch_norm(x, None, None, w, b, True, 0.0, ctx.eps), grad_out, weight, bias)
        return gx, gw if need_w else None, gb if need_b else None, None, None, None, None


def _differentiable_param_grads(layer, grad_out, weight, bias):
    # Rare path: a graph-building backward that wants parameter gradients (e.g. a penalty on
    # them). Native autograd of ``layer(weight, bias)``, recomputed from the saved input, keeps
    # them differentiable.
    with torch.enable_grad():
        probes = [None if t is None else t.detach().requires_grad_(True) for t in (weight, bias)]
        wanted = [t for t in probes if t is not None]
        grads = iter(torch.autograd.grad(layer(*probes), wanted, grad_out, create_graph=True))
        return tuple(None if t is None else next(grads) for t in probes)


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
_BATCH_NORM = (("input", None), ("running_mean", None), ("running_var", None), ("weight", None), ("bias", None),
               ("training", False), ("momentum", 0.1), ("eps", 1e-5))
_LAYER_NORM = (("input", None), ("normalized_shape", None), ("weight", None), ("bias", None), ("eps", 1e-5))


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


def batch_norm_fast_double_backward(*args, **kwargs) -> Optional[torch.Tensor]:
    """``F.batch_norm(*args, **kwargs)`` in training mode through :class:`BatchNormFunction`,
    or None when the call is not one it handles (evaluation mode, autocast, no gradient)."""
    x, running_mean, running_var, weight, bias, training, momentum, eps = _bind(_BATCH_NORM, args, kwargs)
    if not training or not isinstance(x, torch.Tensor) or x.dim() < 2 or _autocast_dtype(x.device.type) is not None:
        return None
    if not _needs_grad(x, weight, bias):
        return None
    if x.numel() // x.shape[1] <= 1:
        return None  # the native call raises its clear "expected more than 1 value per channel"
    return BatchNormFunction.apply(x, weight, bias, running_mean, running_var, momentum, eps)


def layer_norm_fast_double_backward(*args, **kwargs) -> Optional[torch.Tensor]:
    """``F.layer_norm(*args, **kwargs)`` through :class:`LayerNormFunction`, or None when the call
    is not one it handles (autocast, no gradient)."""
    x, shape, weight, bias, eps = _bind(_LAYER_NORM, args, kwargs)
    if not isinstance(x, torch.Tensor) or _autocast_dtype(x.device.type) is not None or not _needs_grad(x, weight, bias):
        return None
    shape = [int(shape)] if isinstance(shape, int) else [int(d) for d in shape]
    if x.dim() < len(shape) or list(x.shape[x.dim() - len(shape):]) != shape:
        return None  # the native call raises its clear shape error
    return LayerNormFunction.apply(x, shape, weight, bias, eps)


class _FastConvMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args: Sequence = (), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None and torch.is_grad_enabled():
            out = route(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


_ROUTES = {
    F.conv2d: conv2d_fast_double_backward,
    F.batch_norm: batch_norm_fast_double_backward,
    F.layer_norm: layer_norm_fast_double_backward,
    **attention_double_backward.ROUTES,
}


@contextlib.contextmanager
def fast_double_backward() -> Iterator[None]:
    """Route the ``F.conv2d``, training-mode ``F.batch_norm`` and ``F.layer_norm`` calls of the
    enclosed code through :class:`Conv2dFunction`, :class:`BatchNormFunction` and
    :class:`LayerNormFunction`, and its ``F.scaled_dot_product_attention``, softmax and
    ``F.gelu`` calls through :mod:`~harmonizer_fast.training.attention_double_backward`
    (``AttentionFunction``, ``SoftmaxFunction``, ``GeluFunction``).

    Only the graph built inside matters: a ``backward()`` called after the block still uses
    the fast kernels for the layers recorded in it.
    """
    with _FastConvMode():
        yield
