"""Input checks shared by the public API; errors name the argument and its shape."""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


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


def check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Half-precision inputs are computed in float32; float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
