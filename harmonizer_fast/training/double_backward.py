r"""2-D convolutions whose double backward uses the backend's own weight-gradient kernel.

The harmonization loss differentiates the input gradient of the network again. For a
convolution :math:`y = W \star x` the saliency pass computes :math:`g_x = W^\top \star g_y`
(a transposed convolution), and the training backward must then differentiate :math:`g_x`:

.. math::

    \bar g_y = W \star \bar g_x \quad\text{(a forward convolution)}, \qquad
    \bar W = \nabla_W \langle g_y,\, W \star \bar g_x \rangle
    \quad\text{(the weight gradient of that forward convolution)}.

PyTorch's generic double backward (``_convolution_double_backward``) obtains :math:`\bar W`
as a convolution of :math:`\bar g_x` with :math:`g_y` *as the kernel* (batch and channels
swapped), which oneDNN runs slowly (a 56 x 56 "kernel" for a ResNet stage), and for grouped or
depthwise convolutions as a Python loop of one convolution per group (~9,000 per
efficientnet_lite0 step). Here both terms are the backend's ordinary kernels:
``aten.convolution`` for :math:`\bar g_y` and ``aten.convolution_backward`` with only the
weight output requested for :math:`\bar W`; the math is unchanged, and the gradients equal
native autograd's (tested in float64 against ``F.conv2d`` to second order).

:func:`fast_conv_double_backward` is a context manager that routes ``F.conv2d`` calls made under
it (``nn.Conv2d``, timm's ``Conv2dSame``/``StdConv2d``, functional calls) through
:class:`Conv2dFunction` while gradients are enabled; other calls, string paddings and
non-4-D inputs run natively. The first backward computes only the gradients the running
backward pass will use (the saliency pass needs input gradients, not weight gradients).
Derivatives of third order are not supported (``once_differentiable``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

__all__ = ["Conv2dFunction", "fast_conv_double_backward", "conv2d_fast_double_backward"]

_aten = torch.ops.aten
_Params = Tuple[List[int], List[int], List[int], int]  # stride, padding, dilation, groups


def _conv_input_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, p: _Params) -> torch.Tensor:
    stride, padding, dilation, groups = p
    return _aten.convolution_backward(grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                                      [True, False, False])[0]


def _conv_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, p: _Params) -> torch.Tensor:
    stride, padding, dilation, groups = p
    return _aten.convolution_backward(grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                                      [False, True, False])[1]


def _will_be_used(t: Optional[torch.Tensor]) -> bool:
    """Whether the running backward pass reaches ``t``'s gradient node (e.g. not during an
    ``autograd.grad(..., inputs=images)`` that only wants the input gradient)."""
    if t is None or not t.requires_grad:
        return False
    try:
        return torch._C._will_engine_execute_node(get_gradient_edge(t).node)
    except RuntimeError:
        # raised for a leaf that autograd.grad() captures as one of its `inputs`: it is used
        return True


class _ConvInputGrad(torch.autograd.Function):
    r""":math:`g_x = W^\top \star g_y` with the backward described in the module docstring."""

    @staticmethod
    def forward(ctx, grad_out: torch.Tensor, weight: torch.Tensor, x_like: torch.Tensor, p: _Params) -> torch.Tensor:
        ctx.save_for_backward(grad_out, weight)
        ctx.params = p
        return _conv_input_grad(grad_out, x_like, weight, p)

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_x: torch.Tensor):
        grad_out, weight = ctx.saved_tensors
        stride, padding, dilation, groups = p = ctx.params
        gg_out = gg_w = None
        if ctx.needs_input_grad[0]:
            gg_out = _aten.convolution(gg_x, weight, None, stride, padding, dilation, False, [0, 0], groups)
        if ctx.needs_input_grad[1]:
            gg_w = _conv_weight_grad(grad_out, gg_x, weight, p)
        return gg_out, gg_w, None, None


def _differentiable_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, p: _Params) -> torch.Tensor:
    # Rare path (a create_graph backward that asks for weight gradients, e.g. a gradient
    # penalty on parameters): native autograd of the convolution keeps it differentiable.
    stride, padding, dilation, groups = p
    with torch.enable_grad():
        probe = weight.detach().requires_grad_(True)
        out = _aten.convolution(x, probe, None, stride, padding, dilation, False, [0, 0], groups)
        return torch.autograd.grad(out, probe, grad_out, create_graph=True)[0]


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
        if not torch.is_grad_enabled():  # ordinary backward: one fused native call
            stride, padding, dilation, groups = p
            gx, gw, gb = _aten.convolution_backward(
                grad_out, x, weight, [weight.shape[0]] if need_b else None, stride, padding, dilation, False, [0, 0],
                groups, [need_x, need_w, need_b])
            return gx, gw, gb, None
        gx = _ConvInputGrad.apply(grad_out, weight, x.detach(), p) if need_x else None
        gw = _differentiable_weight_grad(grad_out, x, weight, p) if need_w and _will_be_used(weight) else None
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


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def conv2d_fast_double_backward(*args, **kwargs) -> Optional[torch.Tensor]:
    """``F.conv2d(*args, **kwargs)`` through :class:`Conv2dFunction`, or None when the call is
    not one it handles (string padding, non-4-D input, no gradient needed)."""
    given = dict(zip(_CONV2D_ARGS, args), **kwargs)
    x, weight, bias, stride, padding, dilation, groups = (given.get(n, d) for n, d in zip(_CONV2D_ARGS, _CONV2D_DEFAULTS))
    if isinstance(padding, str) or not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None
    if not (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
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


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _FastConvMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args: Sequence = (), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and torch.is_grad_enabled():
            out = conv2d_fast_double_backward(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def fast_conv_double_backward() -> Iterator[None]:
    """Route the ``F.conv2d`` calls of the enclosed code through :class:`Conv2dFunction`.

    Only the graph built inside matters: a ``backward()`` called after the block still uses
    the fast kernels for the convolutions recorded in it.
    """
    with _FastConvMode():
        yield
