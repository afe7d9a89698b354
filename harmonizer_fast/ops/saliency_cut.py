"""Fused saliency standardize-cut: input gradient (N, C, H, W) -> rectified z-score map (N, H, W).

Reference: :func:`harmonizer_fast.training.loss.saliency_standardize_cut`. Per map ``n``

.. math::
    m = \\frac{1}{C} \\sum_c g_{n c}, \\quad
    s = \\mathrm{relu}\\Big(\\frac{m - \\mu}{\\sigma + \\epsilon}\\Big), \\quad
    \\max s = \\mathrm{relu}\\Big(\\frac{\\max m - \\mu}{\\sigma + \\epsilon}\\Big)

with the mean :math:`\\mu` and population standard deviation :math:`\\sigma` of ``m``
over the map. The map is split into blocks, one program each; every program
accumulates moments **shifted by the map's first value** :math:`K`
(:math:`\\sum (m - K)`, :math:`\\sum (m - K)^2`), so partial sums of one map simply add,
the variance avoids the catastrophic cancellation of raw moments, and a constant map
gets exactly :math:`\\sigma = 0` (output 0, gradient 0, as the reference).

Backward, with :math:`a = 1 / (\\sigma + \\epsilon)`, :math:`\\delta = \\bar s \\cdot [z > 0]`,
:math:`S_1 = \\sum \\delta`, :math:`S_2 = \\sum \\delta (m - \\mu)`:

.. math::
    \\bar m = a (\\delta - S_1 / HW) - \\frac{a^2 S_2}{HW\\,\\sigma} (m - \\mu), \\quad
    \\bar g_{n c} = \\bar m / C

(the :math:`\\sigma` term is 0 for a constant map). First derivative only: differentiating
the gradient again raises (:func:`~harmonizer_fast.ops.guard_second_order`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from harmonizer_fast.spec import STANDARDIZE_EPSILON, check_rank, check_tensor
from harmonizer_fast.ops._dispatch import guard_second_order
from harmonizer_fast.ops._launch import block_size, num_warps, partials_block

#: epsilon of ``standardize_cut`` (added to the standard deviation).
#: per-block partial moments: shift K, sum(m - K), sum((m - K)^2), max(m).
N_MOMENTS = 4


@triton.jit
def _partial_moments_kernel(
    x_ptr, mean_ptr, part_ptr,
    C, W, HW, n_blocks,
    s_n, s_c, s_h, s_w,
    BLOCK: tl.constexpr, STORE_MEAN: tl.constexpr,
):
    """Channel mean of one block of one map, and its shifted moments (grid: maps x blocks)."""
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    base = x_ptr + n * s_n
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    mask = idx < HW
    offsets = (idx // W) * s_h + (idx % W) * s_w
    total = tl.zeros([BLOCK], dtype=tl.float32)
    first = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(C):
        total += tl.load(base + c * s_c + offsets, mask=mask, other=0.0).to(tl.float32)
        first += tl.load(base + c * s_c + offsets * 0).to(tl.float32)
    m = total / C
    shift = tl.max(first / C, axis=0)
    if STORE_MEAN:
        tl.store(mean_ptr + n * HW + idx, m, mask=mask)
    y = tl.where(mask, m - shift, 0.0)
    out = part_ptr + (n * n_blocks + blk) * 4
    tl.store(out, shift)
    tl.store(out + 1, tl.sum(y, axis=0))
    tl.store(out + 2, tl.sum(y * y, axis=0))
    tl.store(out + 3, tl.max(tl.where(mask, m, -float("inf")), axis=0))


@triton.jit
def _combine_moments(part_ptr, n, n_blocks, HW, P_BLOCK: tl.constexpr):
    """Mean, population std and maximum of map ``n`` from its per-block partial moments."""
    p = tl.arange(0, P_BLOCK)
    valid = p < n_blocks
    rows = part_ptr + (n * n_blocks + p) * 4
    shift = tl.max(tl.load(rows, mask=valid, other=-float("inf")), axis=0)
    sum_y = tl.sum(tl.load(rows + 1, mask=valid, other=0.0), axis=0)
    sum_y2 = tl.sum(tl.load(rows + 2, mask=valid, other=0.0), axis=0)
    maximum = tl.max(tl.load(rows + 3, mask=valid, other=-float("inf")), axis=0)
    mean_y = sum_y / HW
    var = tl.maximum(sum_y2 / HW - mean_y * mean_y, 0.0)
    return shift + mean_y, tl.sqrt(var), maximum


@triton.jit
def _standardize_cut_kernel(
    mean_ptr, part_ptr, out_ptr, stats_ptr, HW, n_blocks, eps,
    BLOCK: tl.constexpr, P_BLOCK: tl.constexpr,
):
    """relu((m - mu) / (sigma + eps)) of one block; block 0 also writes (mu, sigma, max)."""
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    mu, sigma, maximum = _combine_moments(part_ptr, n, n_blocks, HW, P_BLOCK)
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    mask = idx < HW
    m = tl.load(mean_ptr + n * HW + idx, mask=mask, other=0.0)
    tl.store(out_ptr + n * HW + idx, tl.maximum((m - mu) / (sigma + eps), 0.0), mask=mask)
    if blk == 0:
        tl.store(stats_ptr + n * 3, mu)
        tl.store(stats_ptr + n * 3 + 1, sigma)
        tl.store(stats_ptr + n * 3 + 2, tl.maximum((maximum - mu) / (sigma + eps), 0.0))


@triton.jit
def _cut_block_delta(grad_ptr, scale_ptr, mean_ptr, n, idx, mask, HW, mu, inv, HAS_SCALE: tl.constexpr):
    """Centred channel means of one block and the upstream gradient where the ReLU is open."""
    centered = tl.load(mean_ptr + n * HW + idx, mask=mask, other=0.0) - mu
    upstream = tl.load(grad_ptr + n * HW + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        upstream = upstream * tl.load(scale_ptr).to(tl.float32)
    return centered, tl.where(mask & (centered * inv > 0.0), upstream, 0.0)


@triton.jit
def _cut_backward_partial_kernel(
    grad_ptr, scale_ptr, mean_ptr, stats_ptr, part_ptr, HW, n_blocks, eps,
    BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    """Per-block partial sums S1 = sum(delta), S2 = sum(delta * (m - mu)) (upstream times ``*scale_ptr``)."""
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    mu = tl.load(stats_ptr + n * 3)
    sigma = tl.load(stats_ptr + n * 3 + 1)
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    mask = idx < HW
    centered, delta = _cut_block_delta(grad_ptr, scale_ptr, mean_ptr, n, idx, mask, HW, mu, 1.0 / (sigma + eps), HAS_SCALE)
    tl.store(part_ptr + (n * n_blocks + blk) * 2, tl.sum(delta, axis=0))
    tl.store(part_ptr + (n * n_blocks + blk) * 2 + 1, tl.sum(delta * centered, axis=0))


@triton.jit
def _cut_backward_kernel(
    grad_ptr, scale_ptr, mean_ptr, stats_ptr, part_ptr, dx_ptr, C, HW, n_blocks, eps,
    BLOCK: tl.constexpr, P_BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    """Gradient of the input (N, C, H, W) (contiguous) for one block of one map."""
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    mu = tl.load(stats_ptr + n * 3)
    sigma = tl.load(stats_ptr + n * 3 + 1)
    p = tl.arange(0, P_BLOCK)
    rows = part_ptr + (n * n_blocks + p) * 2
    s1 = tl.sum(tl.load(rows, mask=p < n_blocks, other=0.0), axis=0)
    s2 = tl.sum(tl.load(rows + 1, mask=p < n_blocks, other=0.0), axis=0)
    inv = 1.0 / (sigma + eps)
    # d sigma / d m = (m - mu) / (HW sigma); a constant map (sigma = 0) has no such term.
    std_coef = tl.where(sigma > 0.0, inv * inv * s2 / (HW * tl.where(sigma > 0.0, sigma, 1.0)), 0.0)
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    mask = idx < HW
    centered, delta = _cut_block_delta(grad_ptr, scale_ptr, mean_ptr, n, idx, mask, HW, mu, inv, HAS_SCALE)
    dmean = inv * (delta - s1 / HW) - std_coef * centered
    dx = (dmean / C).to(dx_ptr.dtype.element_ty)
    for c in range(C):
        tl.store(dx_ptr + (n * C + c) * HW + idx, dx, mask=mask)


def _grid_geometry(hw: int) -> Tuple[int, int, int]:
    block = block_size(hw)
    n_blocks = triton.cdiv(hw, block)
    return block, n_blocks, partials_block(n_blocks)


def map_moments(x: torch.Tensor, store_mean: bool) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Launch the partial-moment pass on (N, C, H, W) ``x`` (any strides).

    Returns the float32 channel mean (N, H*W) (empty unless ``store_mean``), the
    partial moments (N, n_blocks, 4) and ``n_blocks``.
    """
    n, c, h, w = x.shape
    hw = h * w
    block, n_blocks, _ = _grid_geometry(hw)
    mean = torch.empty((n, hw) if store_mean else (0,), device=x.device, dtype=torch.float32)
    parts = torch.empty((n, n_blocks, N_MOMENTS), device=x.device, dtype=torch.float32)
    if n > 0:
        _partial_moments_kernel[(n, n_blocks)](
            x, mean, parts, c, w, hw, n_blocks, *x.stride(),
            BLOCK=block, STORE_MEAN=store_mean, num_warps=num_warps(block),
        )
    return mean, parts, n_blocks


class SaliencyCutFunction(torch.autograd.Function):
    """(N, C, H, W) input gradient -> ((N, H, W) float32 saliency, (N,) per-map maximum)."""

    @staticmethod
    def forward(ctx, gradient: torch.Tensor, epsilon: float):
        n, _, h, w = gradient.shape
        hw = h * w
        block, n_blocks, p_block = _grid_geometry(hw)
        mean, parts, _ = map_moments(gradient, store_mean=True)
        out = torch.empty((n, h, w), device=gradient.device, dtype=torch.float32)
        stats = torch.empty((n, 3), device=gradient.device, dtype=torch.float32)
        if n > 0:
            _standardize_cut_kernel[(n, n_blocks)](
                mean, parts, out, stats, hw, n_blocks, epsilon,
                BLOCK=block, P_BLOCK=p_block, num_warps=num_warps(block),
            )
        saliency_max = stats[:, 2].clone()
        ctx.mark_non_differentiable(saliency_max)
        ctx.save_for_backward(gradient, mean, stats)
        ctx.input_meta = (gradient.shape, gradient.dtype, epsilon)
        return out, saliency_max

    @staticmethod
    def backward(ctx, grad_saliency: torch.Tensor, _grad_max: torch.Tensor):
        gradient, mean, stats = ctx.saved_tensors
        shape, dtype, epsilon = ctx.input_meta
        if grad_saliency is None:
            return None, None
        grad_input = cut_backward(grad_saliency, mean, stats, shape, dtype, epsilon)
        return guard_second_order("saliency_cut", grad_input, gradient, grad_saliency), None


def cut_backward(
    upstream: torch.Tensor,
    mean: torch.Tensor,
    stats: torch.Tensor,
    shape: Tuple[int, int, int, int],
    dtype: torch.dtype,
    epsilon: float,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Input gradient (``shape``, ``dtype``) of the cut for the upstream gradient ``scale * upstream``.

    ``mean`` (N, H*W) and ``stats`` (N, 3: mean, std, max) come from the forward pass;
    ``scale`` is an optional one-element tensor (read on the device: no host sync).
    """
    n, c, h, w = shape
    hw = h * w
    block, n_blocks, p_block = _grid_geometry(hw)
    upstream = upstream.contiguous()
    has_scale = scale is not None
    scale = scale.reshape(1) if has_scale else upstream
    parts = torch.empty((n, n_blocks, 2), device=upstream.device, dtype=torch.float32)
    grad_input = torch.empty(shape, device=upstream.device, dtype=dtype)
    if n > 0:
        warps = num_warps(block)
        _cut_backward_partial_kernel[(n, n_blocks)](
            upstream, scale, mean, stats, parts, hw, n_blocks, epsilon,
            BLOCK=block, HAS_SCALE=has_scale, num_warps=warps,
        )
        _cut_backward_kernel[(n, n_blocks)](
            upstream, scale, mean, stats, parts, grad_input, c, hw, n_blocks, epsilon,
            BLOCK=block, P_BLOCK=p_block, HAS_SCALE=has_scale, num_warps=warps,
        )
    return grad_input


def saliency_cut(
    input_gradient: torch.Tensor, epsilon: float = STANDARDIZE_EPSILON
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused channel mean + :func:`~harmonizer_fast.training.loss.standardize_cut`, with the maximum.

    Args:
        input_gradient: (N, C, H, W) float32/float16/bfloat16 tensor, any strides, on a
            CUDA device (or CPU under ``TRITON_INTERPRET=1``).
        epsilon: added to the population standard deviation.

    Returns:
        ``(saliency, saliency_max)``: the (N, H, W) float32 standardized rectified
        saliency and its (N,) per-map maximum (not differentiable: the loss uses it
        under stop-gradient).
    """
    check_tensor(input_gradient, "input_gradient")
    check_rank(input_gradient, 4, "input_gradient", "(N, C, H, W)")
    return SaliencyCutFunction.apply(input_gradient, float(epsilon))


def saliency_standardize_cut(input_gradient: torch.Tensor) -> torch.Tensor:
    """Fused :func:`harmonizer_fast.training.loss.saliency_standardize_cut`: the saliency only."""
    check_tensor(input_gradient, "input_gradient")
    check_rank(input_gradient, 4, "input_gradient", "(N, C, H, W)")
    return fused_saliency_standardize_cut(input_gradient)


def fused_saliency_standardize_cut(input_gradient: torch.Tensor) -> torch.Tensor:
    """:func:`saliency_standardize_cut` on an input the caller has validated."""
    return SaliencyCutFunction.apply(input_gradient, STANDARDIZE_EPSILON)[0]
