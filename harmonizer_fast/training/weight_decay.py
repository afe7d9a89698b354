"""The reference's weight-decay term: which trainable parameters are decayed, and ``sum(p**2) / 2``."""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

#: Substrings of parameter names that are never decayed (the reference filters Keras
#: names containing ``bn/``, ``normalization``, ``embed``, ``Norm``, ``norm`` or
#: ``class_token``; these are their PyTorch/timm spellings).
NO_DECAY_NAME_PARTS: Tuple[str, ...] = (
    "norm", "Norm", "embed", "cls_token", "class_token", "dist_token", "reg_token", "mask_token",
)
#: Dotted name components of batch-norm modules: ``bn``, ``bn1``, ``conv1_bn``, ``bn_act``.
#: Keras' ``bn/`` matched a scope ending in ``bn``; a bare ``"bn"`` substring would also
#: leave ``subnet.*`` or ``fbnet.*`` undecayed.
BN_NAME_COMPONENT = re.compile(r"(?:.*_)?bn\d*(?:_.*)?")
#: Module types whose parameters are never decayed.
NO_DECAY_MODULE_TYPES: Tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
    nn.Embedding,
    nn.EmbeddingBag,
)


def is_weight_decayed(name: str, module: Optional[nn.Module]) -> bool:
    """The weight-decay rule, ported from the reference's Keras name filter.

    A trainable parameter is decayed (``sum(p ** 2) / 2``, biases included) unless
    its owning module is a normalization layer (any ``torch.nn`` norm, or a class
    whose name contains ``Norm``) or an embedding, or its qualified name contains one
    of :data:`NO_DECAY_NAME_PARTS` (``norm``, ``embed``, class/distillation/register/mask
    tokens) or a dotted component matching :data:`BN_NAME_COMPONENT` (``bn``, ``bn1``,
    ``conv1_bn``). So timm's ``pos_embed``, ``patch_embed.*`` and ``cls_token`` are
    excluded, as Keras' ``embedding`` and ``class_token`` were.
    """
    if module is not None and (
        isinstance(module, NO_DECAY_MODULE_TYPES) or "Norm" in type(module).__name__
    ):
        return False
    if any(BN_NAME_COMPONENT.fullmatch(component) for component in name.split(".")):
        return False
    return not any(part in name for part in NO_DECAY_NAME_PARTS)


def decayed_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) pairs of the trainable parameters that :func:`is_weight_decayed` keeps."""
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = module
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and is_weight_decayed(name, owners.get(name))
    ]


class _HalfSquaredNorm(torch.autograd.Function):
    r""":math:`\tfrac12 \sum_p \lVert p \rVert^2` over the given tensors, with gradient :math:`g\,p`.

    Autograd's ``sum(p.square().sum() / 2)`` records a square, a sum and their backwards per
    parameter (``PowBackward0``: ~4 % of a ViT-B/16 harmonized step); here the value is one
    dot product per parameter and the gradient one multi-tensor multiplication, the same
    numbers. Each dot product accumulates in float32 at least; the result is float32 (as the
    reference's ``tf.nn.l2_loss`` sum), float64 when a parameter is float64.
    """

    @staticmethod
    def forward(ctx, *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*params)
        squares, dtype = [], torch.float32
        for p in params:
            if p.dtype == torch.float64:
                dtype = torch.float64
            flat = p.reshape(-1)
            if flat.dtype not in (torch.float32, torch.float64):
                flat = flat.float()
            squares.append(torch.dot(flat, flat).to(torch.float64))
        return (torch.stack(squares).sum() / 2).to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        params = ctx.saved_tensors
        by_dtype = {}  # one multi-tensor multiplication per dtype (a loop of p * g: ~2x the time)
        for i, (p, need) in enumerate(zip(params, ctx.needs_input_grad)):
            if need:
                by_dtype.setdefault(p.dtype, []).append(i)
        grads: List[Optional[torch.Tensor]] = [None] * len(params)
        for dtype, indices in by_dtype.items():
            for i, g in zip(indices, torch._foreach_mul([params[i] for i in indices], grad.to(dtype))):
                grads[i] = g
        return tuple(grads)


def weight_decay_loss(model: nn.Module) -> torch.Tensor:
    """``sum(sum(p ** 2) / 2)`` over :func:`decayed_parameters` (``tf.nn.l2_loss`` summed), float32
    (float64 for float64 parameters), differentiable (once) with respect to the parameters."""
    params = [p for _, p in decayed_parameters(model)]
    if not params:
        return torch.zeros(())
    return _HalfSquaredNorm.apply(*params)
