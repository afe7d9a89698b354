"""The ground floor: the reference's constants, its TF-'SAME' padding rule, and input validators.

Everything the specification (:mod:`harmonizer_fast.training`), the fused kernels
(:mod:`harmonizer_fast.ops`), the data code (:mod:`harmonizer_fast.common`) and the
evaluation agree on lives here, once. This module imports nothing of the package, so any
room may build on it without reaching into another (tested in ``tests/test_layers.py``).

Validators raise :class:`TypeError` or :class:`ValueError` naming the argument and what it
got (shape, dtype, value): a bad call fails at the boundary instead of as a NaN or a deep
error.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

# --------------------------------------------------------------------------- constants

#: ``standardize_cut``'s epsilon, added to the population standard deviation.
STANDARDIZE_EPSILON = 1e-5
#: added to both per-map maxima when the human map is rescaled to the saliency's range.
SALIENCY_MAX_EPSILON = 1e-6
#: Keras' categorical cross entropy label smoothing used by the reference loss.
LABEL_SMOOTHING = 0.1
#: pyramid levels averaged by ``pyramidal_mse_with_tokens`` by default.
DEFAULT_NB_LEVELS = 5
#: one axis of the 5x5 binomial kernel ``outer(b, b) / 256``.
BINOMIAL_1D = (1.0, 4.0, 6.0, 4.0, 1.0)
PYRAMID_KERNEL_SIZE = 5
PYRAMID_STRIDE = 2
#: ImageNet statistics of ``preprocess_input`` (inputs first scaled to [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: human inter-rater Spearman on ClickMe: ``alignment_score = mean(spearman) / ceiling``.
HUMAN_SPEARMAN_CEILING = 0.65753


# --------------------------------------------------------------------------- padding rule

def same_padding(size: int, kernel_size: int = PYRAMID_KERNEL_SIZE, stride: int = PYRAMID_STRIDE) -> Tuple[int, int]:
    """(before, after) zero padding of TensorFlow's 'SAME' rule for one side of length ``size``.

    ``out = ceil(size / stride)``, ``total = max((out - 1) * stride + kernel_size - size, 0)``,
    ``floor(total / 2)`` before and the rest after: a 5-tap stride-2 filter pads an even
    side (1, 2) and an odd side (2, 2); symmetric padding would shift the result by a pixel.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


# --------------------------------------------------------------------------- generic checks

def shape_of(x: object) -> str:
    shape = getattr(x, "shape", None)
    return str(tuple(shape)) if shape is not None else type(x).__name__


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(f"`{name}` must be a floating point tensor, got dtype {x.dtype}")
    return x


def check_rank(x: ArrayLike, ranks: Union[int, Sequence[int]], name: str, layout: str) -> None:
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if x.ndim not in ranks:
        raise ValueError(
            f"`{name}` must have rank {' or '.join(map(str, ranks))} ({layout}), "
            f"got shape {shape_of(x)}"
        )


def all_finite(tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """Whether every floating-point tensor among ``tensors`` is finite (None skipped).

    A tensor holding an inf or a NaN sums to inf or NaN, so finite sums prove it in one pass per
    tensor (``isfinite().all()`` takes four: ~5 % of a ViT-B/16 step over its gradients); only when
    a sum is not finite, which a finite tensor can also reach by overflow, is it checked exactly.
    The loss checks its inputs this way too (8 images at 224 px: 0.17 vs 1.9 ms).
    """
    tensors = [t for t in tensors if t is not None and t.is_floating_point()]
    if not tensors:
        return True
    device = tensors[0].device
    sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).to(device)
                        for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).all())


def check_finite(x: torch.Tensor, name: str) -> None:
    if not all_finite([x]):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"`{name}` (shape {shape_of(x)}) contains {bad} non-finite values (NaN or inf)")


def check_same_shape(a: ArrayLike, b: ArrayLike, name_a: str, name_b: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {shape_of(a)} and {shape_of(b)}"
        )


def check_tokens(tokens: torch.Tensor, batch: int, name: str = "tokens") -> None:
    if tokens.ndim != 1 or tokens.shape[0] != batch:
        raise ValueError(
            f"`{name}` must have shape ({batch},) (one weight per map), got {shape_of(tokens)}"
        )


def check_nonnegative(x: torch.Tensor, name: str) -> None:
    """Weights and probabilities: a negative entry would silently flip a loss term's sign."""
    if x.numel() and bool((x < 0).any()):
        raise ValueError(
            f"`{name}` (shape {shape_of(x)}) must be >= 0, got {int((x < 0).sum())} negative values "
            f"(min {float(x.min()):.4g})"
        )


def check_loss_weight(value: object, name: str) -> float:
    """A loss weight (``lambda_*``): a finite real number >= 0, not a string or a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number >= 0, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """An integer count or size ``>= minimum`` (1: positive, 0: non-negative); bools, floats and
    strings are refused with a :class:`ValueError` naming the argument and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"`{name}` must be {kind}, got {value!r}")
    return int(value)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Half-precision inputs are computed in float32; float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- the loss's inputs

def check_nb_levels(nb_levels: object, name: str = "nb_levels") -> int:
    if isinstance(nb_levels, bool) or not isinstance(nb_levels, int) or nb_levels < 1:
        raise ValueError(f"`{name}` must be a positive int, got {nb_levels!r}")
    return nb_levels


def check_maps_and_tokens(
    true_heatmaps: torch.Tensor, predicted_heatmaps: torch.Tensor, tokens: torch.Tensor,
    true_name: str = "true_heatmaps", predicted_name: str = "predicted_heatmaps",
) -> None:
    """Two (N, H, W) maps of one shape, N >= 1, and (N,) tokens."""
    check_tensor(true_heatmaps, true_name)
    check_tensor(predicted_heatmaps, predicted_name)
    check_rank(true_heatmaps, 3, true_name, "(N, H, W)")
    check_rank(predicted_heatmaps, 3, predicted_name, "(N, H, W)")
    check_same_shape(true_heatmaps, predicted_heatmaps, true_name, predicted_name)
    if true_heatmaps.shape[0] == 0:
        raise ValueError(f"`{true_name}` is an empty batch (shape {shape_of(true_heatmaps)}): the loss needs N >= 1 maps")
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"`tokens` must be a torch.Tensor, got {type(tokens).__name__}")
    check_tokens(tokens, true_heatmaps.shape[0])


# --------------------------------------------------------------------------- resize and labels

def tf_resize_bilinear(maps: torch.Tensor, size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """TensorFlow 2 ``tf.image.resize(..., "bilinear")`` of (N, C, H, W) maps.

    Half-pixel centres, no antialiasing: output sample ``x`` reads the input at
    ``(x + 0.5) * H_in / H_out - 0.5``, clamped at the border, linearly interpolated
    (``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``). Each plane
    is resized as its own (1, 1, H, W) map: PyTorch's multi-channel CPU kernel rounds
    differently with the thread count and the batch size, the single-plane one gives the
    same bits either way (so batches do not depend on ``num_workers``).
    """
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    batch, channels = maps.shape[:2]
    planes = maps.reshape(batch * channels, 1, *maps.shape[2:])
    resized = torch.nn.functional.interpolate(
        planes, size=(height, width), mode="bilinear", align_corners=False, antialias=False
    )
    return resized.reshape(batch, channels, height, width)


def one_hot(labels: object, num_classes: int, name: str = "labels") -> torch.Tensor:
    """(N,) integer classes -> (N, num_classes) float32 one-hot rows; out-of-range classes raise."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.ndim != 1:
        raise ValueError(f"`{name}` must be (N,) integer classes, got {labels.dtype} of shape {shape_of(labels)}")
    labels = labels.to(torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = [(i, int(v)) for i, v in enumerate(labels.tolist()) if not 0 <= v < num_classes][:5]
        raise ValueError(f"`{name}` out of range [0, {num_classes}): (position, class) {bad}")
    return torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)
