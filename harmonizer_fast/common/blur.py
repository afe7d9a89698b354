"""Gaussian kernel and 'SAME' blur of heatmaps, as ``harmonization.common.blur``.

The reference builds an **off-centre** grid for even sizes: columns run over
``x = -(size - 1) // 2 .. (size - 1) // 2`` and rows over ``y = (size - 1) // 2 .. -(size - 1) // 2``
(Python floor division, so ``x = -5..4`` and ``y = 4..-5`` for ``size = 10``). The blur is
a 2-D **cross-correlation** with TensorFlow's 'SAME' zero padding (``size - 1`` in total,
``(size - 1) // 2`` before): for the default 10-wide kernel, 4 before and 5 after, so content
moves by half a pixel towards lower indices. Both quirks are reproduced on purpose, because
the ClickMe heatmaps the reference trained on went through them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from harmonizer_fast.spec import check_finite, check_rank, check_tensor, compute_dtype, same_padding, shape_of

BLUR_KERNEL_SIZE = 10
BLUR_SIGMA = 10


def gaussian_kernel(size: int = BLUR_KERNEL_SIZE, sigma: float = BLUR_SIGMA,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel on the reference's (off-centre for even sizes) grid.

    .. math::

        K_{ij} = \\frac{g_{ij}}{\\sum_{kl} g_{kl}}, \\qquad
        g_{ij} = \\frac{\\exp\\left(-(x_j^2 + y_i^2) / (2 \\sigma^2)\\right)}{2 \\pi \\sigma^2}

    with ``x_j = j - size // 2`` for columns (``-5..4`` when ``size = 10``) and
    ``y_i = (size - 1) // 2 - i`` for rows (``4..-5``), so the peak sits at row
    ``(size - 1) // 2``, column ``size // 2``. Computed in float64 (as the reference's
    integer grid divided by a Python number is), then cast to float32.

    Args:
        size: side of the square kernel (positive int).
        sigma: standard deviation in pixels (positive).
        device: where to put the kernel.

    Returns:
        (size, size) float32 tensor summing to 1. The reference returns it as
        ``(size, size, 1, 1)`` (HWIO); ``kernel[:, :, None, None]`` gives that layout.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`size` must be a positive int, got {size!r}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"`sigma` must be a positive finite number, got {sigma!r}")
    half_low = -(size - 1) // 2  # Python floor division of the negated value: -5 for size 10
    half_high = (size - 1) // 2
    xs = torch.arange(half_low, half_high + 1, dtype=torch.float64)
    ys = torch.arange(half_high, half_low - 1, -1, dtype=torch.float64)
    squared_radius = ys[:, None] ** 2 + xs[None, :] ** 2
    two_sigma_sq = 2.0 * float(sigma) ** 2
    # The 1 / (2 pi sigma^2) factor cancels in the normalisation; it is kept because it
    # changes the float64 rounding, and the float32 cast must match the reference.
    unnormalised = torch.exp(-squared_radius / two_sigma_sq) / (math.pi * two_sigma_sq)
    kernel = unnormalised / unnormalised.sum()
    return kernel.to(dtype=torch.float32, device=device)


def _kernel_2d(kernel: torch.Tensor) -> torch.Tensor:
    check_tensor(kernel, "kernel")
    if kernel.ndim == 4 and tuple(kernel.shape[2:]) == (1, 1):
        kernel = kernel[:, :, 0, 0]  # the reference's (kh, kw, 1, 1) HWIO layout
    if kernel.ndim != 2 or min(kernel.shape) < 1:
        raise ValueError(
            f"`kernel` must have shape (kh, kw) or (kh, kw, 1, 1), got {shape_of(kernel)}"
        )
    check_finite(kernel, "kernel")
    return kernel


def gaussian_blur(heatmap: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Blur heatmaps by a 'SAME' 2-D cross-correlation with ``kernel`` (zero padding).

    .. math::

        B_{ij} = \\sum_{u=0}^{k_h - 1} \\sum_{v=0}^{k_w - 1} K_{uv}\\, H_{i + u - p_h,\\, j + v - p_w},
        \\qquad p = (k - 1) // 2

    with ``H`` zero outside the map (TensorFlow's 'SAME' rule at stride 1: ``k - 1`` padding,
    ``(k - 1) // 2`` before, the rest after; 4 and 5 for the 10-wide default kernel).

    Args:
        heatmap: (H, W) map or (N, H, W) batch of maps, floating point. The reference
            blurs one (H, W, 1) map; squeeze its channel axis first.
        kernel: (kh, kw) kernel, e.g. :func:`gaussian_kernel` (the reference's
            (kh, kw, 1, 1) layout is accepted too).

    Returns:
        tensor of the shape and dtype of ``heatmap``; half-precision inputs are computed in
        float32.
    """
    check_tensor(heatmap, "heatmap")
    check_rank(heatmap, (2, 3), "heatmap", "(H, W) or (N, H, W)")
    kernel = _kernel_2d(kernel)
    work_dtype = compute_dtype(heatmap)
    height, width = heatmap.shape[-2:]
    top, bottom = same_padding(height, kernel_size=kernel.shape[0], stride=1)
    left, right = same_padding(width, kernel_size=kernel.shape[1], stride=1)
    maps = heatmap.reshape(-1, 1, height, width).to(work_dtype)
    padded = F.pad(maps, (left, right, top, bottom))
    weight = kernel.to(dtype=work_dtype, device=heatmap.device)[None, None]
    blurred = F.conv2d(padded, weight)
    return blurred.reshape(heatmap.shape).to(heatmap.dtype)
