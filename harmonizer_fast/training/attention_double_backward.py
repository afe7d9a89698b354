r"""Attention, softmax and GELU whose double backward is a closed form (the transformer half of
:func:`harmonizer_fast.training.double_backward.fast_double_backward`).

The harmonization loss differentiates a network's input gradient again. For a transformer the
generic second-order graph of attention is ~20 ops per layer on (heads x tokens x tokens)
tensors (products, the softmax's double backward, expands, copies) and GELU's second
derivative is ~10 elementwise passes. Here both are closed forms.

**Softmax** :math:`P = \mathrm{softmax}(S)` along rows. Its Jacobian-vector product
(:func:`_softmax_vjp`, the backend's fused kernel) is the only softmax formula used, by the
first and by the second derivative:

.. math:: J^\top g = P \odot (g - \langle g, P\rangle), \qquad
          \langle a, b\rangle_i = \textstyle\sum_j a_{ij} b_{ij}.

For the input gradient :math:`g_S = J^\top g` and an upstream :math:`u` of it, with
:math:`c = \langle g, P\rangle`, :math:`\alpha = \langle u, P\rangle`:

.. math:: \bar g = J^\top u, \qquad \bar P = (u - \alpha) \odot g - c \odot u.

**Attention** :math:`O = P V`, :math:`P = \mathrm{softmax}(S)`, :math:`S = s\,Q K^\top + B`
(scale :math:`s`, additive bias or mask :math:`B`; per batch and head). For an output gradient
:math:`G`, the input gradient (the saliency pass) is

.. math::

    dV = P^\top G, \quad dP = G V^\top, \quad E = dP - \langle G, O\rangle, \quad
    dS = P \odot E, \quad dQ = s\, dS\, K, \quad dK = s\, dS^\top Q

(:math:`\langle G, O\rangle = \langle dP, P\rangle`). Its backward, for upstreams
:math:`U_Q, U_K, U_V` (and :math:`U_S` when the bias gradient is itself differentiated), with
:math:`W = s\,(U_Q K^\top + Q U_K^\top) + U_S`, :math:`W_c = W - \langle W, P\rangle` and
:math:`Z = P \odot W_c = J^\top W`:

.. math::

    \bar G = Z V + P U_V, \quad \bar V = Z^\top G, \quad
    \bar Q = s\, dS\, U_K, \quad \bar K = s\, dS^\top U_Q, \quad
    \bar P = G U_V^\top + W_c \odot E

(:math:`\bar P` up to the row-constant :math:`-\langle W, P\rangle\langle G, O\rangle`, which
the softmax Jacobian maps to zero: :math:`\bar P` only reaches :math:`S` through
:math:`J^\top`). :math:`\bar P` is not pushed through the softmax here: :class:`AttentionFunction`
returns :math:`P` as a hidden second output, so :math:`\bar P` is added by autograd to the
gradient the training backward brings to :math:`P` and both go through one :math:`J^\top`
and one pair of products :math:`s\,T K`, :math:`s\,T^\top Q`, :math:`T = J^\top(\cdot)`, as
in the generic graph. 18 batched products per layer and step, as natively; ~10 passes over
the :math:`P`-sized tensors instead of ~20, and fewer of them saved (:math:`P`, :math:`E`;
natively :math:`P`, :math:`dP`, :math:`dS`).

**GELU** :math:`y = x\,\Phi(x)`: :math:`y' = \Phi(x) + x\varphi(x)` (the native
``gelu_backward``), :math:`y'' = \varphi(x)\,(2 - x^2)`; for the tanh approximation
:math:`y = \tfrac12 x (1 + t)`, :math:`t = \tanh(k(x + c x^3))`,
:math:`y'' = (1 - t^2)\bigl(k(1 + 3cx^2)(1 - x t k (1 + 3cx^2)) + 3kc x^2\bigr)`. For the
input gradient :math:`g_x = y' \odot g` and an upstream :math:`u`:
:math:`\bar g = y' \odot u`, :math:`\bar x = y'' \odot g \odot u`.

Routes (used by the mode in :mod:`.double_backward`): ``F.scaled_dot_product_attention`` (no
dropout, no grouped-query broadcasting; masks, biases, ``is_causal``, ``scale``; under
autocast in the autocast dtype, as natively), ``softmax`` (``torch``, ``F`` and the tensor
method; not under autocast, whose CUDA policy computes it in float32) and ``F.gelu``. Other
calls run natively. Third-order derivatives are not supported (``once_differentiable``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from harmonizer_fast.training._second_order import autocast_dtype, bind, needs_grad, row_dot, will_be_used

__all__ = [
    "AttentionFunction",
    "GeluFunction",
    "SoftmaxFunction",
    "gelu_fast_double_backward",
    "scaled_dot_product_attention_fast_double_backward",
    "softmax_fast_double_backward",
]

_aten = torch.ops.aten


def _softmax_vjp(grad: torch.Tensor, probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r""":math:`J^\top g = P \odot (g - \langle g, P\rangle)` for :math:`P = \mathrm{softmax}(S)`
    along ``dim`` (one fused native pass)."""
    return _aten._softmax_backward_data(grad, probs, dim, probs.dtype)


def _bmm(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``add + alpha * a @ b`` for 3-D tensors in one GEMM call (``add`` None: no term)."""
    if add is None:
        return torch.bmm(a, b) if alpha == 1.0 else torch.baddbmm(a.new_zeros(()), a, b, beta=0.0, alpha=alpha)
    return torch.baddbmm(add, a, b, alpha=alpha)


# --------------------------------------------------------------------------- softmax and GELU

class _ElementwiseRule:
    """An activation :math:`y = f(x)` along one saved tensor (softmax: :math:`P`; GELU:
    :math:`x`): its forward, its vector-Jacobian product, and the derivative of that product
    with respect to the saved tensor (``arg``: the softmax ``dim``, GELU's ``approximate``)."""

    def forward(self, x: torch.Tensor, arg) -> Tuple[torch.Tensor, torch.Tensor]:  # (y, saved)
        raise NotImplementedError

    def vjp(self, grad: torch.Tensor, saved: torch.Tensor, arg) -> torch.Tensor:
        raise NotImplementedError

    def saved_term(self, upstream: torch.Tensor, grad: torch.Tensor, saved: torch.Tensor, arg) -> torch.Tensor:
        raise NotImplementedError


class _SoftmaxRule(_ElementwiseRule):
    r"""Saved :math:`P`; VJP :func:`_softmax_vjp`; :math:`\bar P = (u - \alpha) \odot g - c \odot u`."""

    def forward(self, x, dim):
        probs = _aten._softmax(x, dim, False)
        return probs, probs

    def vjp(self, grad, probs, dim):
        return _softmax_vjp(grad, probs, dim)

    def saved_term(self, upstream, grad, probs, dim):
        alpha, c = row_dot(upstream, probs, dim), row_dot(grad, probs, dim)
        return (upstream - alpha).mul_(grad).addcmul_(c, upstream, value=-1.0)


_LOG_INV_SQRT_2PI = -0.5 * math.log(2.0 * math.pi)
_TANH_K, _TANH_C = math.sqrt(2.0 / math.pi), 0.044715


def _gelu_second_derivative(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """:math:`y''(x)` of the module docstring (a new tensor)."""
    if approximate == "none":  # 4 passes: exp(log(1/sqrt(2 pi)) - x^2/2) (2 - x^2)
        pdf = torch.addcmul(x.new_tensor(_LOG_INV_SQRT_2PI), x, x, value=-0.5).exp_()
        return pdf.mul_(torch.addcmul(x.new_tensor(2.0), x, x, value=-1.0))
    x2 = x.square()
    inner_slope = x2.mul(3.0 * _TANH_C * _TANH_K).add_(_TANH_K)            # k (1 + 3 c x^2)
    t = torch.tanh(x * (x2 * _TANH_C + 1.0) * _TANH_K)
    out = (x * t).mul_(inner_slope).neg_().add_(1.0).mul_(inner_slope)    # k'(1 - x t k')
    out.add_(x2, alpha=3.0 * _TANH_K * _TANH_C)
    return out.mul_(t.square_().neg_().add_(1.0))


class _GeluRule(_ElementwiseRule):
    r"""Saved :math:`x`; VJP the native ``gelu_backward``; :math:`\bar x = y''(x) \odot g \odot u`."""

    def forward(self, x, approximate):
        return _aten.gelu(x, approximate=approximate), x

    def vjp(self, grad, x, approximate):
        return _aten.gelu_backward(grad, x, approximate=approximate)

    def saved_term(self, upstream, grad, x, approximate):
        return _gelu_second_derivative(x, approximate).mul_(upstream).mul_(grad)


class _ElementwiseInputGrad(torch.autograd.Function):
    r"""An activation's input gradient :math:`J^\top g` (``rule.vjp``) whose backward is
    ``rule.vjp`` of the upstream and ``rule.saved_term``."""

    @staticmethod
    def forward(ctx, grad_out: torch.Tensor, saved: torch.Tensor, rule: _ElementwiseRule, arg) -> torch.Tensor:
        ctx.save_for_backward(grad_out, saved)
        ctx.rule, ctx.arg = rule, arg
        return rule.vjp(grad_out, saved, arg)

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream: torch.Tensor):
        grad_out, saved = ctx.saved_tensors
        rule, arg = ctx.rule, ctx.arg
        gg_out = rule.vjp(upstream, saved, arg) if ctx.needs_input_grad[0] else None
        gg_saved = rule.saved_term(upstream, grad_out, saved, arg) if ctx.needs_input_grad[1] else None
        return gg_out, gg_saved, None, None


class _ElementwiseFunction(torch.autograd.Function):
    """``rule.forward(x, arg)`` whose input gradient is :class:`_ElementwiseInputGrad` when the
    backward builds a graph (``apply(x, rule, arg)``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: _ElementwiseRule, arg) -> torch.Tensor:
        y, saved = rule.forward(x, arg)
        ctx.save_for_backward(saved)
        ctx.rule, ctx.arg = rule, arg
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (saved,) = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return ctx.rule.vjp(grad_out, saved, ctx.arg), None, None
        return _ElementwiseInputGrad.apply(grad_out, saved, ctx.rule, ctx.arg), None, None


class SoftmaxFunction(_ElementwiseFunction):
    """``torch.softmax(x, dim)``: ``SoftmaxFunction.apply(x, SOFTMAX, dim)``."""


class GeluFunction(_ElementwiseFunction):
    """``F.gelu(x, approximate)``: ``GeluFunction.apply(x, GELU, approximate)``."""


SOFTMAX, GELU = _SoftmaxRule(), _GeluRule()


# --------------------------------------------------------------------------- attention

def _as_batched(t: torch.Tensor) -> torch.Tensor:
    """(..., rows, cols) -> (batch, rows, cols), a view for the contiguous tensors used here."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


class _AttentionInputGrad(torch.autograd.Function):
    r"""The attention input gradient :math:`(dQ, dK, dV)` (and :math:`dS` when the bias gradient
    is needed) with the closed-form backward of the module docstring."""

    @staticmethod
    def forward(ctx, grad_out, q, k, v, out, probs, scale: float, need_scores: bool):
        g, q3, k3, v3, o3 = (_as_batched(t) for t in (grad_out, q, k, v, out))
        grad_v = torch.bmm(probs.transpose(1, 2), g)
        e = torch.bmm(g, v3.transpose(1, 2)).sub_(row_dot(g, o3))  # E = dP - <G, O>
        grad_s = probs * e
        grad_q = _bmm(grad_s, k3, scale)
        grad_k = _bmm(grad_s.transpose(1, 2), q3, scale)
        ctx.save_for_backward(g, q3, k3, v3, probs, e)
        ctx.scale = scale
        ctx.shapes = (q.shape, k.shape, v.shape)
        return (grad_q.view(q.shape), grad_k.view(k.shape), grad_v.view(v.shape),
                grad_s if need_scores else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, up_q, up_k, up_v, up_s):
        g, q, k, v, probs, e = ctx.saved_tensors
        s = ctx.scale
        q_shape, k_shape, v_shape = ctx.shapes
        up_q, up_k, up_v = (None if t is None else _as_batched(t.contiguous()) for t in (up_q, up_k, up_v))
        gg_out = gg_q = gg_k = gg_v = gg_probs = None
        w = None  # W = s (U_Q K^T + Q U_K^T) + U_S
        if up_q is not None:
            w = _bmm(up_q, k.transpose(1, 2), s)
        if up_k is not None:
            w = _bmm(q, up_k.transpose(1, 2), s, add=w)
        if up_s is not None:
            w = up_s.clone() if w is None else w.add_(up_s)
        if w is not None:
            w_centered = w.sub_(row_dot(w, probs))
            z = probs * w_centered  # = J^T W
            gg_out = torch.bmm(z, v)
            gg_v = torch.bmm(z.transpose(1, 2), g)
            gg_probs = w_centered.mul_(e)
        if up_v is not None:
            gg_out = _bmm(probs, up_v, add=gg_out)
            gg_probs = _bmm(g, up_v.transpose(1, 2), add=gg_probs)
        if up_q is not None or up_k is not None:
            grad_s = probs * e
            if up_k is not None:
                gg_q = _bmm(grad_s, up_k, s).view(q_shape)
            if up_q is not None:
                gg_k = _bmm(grad_s.transpose(1, 2), up_q, s).view(k_shape)
        if gg_out is not None:
            gg_out = gg_out.view(q_shape[:-1] + (v_shape[-1],))
        if gg_v is not None:
            gg_v = gg_v.view(v_shape)
        return gg_out, gg_q, gg_k, gg_v, None, gg_probs, None, None


class AttentionFunction(torch.autograd.Function):
    r""":math:`\mathrm{softmax}(s\,Q K^\top + B)\,V` for contiguous ``q`` (..., L, E), ``k``
    (..., S, E), ``v`` (..., S, Ev) with the same leading dimensions and an additive ``bias``
    broadcastable to (..., L, S) or None; ``safe``: rows whose scores are all :math:`-\infty`
    give zeros (``torch``'s masked softmax) instead of NaN.

    Returns the output and :math:`P` (batch, L, S), a hidden output through which the
    closed-form backward of :class:`_AttentionInputGrad` hands its :math:`\bar P` to this
    node's backward (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, safe: bool):
        q3, k3, v3 = _as_batched(q), _as_batched(k), _as_batched(v)
        scores_shape = q.shape[:-1] + (k.shape[-2],)
        if bias is None:
            scores = _bmm(q3, k3.transpose(1, 2), scale)
        else:
            scores = q3.new_empty((q3.shape[0], q3.shape[1], k3.shape[1]))
            scores.view(scores_shape).copy_(bias)
            scores.baddbmm_(q3, k3.transpose(1, 2), alpha=scale)
        probs = _aten._safe_softmax(scores, -1) if safe else _aten._softmax(scores, -1, False)
        out = torch.bmm(probs, v3).view(q.shape[:-1] + (v.shape[-1],))
        ctx.save_for_backward(q, k, v, bias, out, probs)
        ctx.scale = scale
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.set_materialize_grads(False)
        return out, probs

    @staticmethod
    def backward(ctx, grad_out: Optional[torch.Tensor], grad_probs: Optional[torch.Tensor]):
        q, k, v, bias, out, probs = ctx.saved_tensors
        scale = ctx.scale
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # the saliency pass: a differentiable input gradient
            if grad_probs is not None:
                raise RuntimeError("AttentionFunction: third-order derivatives are not supported")
            if grad_out is None:
                return None, None, None, None, None, None
            need_scores = need_bias and will_be_used(bias)
            grad_q, grad_k, grad_v, grad_s = _AttentionInputGrad.apply(
                grad_out.contiguous(), q, k, v, out.detach(), probs, scale, need_scores)
            grad_bias = None
            if need_scores:
                grad_bias = grad_s.view(q.shape[:-1] + (k.shape[-2],)).sum_to_size(ctx.bias_shape)
            return (grad_q if need_q else None, grad_k if need_k else None, grad_v if need_v else None,
                    grad_bias, None, None)
        # the training backward: the output gradient and the closed form's P-gradient together
        q3, k3, v3 = _as_batched(q), _as_batched(k), _as_batched(v)
        g = None if grad_out is None else _as_batched(grad_out.contiguous())
        grad_p = grad_probs
        if g is not None:
            grad_p = _bmm(g, v3.transpose(1, 2), add=grad_p)
        if grad_p is None:
            return None, None, None, None, None, None
        t = _softmax_vjp(grad_p, probs)
        grad_q = _bmm(t, k3, scale).view(q.shape) if need_q else None
        grad_k = _bmm(t.transpose(1, 2), q3, scale).view(k.shape) if need_k else None
        grad_v = torch.bmm(probs.transpose(1, 2), g).view(v.shape) if need_v and g is not None else None
        grad_bias = t.view(q.shape[:-1] + (k.shape[-2],)).sum_to_size(ctx.bias_shape) if need_bias else None
        return grad_q, grad_k, grad_v, grad_bias, None, None


# --------------------------------------------------------------------------- routes

_SDPA = (("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
         ("is_causal", False), ("scale", None), ("enable_gqa", False))
_SOFTMAX = (("input", None), ("dim", None), ("dtype", None))  # torch.softmax, Tensor.softmax
_F_SOFTMAX = (("input", None), ("dim", None), ("_stacklevel", 3), ("dtype", None))
_GELU = (("input", None), ("approximate", "none"))


def scaled_dot_product_attention_fast_double_backward(*args, **kwargs) -> Optional[torch.Tensor]:
    """``F.scaled_dot_product_attention(*args, **kwargs)`` through :class:`AttentionFunction`,
    or None when the call is not one it handles (dropout, grouped-query attention, batch
    dimensions that broadcast, non-float tensors, no gradient needed)."""
    q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = bind(_SDPA, args, kwargs)
    tensors = (q, k, v)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or dropout_p or enable_gqa:
        return None
    if not needs_grad(q, k, v, mask) or q.dim() < 2 or not q.is_floating_point():
        return None
    if q.dtype != k.dtype or q.dtype != v.dtype or q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1]:
        return None  # the native call raises its clear error (or broadcasts)
    if q.shape[-1] != k.shape[-1] or (is_causal and mask is not None):
        return None
    if mask is not None and (not isinstance(mask, torch.Tensor) or (mask.dtype != torch.bool and not mask.is_floating_point())):
        return None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dtype = autocast_dtype(q.device.type)
    if dtype is not None:  # autocast runs attention in its lower precision, the mask included
        q, k, v = (t.to(dtype) for t in tensors)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(dtype)
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril_()
    bias = mask
    if mask is not None and mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    if bias is not None and bias.dtype != q.dtype:
        return None  # the native call raises its dtype error
    try:
        torch.broadcast_shapes(bias.shape if bias is not None else (), q.shape[:-1] + (k.shape[-2],))
    except RuntimeError:
        return None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    with torch.autocast(q.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        out, _ = AttentionFunction.apply(q, k, v, bias, scale, mask is not None)
    return out


def softmax_fast_double_backward(*args, **kwargs) -> Optional[torch.Tensor]:
    """``torch.softmax(input, dim, dtype=None)`` (or the tensor method) through
    :class:`SoftmaxFunction`, or None when the call is not one it handles (implicit ``dim``,
    autocast, no gradient)."""
    x, dim, dtype = bind(_SOFTMAX, args, kwargs)
    return _softmax_route(x, dim, dtype)


def functional_softmax_fast_double_backward(*args, **kwargs) -> Optional[torch.Tensor]:
    """``F.softmax(input, dim, _stacklevel, dtype)``: as :func:`softmax_fast_double_backward`."""
    x, dim, _, dtype = bind(_F_SOFTMAX, args, kwargs)
    return _softmax_route(x, dim, dtype)


def _softmax_route(x, dim, dtype) -> Optional[torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(dim, int) or not x.requires_grad:
        return None
    if not x.is_floating_point() or autocast_dtype(x.device.type) is not None or x.dim() == 0:
        return None
    if dtype is not None:
        x = x.to(dtype)
    return SoftmaxFunction.apply(x, SOFTMAX, dim)


def gelu_fast_double_backward(*args, **kwargs) -> Optional[torch.Tensor]:
    """``F.gelu(input, approximate)`` through :class:`GeluFunction`, or None when the call is not
    one it handles (no gradient, an unknown ``approximate``: the native call raises)."""
    x, approximate = bind(_GELU, args, kwargs)
    if not isinstance(x, torch.Tensor) or not x.requires_grad or approximate not in ("none", "tanh"):
        return None
    return GeluFunction.apply(x, GELU, approximate)


ROUTES = {
    F.scaled_dot_product_attention: scaled_dot_product_attention_fast_double_backward,
    torch.softmax: softmax_fast_double_backward,
    F.softmax: functional_softmax_fast_double_backward,
    torch.Tensor.softmax: softmax_fast_double_backward,
    F.gelu: gelu_fast_double_backward,
}
