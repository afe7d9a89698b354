"""The harmonization term (steps 2-5 of the loss) on the CPU in one C++ pass per map.

``csrc/harmonization_term.cpp`` computes, per map, the channel mean of the input gradient,
both standardize-cuts, the rescaled human map, the token-weighted pyramidal MSE and, in the same
pass, the gradient with respect to the channel mean (the formulas are in that file's header).
The pure-torch :func:`harmonizer_fast.training.harmonization.reference_harmonization_term` is the
specification; ``tests/ops/test_harmonization_term_cpu.py`` compares the two (float64 and
float32, values and gradients, edge maps). ``route_harmonization_term`` runs this op for
``backend="auto"`` on CPU float32/float64 tensors when the extension is built, and the torch
reference otherwise (``backend="torch"`` always does). On the CPU the reference's ~60 small ops
and eight single-channel convolutions (the pyramid and its adjoint) take 10.9 ms forward and
backward for a batch of 8 at 224 px, this op 2.2 ms (``benchmarks/compare_ops.py``).

Differentiable once with respect to the input gradient (the human maps and tokens get no
gradient: calls that need one run the reference); a second derivative raises.
"""
from __future__ import annotations

import numpy as np
import torch

from harmonizer_fast._ext import _C
from harmonizer_fast.ops._dispatch import guard_second_order
from harmonizer_fast.spec import BINOMIAL_1D, SALIENCY_MAX_EPSILON, STANDARDIZE_EPSILON

__all__ = ["HarmonizationTermCPUFunction", "applies", "cpu_harmonization_term"]

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
#: the pyramid's one-dimensional taps: the 5x5 kernel outer(b, b) / 256 is their outer product
_TAPS = np.asarray(BINOMIAL_1D, dtype=np.float64) / sum(BINOMIAL_1D)


def applies(input_gradient: torch.Tensor, true_heatmaps: torch.Tensor, tokens: torch.Tensor) -> bool:
    """Whether the C++ op serves these (validated) inputs: the extension is built, the tensors
    are on the CPU, the input gradient is float32 or float64 and not empty, and neither the
    human maps nor the tokens want a gradient (the op gives none)."""
    return (
        _C is not None
        and input_gradient.device.type == "cpu"
        and input_gradient.dtype in _SUFFIX
        and input_gradient.numel() > 0
        and true_heatmaps.device.type == "cpu"
        and tokens.device.type == "cpu"
        and not (true_heatmaps.requires_grad or tokens.requires_grad)
    )


class HarmonizationTermCPUFunction(torch.autograd.Function):
    """(input gradient (N, C, H, W), human maps (N, H, W), tokens (N,), levels) -> scalar of the
    input gradient's dtype. The forward writes the gradient with respect to the channel mean for
    an upstream 1 (N, H, W); the backward scales it and spreads it over the channels."""

    @staticmethod
    def forward(ctx, gradient: torch.Tensor, true_heatmaps: torch.Tensor, tokens: torch.Tensor, nb_levels: int):
        g = gradient.detach().contiguous()
        maps = true_heatmaps.detach().to(g.dtype).contiguous()
        weights = tokens.detach().to(torch.float64).contiguous()
        n, _, h, w = g.shape
        mean_grad = torch.empty((n, h, w), dtype=g.dtype) if ctx.needs_input_grad[0] else None
        loss = getattr(_C, "harmonization_term_" + _SUFFIX[g.dtype])(
            g.numpy(), maps.numpy(), weights.numpy(), nb_levels, STANDARDIZE_EPSILON, SALIENCY_MAX_EPSILON, _TAPS,
            None if mean_grad is None else mean_grad.numpy(), torch.get_num_threads())
        ctx.save_for_backward(gradient, mean_grad)
        return torch.tensor(loss, dtype=g.dtype)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        gradient, mean_grad = ctx.saved_tensors
        n, channels, h, w = gradient.shape
        scale = grad_loss.detach().to(mean_grad.dtype) / channels
        grad_input = torch.mul(mean_grad.unsqueeze(1).expand(n, channels, h, w), scale)  # one pass, contiguous
        return guard_second_order("harmonization_term", grad_input, gradient, grad_loss), None, None, None


def cpu_harmonization_term(
    input_gradient: torch.Tensor, true_heatmaps: torch.Tensor, tokens: torch.Tensor, nb_levels: int
) -> torch.Tensor:
    """The harmonization term of validated inputs for which :func:`applies` holds (float32 for
    float32 inputs, float64 for float64), differentiable once with respect to ``input_gradient``."""
    return HarmonizationTermCPUFunction.apply(input_gradient, true_heatmaps, tokens, nb_levels)
