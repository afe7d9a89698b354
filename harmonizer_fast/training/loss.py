"""The harmonizer loss of Fel et al. (2022) on a model, pure PyTorch: the reference semantics.

Cross entropy + ``lambda_weights`` * weight decay + ``lambda_harmonization`` * the
harmonization term of the model's input saliency. The map-level terms (``standardize_cut``,
the pyramidal MSE, the saliency cut, the alignment loss and their ``reference_*`` forms) live
in :mod:`harmonizer_fast.training.harmonization` and the weight-decay rule in
:mod:`harmonizer_fast.training.weight_decay`; both are importable from here too, as in the
reference's ``harmonization.training``.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harmonizer_fast.spec import (
    DEFAULT_NB_LEVELS,
    LABEL_SMOOTHING,
    all_finite,
    check_finite,
    check_loss_weight,
    check_nonnegative,
    check_rank,
    check_tensor,
    check_tokens,
    shape_of,
)
from harmonizer_fast.training.harmonization import (  # noqa: F401  (public names of this module too)
    alignment_loss,
    pyramidal_mse_with_tokens,
    reference_alignment_loss,
    reference_harmonization_term,
    reference_pyramidal_mse_with_tokens,
    reference_saliency_standardize_cut,
    route_harmonization_term,
    saliency_standardize_cut,
    standardize_cut,
)
from harmonizer_fast.training.weight_decay import (  # noqa: F401  (public names of this module too)
    BN_NAME_COMPONENT,
    NO_DECAY_MODULE_TYPES,
    NO_DECAY_NAME_PARTS,
    decayed_parameters,
    is_weight_decayed,
    weight_decay_loss,
)

__all__ = [
    "BN_NAME_COMPONENT", "NO_DECAY_MODULE_TYPES", "NO_DECAY_NAME_PARTS", "HarmonizerLoss", "HarmonizerLossOutput",
    "alignment_loss", "decayed_parameters", "harmonizer_loss", "harmonizer_loss_components", "input_saliency",
    "is_weight_decayed", "pyramidal_mse_with_tokens", "reference_alignment_loss", "reference_harmonization_term",
    "reference_pyramidal_mse_with_tokens", "reference_saliency_standardize_cut", "saliency_standardize_cut",
    "smoothed_cross_entropy", "standardize_cut", "weight_decay_loss",
]


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
    # Non-finite or negative inputs would otherwise surface as a NaN or a sign-flipped loss
    # steps later, far from their cause: one summing pass per tensor and two reductions prove
    # them fine; only then is each checked by name.
    nonnegative = torch.stack([(labels >= 0).all(), (tokens.to(labels.device) >= 0).all()]).all()
    if not (all_finite((images, true_heatmaps, labels, tokens)) and bool(nonnegative)):
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
    harmonization = route_harmonization_term(backend, gradient, true_heatmaps, tokens, DEFAULT_NB_LEVELS)
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
