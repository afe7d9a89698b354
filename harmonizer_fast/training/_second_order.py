"""Helpers shared by the closed-form double-backward layers (:mod:`.double_backward`,
:mod:`.attention_double_backward`): argument binding, autocast state and whether the running
backward pass uses a gradient."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch.autograd.graph import get_gradient_edge


def will_be_used(t: Optional[torch.Tensor]) -> bool:
    """Whether the running backward pass reaches ``t``'s gradient node (e.g. not during an
    ``autograd.grad(..., inputs=images)`` that only wants the input gradient)."""
    if t is None or not t.requires_grad:
        return False
    try:
        return torch._C._will_engine_execute_node(get_gradient_edge(t).node)
    except RuntimeError:
        # raised for a leaf that autograd.grad() captures as one of its `inputs`: it is used
        return True
    except AttributeError:  # pragma: no cover - a torch without this private query: compute it
        return True


def bind(signature: Tuple[Tuple[str, object], ...], args: Sequence, kwargs: dict) -> list:
    """The values of ``signature``'s parameters (name, default) for a call ``f(*args, **kwargs)``."""
    given = dict(zip((name for name, _ in signature), args), **kwargs)
    return [given.get(name, default) for name, default in signature]


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def row_dot(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r""":math:`\sum_j a_{\ldots j} b_{\ldots j}` along ``dim``, kept as a size-1 dimension. Along the
    last dimension a batched matrix-vector product: one pass, no temporary (``(a * b).sum()``
    takes two)."""
    if dim in (-1, a.dim() - 1):
        return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)
    return (a * b).sum(dim, keepdim=True)


def differentiable_param_grads(layer, grad_out, weight, bias):
    """Parameter gradients of ``layer(weight, bias)`` for ``grad_out`` that stay differentiable."""
    # Rare path: a graph-building backward that wants parameter gradients (e.g. a penalty on
    # them). Native autograd of ``layer(weight, bias)``, recomputed from the saved input, keeps
    # them differentiable.
    with torch.enable_grad():
        probes = [None if t is None else t.detach().requires_grad_(True) for t in (weight, bias)]
        wanted = [t for t in probes if t is not None]
        grads = iter(torch.autograd.grad(layer(*probes), wanted, grad_out, create_graph=True))
        return tuple(None if t is None else next(grads) for t in probes)

