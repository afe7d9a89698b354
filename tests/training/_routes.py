"""Run the harmonizer loss with or without the fast double backward, and count the calls of each closed-form Function that the fast double-backward mode routes to (so
that a test can tell a silent fallback to native autograd from the route it meant to test)."""
from __future__ import annotations

import collections
from typing import Tuple

import torch
import torch.nn.functional as F

from harmonizer_fast.training import activation_double_backward, attention_double_backward, norm_double_backward
from harmonizer_fast.training.double_backward import fast_double_backward
from harmonizer_fast.training.loss import harmonizer_loss_components

ROUTED = {
    "attention": (attention_double_backward, "AttentionFunction"),
    "softmax": (activation_double_backward, "SoftmaxFunction"),
    "gelu": (activation_double_backward, "GeluFunction"),
    "hardsigmoid": (activation_double_backward, "HardsigmoidFunction"),
    "layer_norm": (norm_double_backward, "LayerNormFunction"),
    "batch_norm": (norm_double_backward, "BatchNormFunction"),
}


def count_route_calls(monkeypatch) -> collections.Counter:
    """Wrap each routed Function's ``apply`` (undone by ``monkeypatch``); the counter fills as they run."""
    calls: collections.Counter = collections.Counter()
    for name, (module, cls_name) in ROUTED.items():
        cls = getattr(module, cls_name)
        original = cls.apply

        def counted(*args, _original=original, _name=name):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(cls, "apply", counted)
    return calls


def harmonizer_gradients(model: torch.nn.Module, state: dict, batch: Tuple[torch.Tensor, ...], fast: bool):
    """The harmonizer loss of ``model`` (its ``state`` loaded first: batch-norm statistics move each
    step) on ``batch`` = (images, tokens, labels, heatmaps) and every parameter gradient of it, with the
    fast double backward or natively; the random generator seeded first, so that stochastic depth
    drops the same paths in both."""
    model.load_state_dict(state)
    torch.manual_seed(2)
    model.zero_grad(set_to_none=True)
    with fast_double_backward() if fast else torch.enable_grad():
        out = harmonizer_loss_components(model, *batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class Relu6Hardsigmoid(torch.nn.Module):
    """``nn.Hardsigmoid``'s values and first derivative (torch's float64 backward multiplies by 1/6
    rounded to float32) written with ``relu6``, whose double backward PyTorch has: the native
    reference for models with hard-sigmoid gates."""

    slope = torch.tensor(1 / 6, dtype=torch.float32).item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = F.relu6(x + 3)
        return F.hardsigmoid(x).detach() + (ramp - ramp.detach()) * self.slope


def with_relu6_gates(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every ``nn.Hardsigmoid`` replaced by :class:`Relu6Hardsigmoid` (in place)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Hardsigmoid):
                setattr(module, child_name, Relu6Hardsigmoid())
    return model
