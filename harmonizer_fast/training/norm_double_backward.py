r"""Batch norm (training mode) and layer norm whose double backward is a closed form (part of
:func:`harmonizer_fast.training.double_backward.fast_double_backward`).

The derivative of a standardization's input gradient is a closed form of a few per-group sums
(:func:`_standardization_x_term`): one native normalization backward call, a few reductions and
one fused update, against ~30 elementwise and reduction ops in PyTorch's
``batchnorm_double_backward`` / ``layer_norm_double_backward``. Evaluation-mode batch norm and
normalization under autocast run natively.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from harmonizer_fast._ext import _C
from harmonizer_fast.training._second_order import autocast_dtype as _autocast_dtype
from harmonizer_fast.training._second_order import bind as _bind
from harmonizer_fast.training._second_order import differentiable_param_grads as _differentiable_param_grads
from harmonizer_fast.training._second_order import needs_grad as _needs_grad
from harmonizer_fast.training._second_order import row_dot as _row_dot
from harmonizer_fast.training._second_order import will_be_used as _will_be_used

__all__ = ["BatchNormFunction", "LayerNormFunction", "batch_norm_fast_double_backward", "layer_norm_fast_double_backward"]

_aten = torch.ops.aten


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


def _fused_layer_norm_double_backward(grad_out, x, weight, mean, rstd, gg_x, need_gy: bool, need_x: bool,
                                      need_w: bool) -> Optional[Tuple[Optional[torch.Tensor], ...]]:
    """:class:`_LayerNormInputGrad`'s backward ``(gg_grad_out, gg_x, gg_weight)`` (None where not
    needed) in one C++ call of two passes per row (``csrc/layer_norm_second_order.cpp``: the same
    formulas), or None where it does not apply: not on the CPU, not float32/float64, or the
    extension unavailable. The normalized dimensions are flattened into one row of ``M``
    values (the statistics are over all of them either way)."""
    kernels = {torch.float32: "layer_norm_double_backward_f32", torch.float64: "layer_norm_double_backward_f64"}
    tensors = (grad_out, x, gg_x, mean, rstd) + (() if weight is None else (weight,))
    if _C is None or x.dtype not in kernels or any(t.device.type != "cpu" or t.dtype != x.dtype for t in tensors):
        return None
    m = x.numel() // max(mean.numel(), 1)
    if m == 0 or mean.numel() * m != x.numel() or (weight is not None and weight.numel() != m):
        return None
    rows = lambda t: t.detach().contiguous().view(-1, m).numpy()
    out_gy = torch.empty_like(x, memory_format=torch.contiguous_format) if need_gy else None
    out_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    out_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    getattr(_C, kernels[x.dtype])(
        rows(x), rows(grad_out), rows(gg_x), None if weight is None else weight.detach().contiguous().view(-1).numpy(),
        mean.detach().contiguous().view(-1).numpy(), rstd.detach().contiguous().view(-1).numpy(),
        None if out_gy is None else out_gy.view(-1, m).numpy(), None if out_x is None else out_x.view(-1, m).numpy(),
        None if out_w is None else out_w.view(-1).numpy(), torch.get_num_threads())
    return out_gy, out_x, out_w


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
        need_w = need_w and weight is not None
        fused = _fused_layer_norm_double_backward(grad_out, x, weight, mean, rstd, gg_x, need_gy, need_x, need_w)
        if fused is not None:
            return (*fused, None, None, None)
        shape = ctx.shape
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        gg_h = _aten.native_layer_norm_backward(gg_x, x, shape, mean, rstd, None, None, [True, False, False])[0]
        gg_gy = gg_h if weight is None else gg_h * weight
        gg_w = None
        if need_w:
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


_BATCH_NORM = (("input", None), ("running_mean", None), ("running_var", None), ("weight", None), ("bias", None),
               ("training", False), ("momentum", 0.1), ("eps", 1e-5))
_LAYER_NORM = (("input", None), ("normalized_shape", None), ("weight", None), ("bias", None), ("eps", 1e-5))


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

