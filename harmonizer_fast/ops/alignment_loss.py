"""Fused alignment loss: rescaled human map, pyramid of the difference, token-weighted MSE.

Reference: :func:`harmonizer_fast.training.loss.alignment_loss` and
:func:`~harmonizer_fast.training.loss.pyramidal_mse_with_tokens`. With the saliency
``s`` (N, H, W), the human map ``h`` and per-map weights ``t``:

.. math::
    \\hat h = \\frac{\\mathrm{cut}(h)}{\\max \\mathrm{cut}(h) + 10^{-6}}\\,
              \\mathrm{sg}(\\max s + 10^{-6}), \\quad d_0 = s - \\hat h, \\quad
    d_{l+1} = D(d_l), \\quad
    L = \\frac{1}{L_n} \\sum_{l < L_n} \\frac{1}{N h_l w_l} \\sum_n t_n \\lVert d_{l,n} \\rVert^2

(``cut`` is the standardize-cut, ``D`` one pyramid level; the pyramid is linear, so
one pyramid of the difference replaces the difference of two pyramids). The human
map's moments come from the same partial-moment kernel as the saliency; the difference
kernel and every downsampling also emit per-block sums of squares, so the loss never
re-reads a level. Because the loss is a scalar, its gradient

.. math::
    \\frac{\\partial L}{\\partial s} = G_0, \\quad
    G_{L_n - 1} = c_{L_n - 1} t \\odot d_{L_n - 1}, \\quad
    G_l = c_l t \\odot d_l + D^\\top(G_{l+1}), \\quad c_l = \\frac{2}{L_n N h_l w_l}

is computed in the forward pass (when the saliency requires it) and the backward only
scales it by the upstream scalar. The maximum of ``s`` is under stop-gradient, as in the
reference; no gradient flows to ``h`` or ``t``.

:func:`harmonization_term` fuses the saliency cut in as well: it takes the input gradient,
standardizes the channel mean inside the difference kernel (the saliency is never
stored) and, in the backward, feeds :math:`G_0` and the upstream scalar straight into the
cut's backward kernels.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from harmonizer_fast.spec import (
    SALIENCY_MAX_EPSILON,
    STANDARDIZE_EPSILON,
    check_maps_and_tokens,
    check_nb_levels,
    check_rank,
    check_tensor,
    shape_of,
)
from harmonizer_fast.ops._dispatch import FusedUnsupported, guard_second_order
from harmonizer_fast.ops._launch import block_size, num_warps, partials_block
from harmonizer_fast.ops.pyramid import downsample, downsample_adjoint
from harmonizer_fast.ops.saliency_cut import _combine_moments, cut_backward, map_moments


@triton.jit
def _difference_kernel(
    a_ptr, b_ptr, a_part_ptr, a_stats_ptr, part_ptr, amax_ptr, weight_ptr, d_ptr, sq_ptr,
    W, HW, n_blocks,
    sa_n, sa_h, sa_w, sb_n, sb_h, sb_w,
    eps, max_eps,
    BLOCK: tl.constexpr, P_BLOCK: tl.constexpr, CUT_A: tl.constexpr, CUT_B: tl.constexpr,
):
    """``d = a - b`` of one block, and its weighted sum ``w[n] * sum d^2``.

    ``CUT_A``: ``a`` is a channel mean whose standardize-cut is taken here (from its
    partial moments; block 0 writes its (mean, std, max) to ``a_stats_ptr``), so the
    saliency is never stored. ``CUT_B``: ``b`` is a raw human map, replaced by its cut
    rescaled to the saliency's maximum (in-kernel with ``CUT_A``, else ``amax_ptr``).
    """
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    mask = idx < HW
    row = idx // W
    col = idx % W
    a = tl.load(a_ptr + n * sa_n + row * sa_h + col * sa_w, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + n * sb_n + row * sb_h + col * sb_w, mask=mask, other=0.0).to(tl.float32)
    if CUT_A:
        mu_a, sigma_a, a_max = _combine_moments(a_part_ptr, n, n_blocks, HW, P_BLOCK)
        a = tl.maximum((a - mu_a) / (sigma_a + eps), 0.0)
        saliency_max = tl.maximum((a_max - mu_a) / (sigma_a + eps), 0.0)
        if blk == 0:
            tl.store(a_stats_ptr + n * 3, mu_a)
            tl.store(a_stats_ptr + n * 3 + 1, sigma_a)
            tl.store(a_stats_ptr + n * 3 + 2, saliency_max)
    if CUT_B:
        if not CUT_A:
            saliency_max = tl.load(amax_ptr + n)
        mu, sigma, b_max = _combine_moments(part_ptr, n, n_blocks, HW, P_BLOCK)
        human_max = tl.maximum((b_max - mu) / (sigma + eps), 0.0)
        human = tl.maximum((b - mu) / (sigma + eps), 0.0)
        b = human / (human_max + max_eps) * (saliency_max + max_eps)
    d = tl.where(mask, a - b, 0.0)
    tl.store(d_ptr + n * HW + idx, d, mask=mask)
    tl.store(sq_ptr + n * n_blocks + blk, tl.load(weight_ptr + n) * tl.sum(d * d, axis=0))


def _difference(
    a: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor,
    moments: Optional[torch.Tensor] = None,
    a_max: Optional[torch.Tensor] = None,
    a_moments: Optional[torch.Tensor] = None,
    a_stats: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Level-0 difference (float32 (N, H, W)) and its token-weighted sum of squares (0-d).

    ``moments``: cut ``b`` (a human map) with these partial moments, rescaled by ``a_max``
    or, with ``a_moments``, by the maximum of ``a``'s cut; ``a_moments``: cut ``a`` (a
    channel mean) too, writing its (mean, std, max) into ``a_stats``.
    """
    n, h, w = a.shape
    hw = h * w
    block = block_size(hw)
    n_blocks = triton.cdiv(hw, block)
    diff = torch.empty((n, h, w), device=a.device, dtype=torch.float32)
    squares = torch.zeros((n, n_blocks), device=a.device, dtype=torch.float32)
    cut_a, cut_b = a_moments is not None, moments is not None
    unused = diff
    if n > 0:
        _difference_kernel[(n, n_blocks)](
            a, b, a_moments if cut_a else unused, a_stats if cut_a else unused, moments if cut_b else unused,
            a_max if a_max is not None else unused, weights, diff, squares,
            w, hw, n_blocks, *a.stride(), *b.stride(), STANDARDIZE_EPSILON, SALIENCY_MAX_EPSILON,
            BLOCK=block, P_BLOCK=partials_block(n_blocks), CUT_A=cut_a, CUT_B=cut_b, num_warps=num_warps(block),
        )
    return diff, squares.sum()


def _pyramidal_mse_of_difference(
    diff: torch.Tensor, squares: torch.Tensor, weights: torch.Tensor, nb_levels: int, with_grad: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-weighted pyramidal MSE of a level-0 difference, and its gradient when asked."""
    n = diff.shape[0]
    levels: List[torch.Tensor] = [diff]
    level_squares = [squares]
    for _ in range(1, nb_levels):
        level, level_sq = downsample(levels[-1], weights)
        levels.append(level)
        level_squares.append(level_sq)
    sizes = [n * level.shape[1] * level.shape[2] for level in levels]
    per_level = torch.stack([sq / size for sq, size in zip(level_squares, sizes)])
    loss = per_level.sum() / nb_levels
    if not with_grad:
        return loss, None
    coefs = [2.0 / (nb_levels * size) for size in sizes]
    grad = levels[-1] * (coefs[-1] * weights).view(-1, 1, 1)
    for level in range(nb_levels - 2, -1, -1):
        grad = downsample_adjoint(grad, levels[level].shape, addend=levels[level], weights=weights, coef=coefs[level])
    return loss, grad


def _token_weights(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tokens.detach().to(device=like.device, dtype=torch.float32).contiguous()


class AlignmentLossFunction(torch.autograd.Function):
    """(saliency, true_heatmaps, tokens, saliency_max) -> float32 scalar; gradient to the saliency only."""

    @staticmethod
    def forward(ctx, saliency, true_heatmaps, tokens, saliency_max, nb_levels: int):
        _, moments, _ = map_moments(true_heatmaps.unsqueeze(1), store_mean=False)
        if saliency_max is None:
            saliency_max = saliency.detach().amax(dim=(1, 2))
        saliency_max = saliency_max.detach().to(torch.float32).contiguous()
        weights = _token_weights(tokens, saliency)
        diff, squares = _difference(saliency, true_heatmaps, weights, moments, saliency_max)
        loss, grad = _pyramidal_mse_of_difference(diff, squares, weights, nb_levels, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad, saliency)
        ctx.saliency_dtype = saliency.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, saliency = ctx.saved_tensors
        grad_saliency = (grad * grad_loss).to(ctx.saliency_dtype)
        return guard_second_order("alignment_loss", grad_saliency, saliency, grad_loss), None, None, None, None


class PyramidalMSEFunction(torch.autograd.Function):
    """(true_heatmaps, predicted_heatmaps, tokens) -> float32 scalar; gradients to both maps."""

    @staticmethod
    def forward(ctx, true_heatmaps, predicted_heatmaps, tokens, nb_levels: int):
        weights = _token_weights(tokens, true_heatmaps)
        diff, squares = _difference(true_heatmaps, predicted_heatmaps, weights)
        with_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, grad = _pyramidal_mse_of_difference(diff, squares, weights, nb_levels, with_grad)
        ctx.save_for_backward(grad, true_heatmaps, predicted_heatmaps)
        ctx.dtypes = (true_heatmaps.dtype, predicted_heatmaps.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, true_heatmaps, predicted_heatmaps = ctx.saved_tensors
        scaled = grad * grad_loss
        grad_true = scaled.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_pred = (-scaled).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        dependencies = (true_heatmaps, predicted_heatmaps, grad_loss)
        return (
            guard_second_order("pyramidal_mse_with_tokens", grad_true, *dependencies),
            guard_second_order("pyramidal_mse_with_tokens", grad_pred, *dependencies),
            None,
            None,
        )


def _check_no_grad(tensor: torch.Tensor, name: str) -> None:
    if tensor.requires_grad:
        raise FusedUnsupported(
            f"the fused alignment loss gives no gradient for `{name}` (shape {tuple(tensor.shape)}), "
            "which requires grad; detach it or use backend='torch'"
        )


def alignment_loss(
    saliency: torch.Tensor,
    true_heatmaps: torch.Tensor,
    tokens: torch.Tensor,
    nb_levels: int = 5,
    saliency_max: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused :func:`harmonizer_fast.training.loss.alignment_loss`.

    Args:
        saliency: (N, H, W) standardized saliency (float32/float16/bfloat16, any strides).
        true_heatmaps: (N, H, W) raw human maps (no gradient is computed for them).
        tokens: (N,) per-map weights (no gradient).
        nb_levels: pyramid levels averaged.
        saliency_max: optional (N,) per-map maximum of ``saliency`` (as returned by
            :func:`~harmonizer_fast.ops.saliency_cut.saliency_cut`); computed when omitted.

    Returns:
        float32 scalar, differentiable (once) with respect to ``saliency``.
    """
    check_maps_and_tokens(true_heatmaps, saliency, tokens, predicted_name="saliency")
    check_nb_levels(nb_levels)
    if saliency_max is not None and tuple(saliency_max.shape) != (saliency.shape[0],):
        raise ValueError(f"`saliency_max` must have shape ({saliency.shape[0]},), got {tuple(saliency_max.shape)}")
    return fused_alignment_loss(saliency, true_heatmaps, tokens, nb_levels, saliency_max)


def fused_alignment_loss(
    saliency: torch.Tensor,
    true_heatmaps: torch.Tensor,
    tokens: torch.Tensor,
    nb_levels: int = 5,
    saliency_max: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`alignment_loss` on inputs the caller has validated (declines gradients it lacks)."""
    _check_no_grad(true_heatmaps, "true_heatmaps")
    _check_no_grad(tokens, "tokens")
    return AlignmentLossFunction.apply(saliency, true_heatmaps, tokens.to(saliency.device), saliency_max, nb_levels)


def pyramidal_mse_with_tokens(
    true_heatmaps: torch.Tensor, predicted_heatmaps: torch.Tensor, tokens: torch.Tensor, nb_levels: int = 5
) -> torch.Tensor:
    """Fused :func:`harmonizer_fast.training.loss.pyramidal_mse_with_tokens` (float32 scalar)."""
    check_maps_and_tokens(true_heatmaps, predicted_heatmaps, tokens)
    check_nb_levels(nb_levels)
    return fused_pyramidal_mse_with_tokens(true_heatmaps, predicted_heatmaps, tokens, nb_levels)


def fused_pyramidal_mse_with_tokens(
    true_heatmaps: torch.Tensor, predicted_heatmaps: torch.Tensor, tokens: torch.Tensor, nb_levels: int = 5
) -> torch.Tensor:
    """:func:`pyramidal_mse_with_tokens` on inputs the caller has validated."""
    _check_no_grad(tokens, "tokens")
    return PyramidalMSEFunction.apply(true_heatmaps, predicted_heatmaps, tokens.to(true_heatmaps.device), nb_levels)


class HarmonizationTermFunction(torch.autograd.Function):
    """(input gradient, true_heatmaps, tokens) -> float32 scalar; gradient to the input gradient only.

    The saliency cut and the alignment loss in one op: the saliency is standardized inside
    the difference kernel (never stored), and the backward runs only the two cut-backward
    kernels, with the upstream scalar read on the device.
    """

    @staticmethod
    def forward(ctx, gradient, true_heatmaps, tokens, nb_levels: int):
        n, _, h, w = gradient.shape
        mean, saliency_moments, _ = map_moments(gradient, store_mean=True)
        _, human_moments, _ = map_moments(true_heatmaps.unsqueeze(1), store_mean=False)
        weights = _token_weights(tokens, gradient)
        stats = torch.empty((n, 3), device=gradient.device, dtype=torch.float32)
        diff, squares = _difference(mean.view(n, h, w), true_heatmaps, weights, human_moments,
                                    a_moments=saliency_moments, a_stats=stats)
        loss, grad = _pyramidal_mse_of_difference(diff, squares, weights, nb_levels, ctx.needs_input_grad[0])
        ctx.save_for_backward(gradient, mean, stats, grad)
        ctx.input_meta = (tuple(gradient.shape), gradient.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gradient, mean, stats, grad = ctx.saved_tensors
        shape, dtype = ctx.input_meta
        scale = grad_loss.detach().to(torch.float32)
        grad_input = cut_backward(grad, mean, stats, shape, dtype, STANDARDIZE_EPSILON, scale=scale)
        return guard_second_order("harmonization_term", grad_input, gradient, grad_loss), None, None, None


def harmonization_term(
    input_gradient: torch.Tensor, true_heatmaps: torch.Tensor, tokens: torch.Tensor, nb_levels: int = 5
) -> torch.Tensor:
    """Steps 2-5 of the harmonizer loss in one fused op: saliency cut, then the alignment loss.

    Equals ``alignment_loss(saliency_cut(input_gradient)[0], true_heatmaps, tokens, nb_levels)``
    (and the torch reference ``alignment_loss(saliency_standardize_cut(g), ...)``) without
    storing the saliency; differentiable once with respect to ``input_gradient``.
    """
    check_tensor(input_gradient, "input_gradient")
    check_rank(input_gradient, 4, "input_gradient", "(N, C, H, W)")
    n, _, h, w = input_gradient.shape
    if not isinstance(true_heatmaps, torch.Tensor) or tuple(true_heatmaps.shape) != (n, h, w):
        raise ValueError(
            f"`true_heatmaps` must have shape (N, H, W) = {(n, h, w)} to match `input_gradient` "
            f"{tuple(input_gradient.shape)}, got {shape_of(true_heatmaps)}"
        )
    check_maps_and_tokens(true_heatmaps, true_heatmaps, tokens)
    check_nb_levels(nb_levels)
    return fused_harmonization_term(input_gradient, true_heatmaps, tokens, nb_levels)


def fused_harmonization_term(
    input_gradient: torch.Tensor, true_heatmaps: torch.Tensor, tokens: torch.Tensor, nb_levels: int = 5
) -> torch.Tensor:
    """:func:`harmonization_term` on inputs the caller has validated (declines gradients it lacks)."""
    _check_no_grad(true_heatmaps, "true_heatmaps")
    _check_no_grad(tokens, "tokens")
    return HarmonizationTermFunction.apply(input_gradient, true_heatmaps, tokens.to(input_gradient.device), nb_levels)
