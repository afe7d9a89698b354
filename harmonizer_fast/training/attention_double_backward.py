r"""Attention whose double backward is a closed form (part of
:func:`harmonizer_fast.training.double_backward.fast_double_backward`; softmax and GELU are in
:mod:`.activation_double_backward`, whose names are re-exported here).

The harmonization loss differentiates a network's input gradient again. For a transformer the
generic second-order graph of attention is ~20 ops per layer on (heads x tokens x tokens)
tensors (products, the softmax's double backward, expands, copies). Here it is a closed form
built on the softmax Jacobian-vector product :math:`J^\top g = P \odot (g - \langle g,
P\rangle)` (:func:`~.activation_double_backward.softmax_vjp`), shared by the first and the
second derivative.

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

On the CPU (float32, float64) the forward and the three derivative steps (the saliency pass,
its backward and the training backward) run in C++ (``csrc/attention_second_order.cpp``), one
(batch x head) slice per thread at a time, so that the slice's :math:`P`-sized blocks stay in
the core's cache between its products (torch runs each product over all slices, and the blocks
go to memory in between); the products are the GEMMs of torch's own BLAS, found once by
:func:`_find_blas`. Two choices differ from the torch formulas, with the same values: the
saliency backward recomputes :math:`E` from the saved output instead of keeping it, and, when
the bias needs no gradient and the heap returns freed memory to the OS (no
:func:`harmonizer_fast._memory.keep_freed_memory`, which the Trainer sets on the CPU), pushes
:math:`\bar P` through the softmax itself (:math:`T' = J^\top \bar P`, :math:`\bar Q
\mathrel{+}= s\,T' K`, :math:`\bar K \mathrel{+}= s\,T'^\top Q`): a fresh :math:`P`-sized
tensor then costs its page faults on top of a write and a later read, more than two products on
a slice in cache; with freed memory kept it costs less (ViT-Tiny step, in-process A/B over three
runs: handing :math:`\bar P` over 7-21 ms faster, medians of 13 steps). The torch
formulas here are the specification and run everywhere else (other devices and dtypes, no
extension, no BLAS found).

Layouts: timm's attention takes q, k, v as views of one qkv projection (``unbind`` of a
permuted reshape) and transposes its output back. The kernels read strided operands in place
(any strides but a unit column stride) and write the gradients of q, k, v as slices of one new
tensor of the projection's layout (:func:`_grad_buffers`). The mode routes ``unbind`` through
:class:`_Unbind`, whose backward stacks such slices as a view (:class:`_StackGrads`), so that
the gradients go back through the unbind and the reshapes without a copy (natively a stack and
a reshape copy per layer in each of the three backward passes, and a contiguous copy of each
operand). The closed form's :math:`\bar Q, \bar K, \bar V` reach the training backward through
stand-in outputs of :class:`AttentionFunction`, which adds its own gradients to them in place
(no sum by autograd, the layout kept). The G' of the closed form takes G's layout, so it too
goes back through the output's transpose and reshape as views.

Route (used by the mode in :mod:`.double_backward`): ``F.scaled_dot_product_attention`` (no
dropout, no grouped-query broadcasting; masks, biases, ``is_causal``, ``scale``; under
autocast in the autocast dtype, as natively) and ``torch.unbind`` / ``Tensor.unbind`` of
differentiable floating-point tensors (any dimension: the same values and gradients as
natively, to any order); other calls run natively. Third-order derivatives of attention are
not supported.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from harmonizer_fast._ext import _C
from harmonizer_fast._memory import keeps_freed_memory
from harmonizer_fast.training._second_order import autocast_dtype, bind, needs_grad, row_dot, will_be_used
from harmonizer_fast.training.activation_double_backward import (  # re-exported: their former home
    GeluFunction,
    SoftmaxFunction,
    functional_softmax_fast_double_backward,
    gelu_fast_double_backward,
    softmax_fast_double_backward,
    softmax_vjp,
)

__all__ = [
    "AttentionFunction",
    "GeluFunction",
    "SoftmaxFunction",
    "functional_softmax_fast_double_backward",
    "gelu_fast_double_backward",
    "scaled_dot_product_attention_fast_double_backward",
    "softmax_fast_double_backward",
]

_aten = torch.ops.aten


def _bmm(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``add + alpha * a @ b`` for 3-D tensors in one GEMM call (``add`` None: no term)."""
    if add is None:
        return torch.bmm(a, b) if alpha == 1.0 else torch.baddbmm(a.new_zeros(()), a, b, beta=0.0, alpha=alpha)
    return torch.baddbmm(add, a, b, alpha=alpha)


def _scores_grad(g: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    r""":math:`E = G V^\top - \langle G, O\rangle` (batched 3-D operands; :math:`dS = P \odot E`)."""
    return torch.bmm(g, v.transpose(1, 2)).sub_(row_dot(g, out))


def _as_batched(t: torch.Tensor) -> torch.Tensor:
    """(..., rows, cols) -> (batch, rows, cols) for the torch formulas (a copy for views that
    do not flatten)."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _as_slices(t: torch.Tensor) -> torch.Tensor:
    """(..., rows, cols) -> a 4-D (outer, inner, rows, cols) view for the C++ kernels, which take
    any strides but a unit column stride and a row stride of at least the columns (a copy
    otherwise, and for more than two leading dimensions that do not flatten)."""
    if t.dim() < 4:
        t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    elif t.dim() > 4:
        t = t.reshape((-1,) + tuple(t.shape[-3:]))
    return t if _rows_as_matrices(t) else t.contiguous()


def _rows_as_matrices(t: torch.Tensor) -> bool:
    """Whether the kernels' GEMMs can take ``t``'s last two dimensions as matrices: a unit column
    stride and a row stride (their leading dimension) of at least the columns."""
    rows, cols = t.shape[-2:]
    return (cols <= 1 or t.stride(-1) == 1) and (rows <= 1 or t.stride(-2) >= cols)


def _kernel_writable(t: torch.Tensor) -> bool:
    """Whether :func:`_as_slices` of ``t`` is a view (the kernels can write into ``t``)."""
    return t.dim() <= 4 and _rows_as_matrices(t)


def _out_slices(t: torch.Tensor):
    """:func:`_as_slices` of an output buffer of :func:`_grad_buffers` (or a contiguous one), as
    the kernels' array: always a view, never a copy (which would lose what is written)."""
    view = _as_slices(t)
    if view.data_ptr() != t.data_ptr():
        raise RuntimeError("attention kernels: an output buffer is not a view of its slices")
    return view.detach().numpy()


def _output_buffer(q: torch.Tensor, value_dim: int) -> torch.Tensor:
    """An uninitialized attention output (..., L, value_dim) whose three outer dimensions of a 4-D
    ``q`` are laid out in ``q``'s order (largest stride outermost), as the native CPU kernel lays
    out its output: for timm's q, a (B, H, N, d) view of a (B, N, 3, H, d) projection, the output
    is a (B, H, N, d) view of a dense (B, N, H, d) tensor, so that the model's
    ``transpose(1, 2).reshape(B, N, C)`` is a view instead of a copy (0.1-0.5 ms per ViT-Tiny
    layer). Other ranks: contiguous (the kernels take more than two leading dimensions only when
    they flatten)."""
    shape = q.shape[:-1] + (value_dim,)
    if q.dim() != 4:
        return q.new_empty(shape)
    order = sorted(range(3), key=lambda d: -q.stride(d))  # stable: ties keep their order
    dense = q.new_empty(tuple(shape[d] for d in order) + (value_dim,))
    return dense.permute(*(order.index(d) for d in range(3)), 3)


def _stacked_layout(parts) -> Optional[int]:
    """The storage step between ``parts`` when they are the slices 0, 1, ... along one dimension
    of a non-overlapping, dense tensor (``t.unbind(d)`` of such a ``t``: timm's q, k, v from one
    qkv projection), else None."""
    if len(parts) < 2 or any(p is None for p in parts):
        return None
    first = parts[0]
    if first.numel() == 0 or first.layout != torch.strided:
        return None
    base = first.data_ptr() - first.storage_offset() * first.element_size()
    for p in parts[1:]:
        if (p.shape != first.shape or p.stride() != first.stride() or p.dtype != first.dtype
                or p.device != first.device or p.data_ptr() - p.storage_offset() * p.element_size() != base):
            return None
    step = parts[1].storage_offset() - first.storage_offset()
    if step <= 0 or any(p.storage_offset() - first.storage_offset() != i * step for i, p in enumerate(parts)):
        return None
    sizes, strides = (len(parts),) + tuple(first.shape), (step,) + tuple(first.stride())
    expected = 1  # dense: sorted by stride, each stride is the product of the smaller dimensions
    for stride, size in sorted((st, sz) for sz, st in zip(sizes, strides) if sz != 1):
        if stride != expected:
            return None
        expected *= size
    return step


def _grad_buffers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Uninitialized tensors for the gradients of ``q``, ``k``, ``v``: when the three are slices
    of one dense tensor (:func:`_stacked_layout`), slices of one new tensor of that layout, so
    that autograd's way back through the unbind and the reshapes before it is views, not copies
    (:class:`_StackGrads`); else one contiguous tensor each."""
    step = _stacked_layout((q, k, v)) if _kernel_writable(q) else None
    if step is None:
        return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    flat = q.new_empty(3 * q.numel())
    return tuple(flat.as_strided(q.shape, q.stride(), i * step) for i in range(3))


class _StackGrads(torch.autograd.Function):
    """``torch.stack(grads, dim)`` (None: zeros of ``shape``), the backward of :class:`_Unbind`:
    a view instead of a copy when the gradients are the slices of one dense tensor (the
    attention gradients of :func:`_grad_buffers`)."""

    @staticmethod
    def forward(ctx, dim: int, shape, *grads):
        ctx.dim, ctx.present = dim, [g is not None for g in grads]
        step = _stacked_layout(grads)
        if step is not None:
            g = grads[0]
            return g.as_strided(g.shape[:dim] + (len(grads),) + g.shape[dim:],
                                g.stride()[:dim] + (step,) + g.stride()[dim:], g.storage_offset())
        like = next(g for g in grads if g is not None)
        return torch.stack([like.new_zeros(shape) if g is None else g for g in grads], dim)

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *(part if present else None for part, present in zip(grad.unbind(ctx.dim), ctx.present)))


class _Unbind(torch.autograd.Function):
    """``t.unbind(dim)`` whose backward is :class:`_StackGrads` (native autograd's stacks a
    copy, and the reshape of timm's qkv projection before it copies again)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, dim: int):
        ctx.dim = dim
        ctx.part_shape = t.shape[:dim] + t.shape[dim + 1:]
        ctx.set_materialize_grads(False)
        return t.unbind(dim)

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return None, None
        return _StackGrads.apply(ctx.dim, ctx.part_shape, *grads), None


_UNBIND = (("input", None), ("dim", 0))


def unbind_fast_double_backward(*args, **kwargs):
    """``torch.unbind(*args, **kwargs)`` through :class:`_Unbind` (differentiable floating-point
    tensors, an integer dimension; None otherwise: the native call)."""
    t, dim = bind(_UNBIND, args, kwargs)
    if not isinstance(t, torch.Tensor) or not t.requires_grad or not t.is_floating_point() or t.dim() == 0:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int) or not -t.dim() <= dim < t.dim() or t.shape[dim] == 0:
        return None  # the native call raises its error (or returns no parts)
    return _Unbind.apply(t, dim % t.dim())


_THIRD_ORDER = "AttentionFunction: third-order derivatives are not supported"
_BLAS_STATE: dict = {}


def _find_blas() -> bool:
    """Hands the Fortran ``sgemm_``/``dgemm_`` of the BLAS torch runs on (MKL inside
    ``libtorch_cpu``) to the C++ kernels, once, and checks them on a small product against
    torch; False (the torch formulas are used) where they are not found or disagree."""
    if "ok" in _BLAS_STATE:
        return _BLAS_STATE["ok"]
    _BLAS_STATE["ok"] = False
    if _C is None or not hasattr(_C, "attention_set_blas"):
        return False
    addresses = None
    for path in (os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"), None):
        try:
            lib = ctypes.CDLL(path)
            addresses = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in ("sgemm_", "dgemm_")]
            break
        except (OSError, AttributeError, TypeError):  # TypeError: no process-wide handle (Windows)
            continue
    if addresses is None:
        return False
    _C.attention_set_blas(*addresses)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        q, k, v, g = (torch.randn(2, 5, 3, generator=gen, dtype=dtype) for _ in range(4))
        probs, grad_p = (torch.softmax(torch.randn(2, 5, 5, generator=gen, dtype=dtype), -1) for _ in range(2))
        got = [torch.empty_like(t) for t in (q, k, v)]
        got.append(_slice_backward(g, grad_p, q, k, v, probs, 0.5, *got, True))
        t = softmax_vjp(torch.bmm(g, v.transpose(1, 2)).add_(grad_p), probs)
        expected = (0.5 * torch.bmm(t, k), 0.5 * torch.bmm(t.transpose(1, 2), q), torch.bmm(probs.transpose(1, 2), g), t)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        if not all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in zip(got, expected)):
            _C.attention_set_blas(0, 0)
            return False
    _BLAS_STATE["ok"] = True
    return True


_SLICE_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _slice_kernels(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """The C++ kernels' dtype suffix when they apply to these tensors (CPU, float32/float64, one
    dtype, not empty; None entries are skipped), else None."""
    present = [t for t in tensors if t is not None]
    if _C is None:
        return None
    dtype = present[0].dtype
    if dtype not in _SLICE_SUFFIX or any(t.device.type != "cpu" or t.dtype != dtype for t in present):
        return None
    # empty operands stay in torch: a BLAS rejects a zero leading dimension
    if any(t.numel() == 0 for t in present) or not (_BLAS_STATE.get("ok") or _find_blas()):
        return None
    return _SLICE_SUFFIX[dtype]


def _numpy(t: Optional[torch.Tensor], slices: bool = False):
    """``t`` as the kernels' array (None stays None); ``slices``: as its 4-D :func:`_as_slices`."""
    if t is None:
        return None
    return (_as_slices(t) if slices else t).detach().numpy()


def _slice_backward(g, grad_p, q, k, v, probs, scale: float, out_q, out_k, out_v, need_t: bool,
                    add=(False, False, False)):
    """:meth:`AttentionFunction.backward`'s training branch in C++: writes (``add``: adds) the
    gradients of q, k, v into ``out_q``, ``out_k``, ``out_v`` (None: not wanted) and returns the
    softmax's gradient T when ``need_t``, else None."""
    suffix = _SLICE_SUFFIX[q.dtype]
    out_t = torch.empty_like(probs) if need_t else None
    outs = (None if o is None else _out_slices(o) for o in (out_q, out_k, out_v))
    getattr(_C, "attention_backward_" + suffix)(
        _numpy(g, True), _numpy(grad_p), _numpy(q, True), _numpy(k, True), _numpy(v, True), _numpy(probs),
        scale, *outs, _numpy(out_t), *add, torch.get_num_threads())
    return out_t


class _AttentionInputGrad(torch.autograd.Function):
    r"""The attention input gradient :math:`(dQ, dK, dV)` (and :math:`dS` when the bias gradient
    is needed) with the closed-form backward of the module docstring. ``aliases`` are
    :class:`AttentionFunction`'s stand-ins for q, k, v: the backward's :math:`\bar Q, \bar K,
    \bar V` go to them, so that the training backward adds its gradients to them in place (no
    sum by autograd, and their layout is kept)."""

    @staticmethod
    def forward(ctx, grad_out, q, k, v, out, probs, alias_q, alias_k, alias_v, scale: float, need_scores: bool,
                fold_probs: bool):
        suffix = _slice_kernels(grad_out, q, k, v, out, probs)
        if suffix is not None:  # E is recomputed by the backward's kernel, from O
            grad_q, grad_k, grad_v = _grad_buffers(q, k, v)
            grad_s = torch.empty_like(probs) if need_scores else None
            getattr(_C, "attention_input_grad_" + suffix)(
                *(_numpy(t, True) for t in (grad_out, q, k, v, out)), _numpy(probs), scale,
                *(_out_slices(t) for t in (grad_q, grad_k, grad_v)), _numpy(grad_s), torch.get_num_threads())
            ctx.save_for_backward(grad_out, q, k, v, probs, out)
        else:
            g, q3, k3, v3, o3 = (_as_batched(t) for t in (grad_out, q, k, v, out))
            grad_v = torch.bmm(probs.transpose(1, 2), g).view(v.shape)
            e = _scores_grad(g, v3, o3)
            grad_s = probs * e
            grad_q = _bmm(grad_s, k3, scale).view(q.shape)
            grad_k = _bmm(grad_s.transpose(1, 2), q3, scale).view(k.shape)
            ctx.save_for_backward(grad_out, q, k, v, probs, e)
        ctx.e_saved = suffix is None
        ctx.fold_probs = fold_probs
        ctx.scale = scale
        return grad_q, grad_k, grad_v, grad_s if need_scores else None

    @staticmethod
    def backward(ctx, up_q, up_k, up_v, up_s):
        # a graph of this backward would be attention's third derivative, which nothing here
        # covers (and the P-gradient folded into Q', K' would bypass the forward node's check)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (up_q, up_k, up_v, up_s)):
            raise RuntimeError(_THIRD_ORDER)
        with torch.no_grad():
            gg_out, gg_q, gg_k, gg_v, gg_probs = _AttentionInputGrad._backward(ctx, up_q, up_k, up_v, up_s)
        return gg_out, None, None, None, None, gg_probs, gg_q, gg_k, gg_v, None, None, None

    @staticmethod
    def _backward(ctx, up_q, up_k, up_v, up_s):
        g, q, k, v, probs, e_or_out = ctx.saved_tensors
        s = ctx.scale
        up_s = None if up_s is None else up_s.contiguous()
        suffix = None if ctx.e_saved else _slice_kernels(g, q, k, v, probs, e_or_out, up_q, up_k, up_v, up_s)
        if suffix is not None:
            has_w = up_q is not None or up_k is not None or up_s is not None
            has_p, fold = has_w or up_v is not None, ctx.fold_probs
            buffers = _grad_buffers(q, k, v)
            # G' in G's layout (a transposed view in timm's attention), so that it goes back
            # through the saliency graph's reshapes as views
            gg_out = None
            if has_p:
                gg_out = torch.empty_like(g)
                gg_out = gg_out if _kernel_writable(gg_out) else torch.empty(g.shape, dtype=g.dtype)
            gg_q = buffers[0] if up_k is not None or (fold and has_p) else None
            gg_k = buffers[1] if up_q is not None or (fold and has_p) else None
            gg_v = buffers[2] if has_w else None
            gg_probs = torch.empty_like(probs) if has_p and not fold else None
            getattr(_C, "attention_input_grad_backward_" + suffix)(
                *(_numpy(t, True) for t in (g, q, k, v, e_or_out)), _numpy(probs),
                *(_numpy(t, True) for t in (up_q, up_k, up_v)), _numpy(up_s), s, fold,
                *(None if t is None else _out_slices(t) for t in (gg_out, gg_q, gg_k, gg_v)), _numpy(gg_probs),
                torch.get_num_threads())
            return gg_out, gg_q, gg_k, gg_v, gg_probs
        q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
        g, q, k, v = (_as_batched(t) for t in (g, q, k, v))
        up_q, up_k, up_v = (None if t is None else _as_batched(t) for t in (up_q, up_k, up_v))
        e = e_or_out if ctx.e_saved else _scores_grad(g, v, _as_batched(e_or_out))
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
        return gg_out, gg_q, gg_k, gg_v, gg_probs


class AttentionFunction(torch.autograd.Function):
    r""":math:`\mathrm{softmax}(s\,Q K^\top + B)\,V` for ``q`` (..., L, E), ``k`` (..., S, E),
    ``v`` (..., S, Ev) with the same leading dimensions (any strides) and an additive ``bias``
    broadcastable to (..., L, S) or None; ``safe``: rows whose scores are all :math:`-\infty`
    give zeros (``torch``'s masked softmax) instead of NaN.

    Returns the output (in q's dimension order on the C++ kernels, as natively:
    :func:`_output_buffer`) and four hidden outputs for the closed-form
    backward of :class:`_AttentionInputGrad`: :math:`P` (batch, L, S), through which it hands
    its :math:`\bar P` to this node's backward (module docstring), and stand-ins for q, k, v
    (expands of a scalar zero: no memory; their gradients are added to those of q, k, v)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, safe: bool):
        scores_shape = q.shape[:-1] + (k.shape[-2],)
        suffix = _slice_kernels(q, k, v)
        kernels = suffix is not None and (bias is None or (bias.device == q.device and bias.dtype == q.dtype))
        out = _output_buffer(q, v.shape[-1]) if kernels else q.new_empty(q.shape[:-1] + (v.shape[-1],))
        if kernels:
            full_bias = None if bias is None else bias.expand(scores_shape).contiguous().view(-1, *scores_shape[-2:])
            probs = q.new_empty((math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2]))
            getattr(_C, "attention_forward_" + suffix)(
                _numpy(q, True), _numpy(k, True), _numpy(v, True), _numpy(full_bias), scale, safe, _out_slices(out),
                _numpy(probs), torch.get_num_threads())
        else:
            q3, k3, v3 = _as_batched(q), _as_batched(k), _as_batched(v)
            if bias is None:
                scores = _bmm(q3, k3.transpose(1, 2), scale)
            else:
                scores = q3.new_empty((q3.shape[0], q3.shape[1], k3.shape[1]))
                scores.view(scores_shape).copy_(bias)
                scores.baddbmm_(q3, k3.transpose(1, 2), alpha=scale)
            probs = _aten._safe_softmax(scores, -1) if safe else _aten._softmax(scores, -1, False)
            torch.bmm(probs, v3, out=out.view(-1, *out.shape[-2:]))
        aliases = tuple(t.new_zeros(()).expand(t.shape) for t in (q, k, v))
        ctx.save_for_backward(q, k, v, bias, out, probs, *aliases)
        ctx.scale = scale
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.set_materialize_grads(False)
        return (out, probs, *aliases)

    @staticmethod
    def backward(ctx, grad_out, grad_probs, *grad_aliases):
        q, k, v, bias, out, probs, *aliases = ctx.saved_tensors
        scale = ctx.scale
        need = ctx.needs_input_grad[:3]
        need_bias = ctx.needs_input_grad[3]
        if torch.is_grad_enabled():  # the saliency pass: a differentiable input gradient
            if grad_probs is not None or any(t is not None for t in grad_aliases):
                raise RuntimeError(_THIRD_ORDER)
            if grad_out is None:
                return None, None, None, None, None, None
            need_scores = need_bias and will_be_used(bias)
            grad_q, grad_k, grad_v, grad_s = _AttentionInputGrad.apply(
                grad_out, q, k, v, out.detach(), probs, *aliases, scale, need_scores,
                not need_bias and not keeps_freed_memory())
            grad_bias = None
            if need_scores:
                grad_bias = grad_s.view(q.shape[:-1] + (k.shape[-2],)).sum_to_size(ctx.bias_shape)
            return (grad_q if need[0] else None, grad_k if need[1] else None, grad_v if need[2] else None,
                    grad_bias, None, None)
        # the training backward: the output gradient and the closed form's P-, Q-, K- and
        # V-gradients (grad_probs, grad_aliases) together
        g, grad_p = grad_out, grad_probs
        if g is None and grad_p is None:
            return (*(a if n else None for a, n in zip(grad_aliases, need)), None, None, None)
        if grad_p is not None:
            grad_p = grad_p.contiguous()
        if _slice_kernels(g, grad_p, q, k, v, probs) is not None:
            outs, add, (grad_q, grad_k, grad_v) = _training_grad_outputs(q, k, v, grad_aliases, need, g is not None)
            t = _slice_backward(g, grad_p, q, k, v, probs, scale, *outs, need_bias, add)
        else:
            q3, k3, v3 = _as_batched(q), _as_batched(k), _as_batched(v)
            g3 = None if g is None else _as_batched(g)
            if g3 is not None:
                grad_p = _bmm(g3, v3.transpose(1, 2), add=grad_p)
            t = softmax_vjp(grad_p, probs)
            grad_q = _bmm(t, k3, scale).view(q.shape) if need[0] else None
            grad_k = _bmm(t.transpose(1, 2), q3, scale).view(k.shape) if need[1] else None
            grad_v = torch.bmm(probs.transpose(1, 2), g3).view(v.shape) if need[2] and g3 is not None else None
            grad_q, grad_k, grad_v = (
                None if not n else a if x is None else x if a is None else x.add_(a)
                for x, a, n in zip((grad_q, grad_k, grad_v), grad_aliases, need))
        grad_bias = t.view(q.shape[:-1] + (k.shape[-2],)).sum_to_size(ctx.bias_shape) if need_bias else None
        return grad_q, grad_k, grad_v, grad_bias, None, None


def _training_grad_outputs(q, k, v, grad_aliases, need, has_g: bool):
    """Where the C++ training backward writes the gradients of q, k, v: ``(outs, add, grads)``,
    the kernel's output arrays (None: not computed), whether it adds onto them, and the gradients
    to return. The closed form's gradients of the stand-ins, when given, are added onto in place
    (this backward's own fresh buffers, of :func:`_grad_buffers` layout); else new
    :func:`_grad_buffers`. dV needs the output gradient G."""
    fresh = None
    stacked = _stacked_layout(grad_aliases) is not None  # non-overlapping: safe to write into
    outs, add, grads = [], [], []
    for i, (alias_grad, wanted) in enumerate(zip(grad_aliases, need)):
        computed = wanted and (i < 2 or has_g)
        if wanted and alias_grad is not None:
            if not (alias_grad.is_contiguous() or (stacked and _kernel_writable(alias_grad))):
                alias_grad = alias_grad.contiguous()  # a layout the kernels cannot write in place
            grad = alias_grad
        elif computed:
            fresh = _grad_buffers(q, k, v) if fresh is None else fresh
            grad = fresh[i]
        else:
            grad = None
        outs.append(grad if computed else None)
        add.append(computed and alias_grad is not None)
        grads.append(grad)
    return outs, add, grads


_SDPA = (("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
         ("is_causal", False), ("scale", None), ("enable_gqa", False))


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
    if any(t.numel() == 0 for t in tensors):
        return None  # nothing to attend to (or nothing asked): the native call's zeros
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
    with torch.autocast(q.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        out = AttentionFunction.apply(q, k, v, bias, scale, mask is not None)[0]
    return out


ROUTES = {
    F.scaled_dot_product_attention: scaled_dot_product_attention_fast_double_backward,
    torch.unbind: unbind_fast_double_backward,
    torch.Tensor.unbind: unbind_fast_double_backward,
}
