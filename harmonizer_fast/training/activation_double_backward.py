r"""Softmax, GELU and hard sigmoid whose double backward is a closed form (part of
:func:`harmonizer_fast.training.double_backward.fast_double_backward`).

The harmonization loss differentiates a network's input gradient again; GELU's generic second
derivative is ~10 elementwise passes, the softmax's ~6. Here both are one closed-form pair.

**Softmax** :math:`P = \mathrm{softmax}(S)` along rows. Its Jacobian-vector product
(:func:`softmax_vjp`, the backend's fused kernel) is the only softmax formula used, by the
first and by the second derivative:

.. math:: J^\top g = P \odot (g - \langle g, P\rangle), \qquad
          \langle a, b\rangle_i = \textstyle\sum_j a_{ij} b_{ij}.

For the input gradient :math:`g_S = J^\top g` and an upstream :math:`u` of it, with
:math:`c = \langle g, P\rangle`, :math:`\alpha = \langle u, P\rangle`:

.. math:: \bar g = J^\top u, \qquad \bar P = (u - \alpha) \odot g - c \odot u.

**GELU** :math:`y = x\,\Phi(x)`: :math:`y' = \Phi(x) + x\varphi(x)` (the native
``gelu_backward``), :math:`y'' = \varphi(x)\,(2 - x^2)`; for the tanh approximation
:math:`y = \tfrac12 x (1 + t)`, :math:`t = \tanh(k(x + c x^3))`,
:math:`y'' = (1 - t^2)\bigl(k(1 + 3cx^2)(1 - x t k (1 + 3cx^2)) + 3kc x^2\bigr)`. For the
input gradient :math:`g_x = y' \odot g` and an upstream :math:`u`:
:math:`\bar g = y' \odot u`, :math:`\bar x = y'' \odot g \odot u`.

**Hard sigmoid** :math:`y = \min(\max(x/6 + 1/2, 0), 1)`: :math:`y' = 1/6` on :math:`(-3, 3)`,
:math:`y'' = 0`, so :math:`\bar g = y' \odot u` and :math:`\bar x = 0`. PyTorch raises on this
double backward ("derivative for aten::hardsigmoid_backward is not implemented"); routed, the
squeeze-excitation gates of MobileNetV3 and its relatives train with the harmonizer.

Routes (used by the mode in :mod:`.double_backward`): ``softmax`` (``torch``, ``F`` and the
tensor method; not under autocast, whose CUDA policy computes it in float32), ``F.gelu`` and
``F.hardsigmoid`` (``nn.Hardsigmoid``).
Other calls run natively. Third-order derivatives are not supported (``once_differentiable``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from harmonizer_fast._ext import _C
from harmonizer_fast.training._second_order import autocast_dtype, bind, row_dot

__all__ = [
    "GeluFunction",
    "HardsigmoidFunction",
    "SoftmaxFunction",
    "functional_softmax_fast_double_backward",
    "gelu_fast_double_backward",
    "hardsigmoid_fast_double_backward",
    "softmax_fast_double_backward",
]

_aten = torch.ops.aten


def softmax_vjp(grad: torch.Tensor, probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r""":math:`J^\top g = P \odot (g - \langle g, P\rangle)` for :math:`P = \mathrm{softmax}(S)`
    along ``dim`` (one fused native pass)."""
    return _aten._softmax_backward_data(grad, probs, dim, probs.dtype)


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

    #: the saved tensor is the input x, so the forward can return a stand-in for it
    #: (:class:`_ElementwiseFunction`) and add the closed form's x-gradient itself
    saves_input = False

    def both(self, upstream: torch.Tensor, grad: torch.Tensor, saved: torch.Tensor,
             arg) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(vjp(upstream), saved_term(...))`` in one fused pass, or None (then each runs alone)."""
        return None

    def vjp_add(self, grad: torch.Tensor, saved: torch.Tensor, arg, addend: torch.Tensor) -> torch.Tensor:
        """``vjp(grad) + addend`` (may write into ``addend``, a gradient no one else holds)."""
        return addend.add_(self.vjp(grad, saved, arg))


class _SoftmaxRule(_ElementwiseRule):
    r"""Saved :math:`P`; VJP :func:`softmax_vjp`; :math:`\bar P = (u - \alpha) \odot g - c \odot u`."""

    def forward(self, x, dim):
        probs = _aten._softmax(x, dim, False)
        return probs, probs

    def vjp(self, grad, probs, dim):
        return softmax_vjp(grad, probs, dim)

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

    saves_input = True

    def forward(self, x, approximate):
        return _aten.gelu(x, approximate=approximate), x

    def vjp(self, grad, x, approximate):
        return _aten.gelu_backward(grad, x, approximate=approximate)

    def saved_term(self, upstream, grad, x, approximate):
        fused = _fused_gelu_kernel("gelu_second_order_term", upstream, grad, x) if approximate == "none" else None
        if fused is not None:
            return fused[0]
        return _gelu_second_derivative(x, approximate).mul_(upstream).mul_(grad)

    def both(self, upstream, grad, x, approximate):
        return _fused_gelu_kernel("gelu_double_backward", upstream, grad, x, 2) if approximate == "none" else None

    def vjp_add(self, grad, x, approximate, addend):
        fused = _fused_gelu_kernel("gelu_backward_add", addend, grad, x, out=addend) if approximate == "none" else None
        return fused[0] if fused is not None else super().vjp_add(grad, x, approximate, addend)


_GELU_SUFFIX = {torch.float32: "_f32", torch.float64: "_f64"}


def _fused_gelu_kernel(kernel: str, upstream: torch.Tensor, grad: torch.Tensor, x: torch.Tensor,
                       outputs: int = 1, out: Optional[torch.Tensor] = None) -> Optional[Tuple[torch.Tensor, ...]]:
    r"""Exact GELU's second-order terms in one C++ pass (``csrc/gelu_second_order.cpp``, as
    accurate as the torch formulas in float32): ``gelu_second_order_term`` gives
    :math:`y''(x) \odot g \odot u`; ``gelu_double_backward`` (``outputs=2``) gives
    :math:`y'(x) \odot u` too, reading :math:`x` and :math:`u` once for both;
    ``gelu_backward_add`` gives :math:`y'(x) \odot g + u` (the training backward with the closed
    form's x-gradient ``u``; ``out`` may be ``u``). None off the CPU,
    for other dtypes, broadcasting shapes or non-contiguous tensors, or without the extension
    (then the torch formulas run). Non-contiguous inputs (ConvNeXt's permuted blocks) stay on
    the torch formulas: copying them first cost more than the kernel saves (convnext_atto, quiet
    profile: the GELU input-gradient node 50 -> 103 ms per step, 57 ms of it ``copy_``)."""
    tensors = (upstream, grad, x)
    if _C is None or x.dtype not in _GELU_SUFFIX or any(
            t.device.type != "cpu" or t.dtype != x.dtype or t.shape != x.shape or not t.is_contiguous()
            for t in tensors):
        return None
    outs = (out,) if out is not None else tuple(torch.empty(x.shape, dtype=x.dtype) for _ in range(outputs))
    flat = lambda t: t.detach().view(-1).numpy()
    getattr(_C, kernel + _GELU_SUFFIX[x.dtype])(flat(x), flat(grad), flat(upstream), *(flat(o) for o in outs),
                                                torch.get_num_threads())
    return outs


class _HardsigmoidRule(_ElementwiseRule):
    r"""Saved :math:`x`; VJP the native ``hardsigmoid_backward`` (:math:`g / 6` where
    :math:`-3 < x < 3`, else 0); :math:`\bar x = 0`: the function is piecewise linear, so its input
    gradient does not depend on :math:`x` where it is differentiable. PyTorch has no derivative of
    ``hardsigmoid_backward`` at all (its double backward raises), which is what stops the
    harmonizer on the squeeze-excitation gates of MobileNetV3, GhostNet, LCNet, FBNetV3,
    HardCoReNAS, RDNet and VoVNet-eSE natively."""

    def forward(self, x, arg):
        return _aten.hardsigmoid(x), x

    def vjp(self, grad, x, arg):
        return _aten.hardsigmoid_backward(grad, x)

    def saved_term(self, upstream, grad, x, arg):
        return None  # zero, as no tensor


class _ElementwiseInputGrad(torch.autograd.Function):
    r"""An activation's input gradient :math:`J^\top g` (``rule.vjp``) whose backward is
    ``rule.vjp`` of the upstream and ``rule.saved_term``. ``stand_in`` (or None) is the forward's
    stand-in for its input: the saved-tensor term goes to it instead of to ``saved``, so that the
    forward's training backward adds it to its own gradient in one pass (no sum by autograd)."""

    @staticmethod
    def forward(ctx, grad_out: torch.Tensor, saved: torch.Tensor, stand_in: Optional[torch.Tensor],
                rule: _ElementwiseRule, arg) -> torch.Tensor:
        ctx.save_for_backward(grad_out, saved)
        ctx.rule, ctx.arg, ctx.to_stand_in = rule, arg, stand_in is not None
        return rule.vjp(grad_out, saved, arg)

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream: torch.Tensor):
        grad_out, saved = ctx.saved_tensors
        rule, arg = ctx.rule, ctx.arg
        need_saved = ctx.needs_input_grad[2] if ctx.to_stand_in else ctx.needs_input_grad[1]
        gg_out = gg_saved = None
        if ctx.needs_input_grad[0] and need_saved:
            both = rule.both(upstream, grad_out, saved, arg)
            if both is not None:
                gg_out, gg_saved = both
        if gg_out is None:
            gg_out = rule.vjp(upstream, saved, arg) if ctx.needs_input_grad[0] else None
            gg_saved = rule.saved_term(upstream, grad_out, saved, arg) if need_saved else None
        if ctx.to_stand_in:
            return gg_out, None, gg_saved, None, None
        return gg_out, gg_saved, None, None, None


class _ElementwiseFunction(torch.autograd.Function):
    """``rule.forward(x, arg)`` whose input gradient is :class:`_ElementwiseInputGrad` when the
    backward builds a graph (``apply(x, rule, arg)``). Rules that save their input
    (``rule.saves_input``: GELU) return ``(y, stand_in)``, the stand-in an expand of a scalar
    zero (no memory) that takes the closed form's x-gradient; the training backward then
    computes ``rule.vjp_add`` (GELU: one C++ pass instead of ``gelu_backward`` and an add of
    autograd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: _ElementwiseRule, arg):
        y, saved = rule.forward(x, arg)
        ctx.rule, ctx.arg = rule, arg
        if not rule.saves_input:
            ctx.save_for_backward(saved)
            return y
        stand_in = x.new_zeros(()).expand(x.shape)
        ctx.save_for_backward(saved, stand_in)
        ctx.set_materialize_grads(False)
        return y, stand_in

    @staticmethod
    def backward(ctx, grad_out: Optional[torch.Tensor], *grad_stand_in: Optional[torch.Tensor]):
        saved, *stand_in = ctx.saved_tensors
        extra = grad_stand_in[0] if grad_stand_in else None
        if torch.is_grad_enabled():  # the saliency pass: a differentiable input gradient
            if extra is not None:
                raise RuntimeError(_THIRD_ORDER)
            if grad_out is None:
                return None, None, None
            return _ElementwiseInputGrad.apply(grad_out, saved, stand_in[0] if stand_in else None, ctx.rule,
                                               ctx.arg), None, None
        if grad_out is None:
            return extra, None, None
        if extra is None:
            return ctx.rule.vjp(grad_out, saved, ctx.arg), None, None
        return ctx.rule.vjp_add(grad_out, saved, ctx.arg, extra), None, None


_THIRD_ORDER = ("third-order derivatives of an activation are not supported by the fast double backward "
                "(run that part with fast_double_backward off)")


class SoftmaxFunction(_ElementwiseFunction):
    """``torch.softmax(x, dim)``: ``SoftmaxFunction.apply(x, SOFTMAX, dim)``."""


class GeluFunction(_ElementwiseFunction):
    """``F.gelu(x, approximate)``: ``GeluFunction.apply(x, GELU, approximate)[0]`` (and its stand-in)."""


class HardsigmoidFunction(_ElementwiseFunction):
    """``F.hardsigmoid(x)``: ``HardsigmoidFunction.apply(x, HARDSIGMOID, None)``."""


SOFTMAX, GELU, HARDSIGMOID = _SoftmaxRule(), _GeluRule(), _HardsigmoidRule()



_SOFTMAX = (("input", None), ("dim", None), ("dtype", None))  # torch.softmax, Tensor.softmax
_F_SOFTMAX = (("input", None), ("dim", None), ("_stacklevel", 3), ("dtype", None))
_GELU = (("input", None), ("approximate", "none"))
_HARDSIGMOID = (("input", None), ("inplace", False))


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
    return GeluFunction.apply(x, GELU, approximate)[0]



def hardsigmoid_fast_double_backward(*args, **kwargs) -> Optional[torch.Tensor]:
    """``F.hardsigmoid(input, inplace)`` through :class:`HardsigmoidFunction`, or None when the
    call is not one it handles (no gradient, not a float tensor). ``inplace=True`` writes the
    result into ``input`` as the native call does, through a differentiable copy (the function
    keeps its own copy of the input for its backward)."""
    x, inplace = bind(_HARDSIGMOID, args, kwargs)
    if not isinstance(x, torch.Tensor) or not x.requires_grad or not x.is_floating_point():
        return None
    if inplace:
        return x.copy_(HardsigmoidFunction.apply(x.clone(), HARDSIGMOID, None))
    return HardsigmoidFunction.apply(x, HARDSIGMOID, None)


ROUTES = {
    torch.softmax: softmax_fast_double_backward,
    F.softmax: functional_softmax_fast_double_backward,
    torch.Tensor.softmax: softmax_fast_double_backward,
    F.gelu: gelu_fast_double_backward,
    F.hardsigmoid: hardsigmoid_fast_double_backward,
}
