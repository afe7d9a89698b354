"""Gaussian pyramid with TensorFlow 'SAME' padding, as in ``harmonization.training.pyramid``.

One level is a cross-correlation with the 5x5 binomial kernel ``outer(b, b) / 256``,
``b = [1, 4, 6, 4, 1]``, stride 2. TensorFlow's 'SAME' rule for a side ``n`` gives
``out = ceil(n / 2)`` and a total padding ``max((out - 1) * 2 + 5 - n, 0)``, split
``floor(total / 2)`` before and the rest after: an even side pads (1, 2), an odd side
(2, 2). Symmetric ``padding=2`` has the right size but is shifted by one pixel.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from harmonizer_fast import ops
from harmonizer_fast.spec import BINOMIAL_1D, check_rank, check_tensor, compute_dtype, same_padding
from harmonizer_fast.spec import PYRAMID_KERNEL_SIZE as KERNEL_SIZE
from harmonizer_fast.spec import PYRAMID_STRIDE as STRIDE

__all__ = ["BINOMIAL_1D", "KERNEL_SIZE", "STRIDE", "binomial_kernel", "downsample", "pyramid_level_shapes",
           "pyramidal_representation", "reference_pyramid", "same_padding"]


def binomial_kernel(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The (5, 5) binomial kernel ``outer(b, b) / 256``."""
    b = torch.tensor(BINOMIAL_1D, dtype=dtype, device=device)
    return torch.outer(b, b) / 256.0


def pyramid_level_shapes(height: int, width: int, num_levels: int) -> List[Tuple[int, int]]:
    """Spatial shapes of the ``num_levels + 1`` maps of a pyramid."""
    shapes = [(height, width)]
    for _ in range(num_levels):
        height, width = -(-height // STRIDE), -(-width // STRIDE)
        shapes.append((height, width))
    return shapes


def downsample(maps: torch.Tensor) -> torch.Tensor:
    """One pyramid step on (B, H, W) maps: 'SAME' zero padding, 5x5 binomial, stride 2."""
    height, width = maps.shape[-2:]
    top, bottom = same_padding(height)
    left, right = same_padding(width)
    padded = F.pad(maps.unsqueeze(1), (left, right, top, bottom))
    kernel = binomial_kernel(maps.dtype, maps.device).view(1, 1, KERNEL_SIZE, KERNEL_SIZE)
    return F.conv2d(padded, kernel, stride=STRIDE).squeeze(1)


def pyramidal_representation(image: torch.Tensor, num_levels: int, backend: str = "auto") -> List[torch.Tensor]:
    """Gaussian pyramid of ``image``: the input, then ``num_levels`` downsamplings.

    Args:
        image: (N, C, H, W) or (N, H, W) tensor (the reference takes NHWC; channels
            are filtered independently, as its depthwise use of one kernel does).
        num_levels: number of downsamplings; ``num_levels + 1`` maps are returned.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`harmonizer_fast.ops`).

    Returns:
        list of ``num_levels + 1`` tensors with the input's rank and dtype; a side ``n``
        becomes ``ceil(n / 2)`` at each level (224 -> 112, 56, 28, 14, 7).
    """
    check_tensor(image, "image")
    check_rank(image, (3, 4), "image", "(N, C, H, W) or (N, H, W)")
    if not isinstance(num_levels, int) or num_levels < 0:
        raise ValueError(f"`num_levels` must be a non-negative int, got {num_levels!r}")
    return ops.route(backend, ops.pyramid and ops.pyramid.fused_pyramid, reference_pyramid, image, num_levels)


def reference_pyramid(image: torch.Tensor, num_levels: int) -> List[torch.Tensor]:
    """The pure-torch pyramid of :func:`pyramidal_representation` (inputs already validated)."""
    out_dtype = image.dtype
    lead = image.shape[:-2]
    current = image.to(compute_dtype(image)).reshape(-1, *image.shape[-2:])
    levels = [image]
    for _ in range(num_levels):
        current = downsample(current)
        levels.append(current.reshape(*lead, *current.shape[-2:]).to(out_dtype))
    return levels
