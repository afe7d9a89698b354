"""Comparison helper shared by the training-loss tests (float32 parity with the TF fixtures)."""
from __future__ import annotations

import numpy as np
import torch

#: float32 parity: 1e-5 relative to each element.
RTOL = 1e-5
#: Elements far below an array's peak lose relative precision to cancellation (e.g.
#: ``x - mean`` in standardize_cut, gradients that nearly cancel); they are compared
#: absolutely at ``NEAR_ZERO * RTOL * max|expected|``, which only dominates for elements
#: more than 10x smaller than the peak.
NEAR_ZERO = 0.1


def as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_matches(actual, expected, rtol: float = RTOL, atol: float | None = None, what: str = "") -> None:
    """Element-wise ``|a - e| <= rtol * |e| + atol`` with the near-zero ``atol`` above by default."""
    a, e = as_numpy(actual), as_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if atol is None:
        atol = NEAR_ZERO * rtol * float(np.abs(e).max(initial=0.0))
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=what)
