"""Backend resolution and routing for the fused ops (see :mod:`harmonizer_fast.ops`)."""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("auto", "triton", "torch")

#: dtypes the kernels accept; they load them and compute in float32.
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_triton_error: Optional[str] = None
_triton_checked = False
_warned_fallback = False
#: why an op module failed to import (set by harmonizer_fast.ops)
_op_import_error: Optional[str] = None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run in the Triton interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_error() -> Optional[str]:
    """Why Triton cannot be imported, or ``None`` when it can (checked once)."""
    global _triton_error, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        try:
            # optional at run time: Triton may be absent or broken (no GPU build); the torch path serves then
            import triton  # noqa: F401
            import triton.language  # noqa: F401  (optional, as above)
        except Exception as exc:  # pragma: no cover - depends on the installation
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_error


def _device_of(tensors) -> torch.device:
    """The device of the op's first tensor (its main input; small ones such as tokens are moved to it)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _unusable_reason(tensors) -> Optional[str]:
    """Why the fused kernels cannot run on ``tensors`` (``None`` when they can)."""
    error = triton_error()
    if error is not None:
        return f"triton is unusable ({error})"
    device = _device_of(tensors)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return (
        f"triton kernels need CUDA tensors, got {device.type} tensors; set TRITON_INTERPRET=1 "
        "before importing harmonizer_fast to run them in the (slow) Triton interpreter on CPU"
    )


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Turn a requested backend into the one that runs: ``"triton"`` or ``"torch"``.

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see the module docstring).
        tensors: the op's tensor inputs (device and dtype decide ``"auto"``).

    Raises:
        ValueError: unknown ``backend``.
        RuntimeError: ``backend="triton"`` and Triton cannot run on these tensors.
        TypeError: ``backend="triton"`` with float64 (or another unsupported) dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    unsupported = sorted({str(t.dtype) for t in floats if t.dtype not in FUSED_DTYPES})
    if backend == "triton":
        if unsupported:
            raise TypeError(
                f"the fused Triton kernels compute in float32 and accept {[str(d) for d in FUSED_DTYPES]}, "
                f"got {unsupported}; use backend='torch' for float64"
            )
        reason = _unusable_reason(tensors)
        if reason is not None:
            raise RuntimeError(f"backend='triton' was requested but {reason}")
        return "triton"
    device = _device_of(tensors)
    if device.type != "cuda" or unsupported:
        return "torch"
    if triton_error() is not None:
        _warn_fallback(f"triton cannot be imported ({triton_error()})")
        return "torch"
    return "triton"


def _warn_fallback(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"harmonizer_fast: the fused Triton kernels are unavailable, using the pure-torch loss. "
            f"Reason: {reason}. Pass backend='torch' to silence this warning.",
            RuntimeWarning,
            stacklevel=4,
        )


class FusedUnsupported(ValueError):
    """The fused op cannot serve this call (e.g. a gradient it does not provide).

    Under ``backend="auto"`` the pure-torch reference runs instead, silently; under
    ``backend="triton"`` the error reaches the caller.
    """


def route(backend: str, fused: Optional[Callable[..., Any]], reference: Callable[..., Any], *args: Any) -> Any:
    """Run ``fused(*args)`` when ``backend`` resolves to Triton, else ``reference(*args)``.

    The caller has validated ``args`` already; both callables are direct references (the
    fused one is ``None`` when its module could not be imported). Under ``"auto"`` a fused
    op that declines the call (:class:`FusedUnsupported`) or fails to compile or launch
    (reported once; Triton is not tried again in this process) gives way to the
    reference. Under ``"triton"`` every error propagates; under ``"torch"`` the fused
    callable is never touched.
    """
    global _triton_error
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if resolve_backend(backend, *tensors) == "torch":
        return reference(*args)
    if fused is None:  # resolve_backend saw Triton importable but the op module failed to import
        message = f"the fused op module could not be imported ({_op_import_error})"
        if backend == "triton":
            raise RuntimeError(f"backend='triton' was requested but {message}")
        _warn_fallback(message)
        return reference(*args)
    if backend == "triton":
        return fused(*args)
    try:
        return fused(*args)
    except FusedUnsupported:
        return reference(*args)
    except (ValueError, TypeError):
        raise
    except Exception as exc:  # a Triton compile or launch failure under "auto"
        _triton_error = f"{type(exc).__name__}: {exc}"
        _warn_fallback(_triton_error)
        return reference(*args)


class _SecondDerivativeError(torch.autograd.Function):
    """Identity on a fused op's gradient whose own backward raises: no silent second derivative."""

    @staticmethod
    def forward(ctx, op_name: str, grad: torch.Tensor, *dependencies: torch.Tensor) -> torch.Tensor:
        ctx.op_name = op_name
        return grad.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"the fused Triton op `{ctx.op_name}` is differentiable once: a second derivative through it "
            "(create_graph=True, then differentiating the gradient) is not implemented; "
            "use backend='torch' for higher-order gradients"
        )


def guard_second_order(op_name: str, grad: Optional[torch.Tensor], *dependencies: Any) -> Optional[torch.Tensor]:
    """Return ``grad``, tied (under ``create_graph=True``) to a node that raises if differentiated.

    The kernels build no autograd graph, so without this a gradient computed with
    ``create_graph=True`` would silently act as a constant in a second derivative.
    ``dependencies`` are the op's inputs and upstream gradients that may require grad.
    """
    tensors = [d for d in dependencies if isinstance(d, torch.Tensor)]
    if grad is None or not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return grad
    return _SecondDerivativeError.apply(op_name, grad, *tensors)
