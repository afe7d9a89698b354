"""The harmonization loss of Fel et al. (2022), pure PyTorch: the reference semantics.

This module is the specification that every fast path (the Triton kernels under
:mod:`harmonizer_fast.ops`) is tested against. Each public function validates its inputs
once, then :func:`harmonizer_fast.ops.route` runs either the fused op or the pure-torch
``reference_*`` function beside it; the references take validated inputs and never route.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harmonizer_fast import ops
from harmonizer_fast.spec import (
    DEFAULT_NB_LEVELS,
    LABEL_SMOOTHING,
    SALIENCY_MAX_EPSILON,
    STANDARDIZE_EPSILON,
    check_finite,
    check_loss_weight,
    check_maps_and_tokens,
    check_nb_levels,
    check_nonnegative,
    check_rank,
    check_tensor,
    check_tokens,
    compute_dtype,
    shape_of,
)
from harmonizer_fast.training.pyramid import downsample
from harmonizer_fast.training.weight_decay import (  # noqa: F401  (public names of this module too)
    BN_NAME_COMPONENT,
    NO_DECAY_MODULE_TYPES,
    NO_DECAY_NAME_PARTS,
    decayed_parameters,
    is_weight_decayed,
    weight_decay_loss,
)

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


# --------------------------------------------------------------------------- full loss

class HarmonizerLossOutput(NamedTuple):
    """The total loss and its three components (all scalars with autograd history)."""

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    weight_decay: torch.Tensor
    harmonization: torch.Tensor


def smoothed_cross_entropy(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample categorical cross entropy from logits with label smoothing 0.1 (Keras')."""
    return F.cross_entropy(logits.float(), labels.float(), reduction="none", label_smoothing=LABEL_SMOOTHING)


def _check_loss_inputs(images, tokens, labels, true_heatmaps) -> None:
    check_tensor(images, "images")
    check_rank(images, 4, "images", "(N, C, H, W)")
    check_tensor(true_heatmaps, "true_heatmaps")
    check_rank(true_heatmaps, 3, "true_heatmaps", "(N, H, W)")
    n, _, h, w = images.shape
    if tuple(true_heatmaps.shape) != (n, h, w):
        raise ValueError(
            f"`true_heatmaps` must have shape (N, H, W) = {(n, h, w)} to match `images` "
            f"{shape_of(images)}, got {shape_of(true_heatmaps)}"
        )
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`labels` must be a torch.Tensor of shape ({n}, K), got {type(labels).__name__}")
    if labels.ndim != 2 or labels.shape[0] != n:
        raise ValueError(f"`labels` must be (N, K) = ({n}, K) one-hot or soft rows, got {shape_of(labels)}")
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"`tokens` must be a torch.Tensor, got {type(tokens).__name__}")
    check_tokens(tokens, n)
    if n == 0:
        raise ValueError(f"`images` is an empty batch (shape {shape_of(images)}): the loss needs N >= 1 images")
    # One fused reduction instead of six: non-finite or negative inputs would otherwise
    # surface as a NaN or a sign-flipped loss steps later, far from their cause.
    checks = [torch.isfinite(t).all() for t in (images, true_heatmaps, labels, tokens)]
    checks += [(labels >= 0).all(), (tokens >= 0).all()]
    if not bool(torch.stack(checks).all()):
        for tensor, name in ((images, "images"), (true_heatmaps, "true_heatmaps"), (labels, "labels"), (tokens, "tokens")):
            check_finite(tensor, name)
        check_nonnegative(labels, "labels")
        check_nonnegative(tokens, "tokens")


def _check_model(model: object, images: torch.Tensor) -> None:
    """A module with trainable parameters whose dtype matches the images'."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module (its trainable parameters are what the loss differentiates), "
            f"got {type(model).__name__}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no trainable parameters (none with requires_grad=True): "
            "there is nothing for the harmonizer loss to train"
        )
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    if dtypes and images.dtype not in dtypes:
        raise TypeError(
            f"`images` are {images.dtype} but the model's parameters are {sorted(map(str, dtypes))}: convert one "
            f"to the other (e.g. images.to({next(iter(dtypes))}) or model.to({images.dtype})); under autocast keep "
            "the images in the parameters' dtype"
        )


def input_saliency(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and the differentiable input gradient ``d sum(model(images) * labels) / d images``.

    The gradient keeps its graph (``create_graph=True``) so that a loss on it can be
    differentiated with respect to the model's parameters (second order).
    """
    images = images.detach().requires_grad_(True)
    # The flash / memory-efficient attention kernels have no double backward, and the
    # harmonization term differentiates this input gradient again: attention (timm ViTs
    # call scaled_dot_product_attention) must run in the math kernel here.
    with sdpa_kernel([SDPBackend.MATH]):
        logits = model(images)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"`model` must return a (N, K) logits tensor, got {type(logits).__name__}: wrap it so that it returns "
            "the logits only (an nn.Module whose forward returns, say, output[0])"
        )
    if logits.ndim != 2 or logits.shape != labels.shape:
        raise ValueError(f"model output {shape_of(logits)} does not match `labels` {shape_of(labels)}")
    score = (logits * labels.to(logits.dtype)).sum()
    gradient = None
    if score.requires_grad:
        (gradient,) = torch.autograd.grad(score, images, create_graph=True, allow_unused=True)
    if gradient is None:
        raise ValueError(
            f"the output of `model` ({type(model).__name__}) does not depend on `images` {shape_of(images)}: "
            "its saliency is undefined (is the forward detached, or run under torch.no_grad()?)"
        )
    return logits, gradient


def harmonizer_loss_components(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    true_heatmaps: torch.Tensor,
    cross_entropy: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    lambda_weights: float = 1e-5,
    lambda_harmonization: float = 1.0,
    backend: str = "auto",
) -> HarmonizerLossOutput:
    """The harmonizer's total loss and its components, ready for ``loss.backward()``.

    ``loss = CE + lambda_weights * weight_decay + lambda_harmonization * harmonization``
    (see :func:`harmonizer_loss` for each term). The model runs in training mode, as
    in the reference (batch statistics; BN running statistics are updated once); its
    previous mode is restored. ``backend`` selects the fused Triton kernels for the
    saliency/alignment steps (see :mod:`harmonizer_fast.ops`).
    """
    _check_loss_inputs(images, tokens, labels, true_heatmaps)
    _check_model(model, images)
    lambda_weights = check_loss_weight(lambda_weights, "lambda_weights")
    lambda_harmonization = check_loss_weight(lambda_harmonization, "lambda_harmonization")
    if cross_entropy is not None and not callable(cross_entropy):
        raise TypeError(f"`cross_entropy` must be a callable f(labels, logits), got {type(cross_entropy).__name__}")
    was_training = model.training
    model.train()
    try:
        logits, gradient = input_saliency(model, images, labels)
    finally:
        model.train(was_training)
    tokens = tokens.to(gradient.device)
    fused = _fused_alignment and _fused_alignment.fused_harmonization_term
    harmonization = ops.route(
        backend, fused, reference_harmonization_term, gradient, true_heatmaps, tokens, DEFAULT_NB_LEVELS
    )
    ce_fn = cross_entropy if cross_entropy is not None else smoothed_cross_entropy
    cce = ce_fn(labels, logits).float().mean()
    decay = weight_decay_loss(model).to(cce.device)
    loss = cce + lambda_weights * decay + lambda_harmonization * harmonization
    return HarmonizerLossOutput(loss, cce, decay, harmonization)


def harmonizer_loss(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    true_heatmaps: torch.Tensor,
    cross_entropy: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    lambda_weights: float = 1e-5,
    lambda_harmonization: float = 1.0,
    backend: str = "auto",
) -> List[torch.Tensor]:
    """Gradients of the harmonizer loss, like ``harmonization.training.harmonizer_loss``.

    1. ``y_pred = model(images)`` in training mode.
    2. Saliency: ``d sum(y_pred * labels) / d images`` (second order), mean over channels.
    3. ``sa = standardize_cut(saliency)``, ``hm = standardize_cut(true_heatmaps)``.
    4. ``hm = hm / (max(hm) + 1e-6) * stop_gradient(max(sa) + 1e-6)`` per map.
    5. ``harmonization = pyramidal_mse_with_tokens(sa, hm, tokens)``.
    6. ``cross_entropy``: mean categorical cross entropy from logits, label smoothing 0.1.
    7. ``weight_decay = sum(p ** 2) / 2`` over :func:`decayed_parameters`.
    8. ``loss = CE + lambda_weights * weight_decay + lambda_harmonization * harmonization``.

    Args:
        model: classifier returning (N, K) logits.
        images: (N, C, H, W) preprocessed images.
        tokens: (N,) 1 where a human map exists, 0 where not (fractional weights allowed).
        labels: (N, K) one-hot or soft labels.
        true_heatmaps: (N, H, W) human importance maps.
        cross_entropy: ``f(labels, logits)`` per-sample loss; default label-smoothed CE.
        lambda_weights, lambda_harmonization: weights of the two regularisers.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``: fused Triton kernels for steps 2-5
            (see :mod:`harmonizer_fast.ops`).

    Returns:
        gradients of the total loss, one per ``[p for p in model.parameters() if p.requires_grad]``
        (zeros for parameters the loss does not reach). For the loss itself, use
        :func:`harmonizer_loss_components` or :class:`HarmonizerLoss`.
    """
    out = harmonizer_loss_components(
        model, images, tokens, labels, true_heatmaps, cross_entropy, lambda_weights, lambda_harmonization, backend
    )
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class HarmonizerLoss(nn.Module):
    """Module form of :func:`harmonizer_loss_components` for custom training loops.

    Example::

        criterion = HarmonizerLoss(lambda_weights=1e-5, lambda_harmonization=1.0)
        out = criterion(model, images, tokens, labels, true_heatmaps)
        out.loss.backward()
        print(out.cross_entropy.item(), out.weight_decay.item(), out.harmonization.item())
    """

    def __init__(
        self,
        cross_entropy: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        lambda_weights: float = 1e-5,
        lambda_harmonization: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.backend = backend
        self.cross_entropy = cross_entropy
        self.lambda_weights = lambda_weights
        self.lambda_harmonization = lambda_harmonization

    def forward(
        self,
        model: nn.Module,
        images: torch.Tensor,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        true_heatmaps: torch.Tensor,
    ) -> HarmonizerLossOutput:
        return harmonizer_loss_components(
            model, images, tokens, labels, true_heatmaps,
            self.cross_entropy, self.lambda_weights, self.lambda_harmonization, self.backend,
        )
