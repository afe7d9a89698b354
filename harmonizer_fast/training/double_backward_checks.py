"""Second-order support of a harmonized step: fused attention off, and naming an op without a double backward."""
from __future__ import annotations

import contextlib
import re
import sys
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from harmonizer_fast.training.double_backward import NATIVE_GAPS_COVERED

@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[int]:
    """Turn fused attention off in ``model`` (and timm's global default) and restore both after.

    timm modules read ``timm.layers.use_fused_attn()`` once, at construction, into a
    ``fused_attn`` attribute; the fused kernels have no double backward, which the
    harmonization loss needs. Yields the number of modules switched.
    """
    switched = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    # timm's global default matters only to timm models built meanwhile; a model from
    # timm means timm is imported already, so importing it here would only cost time.
    timm_config = sys.modules.get("timm.layers.config")
    previous_global = getattr(timm_config, "_USE_FUSED_ATTN", None)
    if previous_global is None:
        timm_config = None
    else:
        timm_config.set_fused_attn(False)
    for module, _ in switched:
        module.fused_attn = False
    try:
        yield len(switched)
    finally:
        for module, value in switched:
            module.fused_attn = value
        if timm_config is not None:
            timm_config._USE_FUSED_ATTN = previous_global


_MISSING_DERIVATIVE = re.compile(r"derivative for (\S+) is not implemented")


class DoubleBackwardError(RuntimeError):
    """A model op has no double backward, so its saliency cannot be trained (harmonized)."""

    def __init__(self, message: str, op: str, module: Optional[str]) -> None:
        super().__init__(message)
        self.op = op
        self.module = module


def missing_derivative_op(error: BaseException) -> Optional[str]:
    """The op named by autograd's "derivative for X is not implemented", or None."""
    match = _MISSING_DERIVATIVE.search(str(error))
    return match.group(1) if match else None


def _float_leaves(values) -> Tuple[list, list]:
    """Detached, grad-requiring copies of the float tensors in ``values`` (other values kept)."""
    copies, leaves = [], []
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().requires_grad_(True)
            leaves.append(value)
        copies.append(value)
    return copies, leaves


def _double_backward_fails(module: nn.Module, args: tuple, kwargs: dict, op: str) -> bool:
    """Whether differentiating ``module``'s input gradient again raises the missing-``op`` error."""
    args, leaves = _float_leaves(args)
    if not leaves:
        return False
    try:
        out = module(*args, **kwargs)
        outputs = out if isinstance(out, (tuple, list)) else [out]
        score = sum(o.float().sum() for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad)
        if not isinstance(score, torch.Tensor):
            return False
        grads = torch.autograd.grad(score, leaves, create_graph=True, allow_unused=True)
        second = sum(g.square().sum() for g in grads if g is not None and g.requires_grad)
        if not isinstance(second, torch.Tensor):
            return False
        targets = leaves + [p for p in module.parameters() if p.requires_grad]
        torch.autograd.grad(second, targets, allow_unused=True)
    except RuntimeError as err:
        return missing_derivative_op(err) == op
    return False


def locate_op(model: nn.Module, images: torch.Tensor, op: str) -> Optional[str]:
    """Qualified name of the deepest submodule whose double backward raises the missing-``op`` error.

    Records every submodule's inputs in one forward pass, then differentiates each module
    alone twice, deepest first. Parameters and buffers are restored afterwards.
    """
    captured: Dict[str, Tuple[tuple, dict]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, k, name=name: captured.setdefault(name, (a, k)) and None, with_kwargs=True))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model(images[:2])
    except Exception:  # the forward alone may fail for unrelated reasons; then nothing to locate
        return None
    finally:
        for hook in hooks:
            hook.remove()
    modules = dict(model.named_modules())
    try:
        for name in sorted(captured, key=lambda n: -n.count(".")):
            args, kwargs = captured[name]
            if _double_backward_fails(modules[name], args, kwargs, op):
                return name
    finally:
        model.load_state_dict(buffers)
    return None


def diagnose_double_backward(error: RuntimeError, model: nn.Module, images: torch.Tensor) -> Optional[DoubleBackwardError]:
    """The :class:`DoubleBackwardError` that explains ``error``, or None when it is another error.

    ``error`` came from a harmonized step of ``model`` on ``images``; when autograd says an op
    has no derivative, :func:`locate_op` finds the module that calls it, and the message says
    how to go on.
    """
    op = missing_derivative_op(error)
    if op is None:
        return None
    module = locate_op(model, images.detach(), op)
    where = f"module `{module}` ({type(model.get_submodule(module)).__name__})" if module else "an unidentified module"
    if op in NATIVE_GAPS_COVERED:
        remedy = (f"fast_double_backward=True (the default; --fast-double-backward) covers "
                  f"{NATIVE_GAPS_COVERED[op]} with a closed form: train with it on")
    else:
        remedy = ("replace that op/module with a twice-differentiable one (or train with "
                  "lambda_harmonization=0)")
    return DoubleBackwardError(
        f"{type(model).__name__} cannot be harmonized: op `{op}` in {where} has no double "
        f"backward (autograd: 'derivative for {op} is not implemented'). The harmonization loss "
        f"differentiates the input gradient again; {remedy}.",
        op, module,
    )
