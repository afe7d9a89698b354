r"""The ``fast_double_backward`` mode: layers whose double backward is a closed form.

The harmonization loss differentiates the input gradient of the network again, so every
layer's backward is itself differentiated. PyTorch's generic second-order formulas are slow
for the layers that dominate CNNs and ViTs: convolutions (a convolution with the output
gradient as kernel; a per-group loop for depthwise layers), standardizations (~30 elementwise
ops), attention, softmax and GELU. Here each has a closed-form double backward built from the
backend's ordinary kernels.

The layers live in :mod:`.conv_double_backward` (convolutions), :mod:`.norm_double_backward`
(batch and layer norm), :mod:`.attention_double_backward` (attention) and
:mod:`.activation_double_backward` (softmax, GELU); their public names are re-exported here.

The math is unchanged: gradients equal native autograd's (tested in float64 to second order).
:func:`fast_double_backward` is a context manager that routes the ``F.conv2d``, training-mode
``F.batch_norm`` and ``F.layer_norm`` calls made under it (``nn.Conv2d``, ``nn.BatchNorm2d``,
``nn.LayerNorm``, timm's ``Conv2dSame``, ``StdConv2d``, ``BatchNormAct2d``, ``LayerNorm2d``,
functional calls) through :class:`Conv2dFunction`, :class:`BatchNormFunction` and
:class:`LayerNormFunction` while gradients are enabled; string paddings, non-4-D convolutions,
evaluation-mode batch norm and normalization under autocast run natively. The first backward
computes only the gradients the running backward pass uses (the saliency pass needs input
gradients, not weight gradients). Third-order derivatives are not supported
(``once_differentiable``). The same mode routes ``F.scaled_dot_product_attention``, softmax,
``F.gelu`` and ``unbind`` (transformers: the unbind of a qkv projection goes back without a
copy) through :mod:`harmonizer_fast.training.attention_double_backward`,
and ``F.hardsigmoid``, which native autograd cannot differentiate twice at all
(:data:`NATIVE_GAPS_COVERED`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from harmonizer_fast.training import activation_double_backward, attention_double_backward
from harmonizer_fast.training.conv_double_backward import Conv2dFunction, conv2d_fast_double_backward
from harmonizer_fast.training.norm_double_backward import (
    BatchNormFunction,
    LayerNormFunction,
    batch_norm_fast_double_backward,
    layer_norm_fast_double_backward,
)

__all__ = [
    "BatchNormFunction",
    "Conv2dFunction",
    "LayerNormFunction",
    "batch_norm_fast_double_backward",
    "layer_norm_fast_double_backward",
    "conv2d_fast_double_backward",
    "fast_double_backward",
]


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
    **activation_double_backward.ROUTES,
}


#: ops whose double backward PyTorch does not implement but the mode's closed forms cover
#: (autograd's name for the op -> the layer a user knows)
NATIVE_GAPS_COVERED = {"aten::hardsigmoid_backward": "nn.Hardsigmoid / F.hardsigmoid"}


@contextlib.contextmanager
def fast_double_backward() -> Iterator[None]:
    """Route the ``F.conv2d``, training-mode ``F.batch_norm`` and ``F.layer_norm`` calls of the
    enclosed code through :class:`Conv2dFunction`, :class:`BatchNormFunction` and
    :class:`LayerNormFunction`, and its ``F.scaled_dot_product_attention``, softmax and
    ``F.gelu`` calls through :mod:`~harmonizer_fast.training.attention_double_backward`
    (``AttentionFunction``, ``SoftmaxFunction``, ``GeluFunction``) and ``F.hardsigmoid`` through
    ``HardsigmoidFunction`` (whose double backward PyTorch lacks).

    Only the graph built inside matters: a ``backward()`` called after the block still uses
    the fast kernels for the layers recorded in it.
    """
    with _FastConvMode():
        yield
