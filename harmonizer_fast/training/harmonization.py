"""The harmonization term on maps (steps 2-5 of the loss), pure PyTorch: the reference semantics.

``standardize_cut``, the token-weighted pyramidal MSE, the saliency cut of an input gradient
and the alignment of a saliency with human maps. This module is the specification that
the Triton kernels of :mod:`harmonizer_fast.ops` are tested against: each public function
validates its inputs once, then :func:`harmonizer_fast.ops.route` runs either the fused op
or the pure-torch ``reference_*`` function beside it; the references take validated inputs
and never route. :mod:`harmonizer_fast.training.loss` builds the full loss on a model from
these terms.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from harmonizer_fast import ops
from harmonizer_fast.ops import harmonization_term_cpu
from harmonizer_fast.spec import (
    DEFAULT_NB_LEVELS,
    SALIENCY_MAX_EPSILON,
    STANDARDIZE_EPSILON,
    check_maps_and_tokens,
    check_nb_levels,
    check_nonnegative,
    check_rank,
    check_tensor,
    compute_dtype,
    shape_of,
)
from harmonizer_fast.training.pyramid import downsample

# The fused ops, as direct references (None where Triton could not be imported).
_fused_alignment = ops.alignment_loss
_fused_saliency = ops.saliency_cut


def standardize_cut(
    heatmaps: torch.Tensor, axes: Sequence[int] = (1, 2), epsilon: float = STANDARDIZE_EPSILON
) -> torch.Tensor:
    """Standardize each map and keep the positive part.

    .. math:: \\mathrm{relu}\\big((x - \\mu) / (\\sigma + \\epsilon)\\big)

    with :math:`\\mu` and the **population** standard deviation :math:`\\sigma`
    (divided by H*W) taken over ``axes``. A constant map gives zeros, with a zero
    (not NaN) gradient.

    Args:
        heatmaps: (N, H, W) maps; float16/bfloat16 are computed in float32.
        axes: axes to standardize over.
        epsilon: added to the standard deviation.

    Returns:
        tensor of the input's shape and dtype.
    """
    check_tensor(heatmaps, "heatmaps")
    axes = tuple(axes)
    if not axes or any(not -heatmaps.ndim <= axis < heatmaps.ndim for axis in axes):
        raise ValueError(
            f"`axes` {axes} are not axes of `heatmaps` with shape {shape_of(heatmaps)} "
            "(expected (N, H, W) maps with axes=(1, 2))"
        )
    x = heatmaps.to(compute_dtype(heatmaps))
    mean = x.mean(dim=axes, keepdim=True)
    centered = x - mean
    var = centered.square().mean(dim=axes, keepdim=True)
    # sqrt has an infinite derivative at 0: route constant maps through sqrt(1) so that
    # their gradient is 0 instead of NaN (the value is unchanged: std = 0).
    positive = var > 0
    std = torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), torch.zeros_like(var))
    return F.relu(centered / (std + epsilon)).to(heatmaps.dtype)


def pyramidal_mse_with_tokens(
    true_heatmaps: torch.Tensor,
    predicted_heatmaps: torch.Tensor,
    tokens: torch.Tensor,
    nb_levels: int = DEFAULT_NB_LEVELS,
    backend: str = "auto",
) -> torch.Tensor:
    """Token-weighted mean squared error averaged over Gaussian-pyramid levels.

    .. math::
        L = \\frac{1}{L_n} \\sum_{l=0}^{L_n - 1} \\frac{1}{N h_l w_l}
            \\sum_{n, i, j} t_n \\big(P_l(a)_{nij} - P_l(b)_{nij}\\big)^2

    where :math:`P_l` is level ``l`` of :func:`pyramidal_representation`. The reference
    builds ``nb_levels + 1`` levels but averages only the first ``nb_levels``; the
    coarsest one never changes the value and is not computed here. The pyramid is
    linear, so the difference is downsampled once: :math:`P_l(a) - P_l(b) = P_l(a - b)`.
    The mean is over all N maps (not divided by the sum of tokens), so all-zero tokens
    give exactly 0.

    Args:
        true_heatmaps, predicted_heatmaps: (N, H, W) maps.
        tokens: (N,) per-map weights (1 where a human map exists, 0 where not).
        nb_levels: number of pyramid levels averaged.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`harmonizer_fast.ops`).

    Returns:
        float32 (float64 for float64 inputs) scalar.
    """
    check_maps_and_tokens(true_heatmaps, predicted_heatmaps, tokens)
    check_nb_levels(nb_levels)
    check_nonnegative(tokens, "tokens")
    fused = _fused_alignment and _fused_alignment.fused_pyramidal_mse_with_tokens
    return ops.route(
        backend, fused, reference_pyramidal_mse_with_tokens, true_heatmaps, predicted_heatmaps, tokens, nb_levels
    )


def reference_pyramidal_mse_with_tokens(
    true_heatmaps: torch.Tensor, predicted_heatmaps: torch.Tensor, tokens: torch.Tensor, nb_levels: int
) -> torch.Tensor:
    """The pure-torch :func:`pyramidal_mse_with_tokens` (inputs already validated)."""
    dtype = compute_dtype(true_heatmaps)
    diff = true_heatmaps.to(dtype) - predicted_heatmaps.to(dtype)
    weights = tokens.to(device=diff.device, dtype=dtype).view(-1, 1, 1)
    total = diff.new_zeros(())
    for level in range(nb_levels):
        if level > 0:
            diff = downsample(diff)
        total = total + (diff.square() * weights).mean()
    return total / nb_levels


def saliency_standardize_cut(input_gradient: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Saliency map of an input gradient: channel mean (sign kept), then :func:`standardize_cut`.

    Args:
        input_gradient: (N, C, H, W).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`harmonizer_fast.ops`).

    Returns:
        (N, H, W) standardized, rectified saliency.
    """
    check_tensor(input_gradient, "input_gradient")
    check_rank(input_gradient, 4, "input_gradient", "(N, C, H, W)")
    fused = _fused_saliency and _fused_saliency.fused_saliency_standardize_cut
    return ops.route(backend, fused, reference_saliency_standardize_cut, input_gradient)


def reference_saliency_standardize_cut(input_gradient: torch.Tensor) -> torch.Tensor:
    """The pure-torch :func:`saliency_standardize_cut`: channel mean (sign kept), then the cut."""
    return standardize_cut(input_gradient.to(compute_dtype(input_gradient)).mean(dim=1))


def alignment_loss(
    saliency: torch.Tensor,
    true_heatmaps: torch.Tensor,
    tokens: torch.Tensor,
    nb_levels: int = DEFAULT_NB_LEVELS,
    backend: str = "auto",
) -> torch.Tensor:
    """Harmonization term between standardized saliency and raw human maps (steps 3-5).

    ``hm = standardize_cut(true_heatmaps)``, rescaled per map to the saliency's maximum:
    ``hm / (max(hm) + 1e-6) * stop_gradient(max(saliency) + 1e-6)``, then
    :func:`pyramidal_mse_with_tokens` ``(saliency, hm, tokens, nb_levels)``.

    Args:
        saliency: (N, H, W) output of :func:`saliency_standardize_cut`.
        true_heatmaps: (N, H, W) human importance maps.
        tokens: (N,) weights.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`harmonizer_fast.ops`); the
            fused op gives no gradient to ``true_heatmaps``/``tokens`` ("auto" uses torch then).
    """
    check_maps_and_tokens(true_heatmaps, saliency, tokens, predicted_name="saliency")
    check_nb_levels(nb_levels)
    check_nonnegative(tokens, "tokens")
    fused = _fused_alignment and _fused_alignment.fused_alignment_loss
    return ops.route(backend, fused, reference_alignment_loss, saliency, true_heatmaps, tokens, nb_levels)


def reference_alignment_loss(
    saliency: torch.Tensor, true_heatmaps: torch.Tensor, tokens: torch.Tensor, nb_levels: int
) -> torch.Tensor:
    """The pure-torch :func:`alignment_loss` (inputs already validated)."""
    dtype = compute_dtype(saliency)
    saliency = saliency.to(dtype)
    human = standardize_cut(true_heatmaps.to(dtype))
    human_max = human.amax(dim=(1, 2), keepdim=True)
    saliency_max = saliency.detach().amax(dim=(1, 2), keepdim=True)
    human = human / (human_max + SALIENCY_MAX_EPSILON) * (saliency_max + SALIENCY_MAX_EPSILON)
    return reference_pyramidal_mse_with_tokens(saliency, human, tokens, nb_levels)


def reference_harmonization_term(
    input_gradient: torch.Tensor, true_heatmaps: torch.Tensor, tokens: torch.Tensor, nb_levels: int
) -> torch.Tensor:
    """Steps 2-5 in pure torch: :func:`reference_saliency_standardize_cut`, then the alignment loss."""
    return reference_alignment_loss(reference_saliency_standardize_cut(input_gradient), true_heatmaps, tokens, nb_levels)


def route_harmonization_term(
    backend: str, input_gradient: torch.Tensor, true_heatmaps: torch.Tensor, tokens: torch.Tensor, nb_levels: int
) -> torch.Tensor:
    """Steps 2-5 on validated inputs: the fused op or :func:`reference_harmonization_term`, by ``backend``.

    The full loss validates its inputs once (:mod:`harmonizer_fast.training.loss`) and routes
    here, so that the fused references of this module are the only ones. Under ``"auto"``,
    CPU float32/float64 inputs run the C++ op :mod:`harmonizer_fast.ops.harmonization_term_cpu`
    when the extension is built (the Triton kernels serve CUDA tensors); ``"torch"`` always
    runs the reference.
    """
    if backend == "auto" and harmonization_term_cpu.applies(input_gradient, true_heatmaps, tokens):
        return harmonization_term_cpu.cpu_harmonization_term(input_gradient, true_heatmaps, tokens, nb_levels)
    fused = _fused_alignment and _fused_alignment.fused_harmonization_term
    return ops.route(backend, fused, reference_harmonization_term, input_gradient, true_heatmaps, tokens, nb_levels)
