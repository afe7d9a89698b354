"""ImageNet input normalisation, as ``harmonization.common`` ``preprocess_input``."""
from __future__ import annotations

import torch

from harmonizer_fast.spec import IMAGENET_MEAN, IMAGENET_STD, check_finite, check_rank, compute_dtype, shape_of


def preprocess_input(images: torch.Tensor) -> torch.Tensor:
    """Scale 0..255 RGB images to ImageNet-normalised inputs.

    .. math::

        x' = \\frac{x / 255 - \\mu_c}{\\sigma_c}, \\qquad
        \\mu = (0.485, 0.456, 0.406), \\; \\sigma = (0.229, 0.224, 0.225)

    Args:
        images: (N, 3, H, W) (or a single (3, H, W)) RGB tensor with values in 0..255,
            floating point or uint8 (the reference takes NHWC; this port is NCHW).

    Returns:
        normalised tensor of the same shape; float64 stays float64, anything else
        (uint8, half precision, float32) gives float32.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`images` must be a torch.Tensor, got {type(images).__name__}")
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise TypeError(f"`images` must be a floating point or uint8 tensor, got dtype {images.dtype}")
    check_rank(images, (3, 4), "images", "(N, 3, H, W) or (3, H, W)")
    if images.shape[-3] != 3:
        raise ValueError(
            f"`images` must have 3 (RGB) channels on axis -3 (NCHW), got shape {shape_of(images)}; "
            "for NHWC input use images.permute(0, 3, 1, 2)"
        )
    work_dtype = compute_dtype(images) if images.is_floating_point() else torch.float32
    work = images.to(work_dtype)
    if images.is_floating_point():
        check_finite(work, "images")
    mean = torch.tensor(IMAGENET_MEAN, dtype=work_dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=work_dtype, device=images.device).view(3, 1, 1)
    return (work / 255.0 - mean) / std
