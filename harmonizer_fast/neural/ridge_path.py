r"""The alpha path of the ridge readout: residual sums of every alpha, and the validation scores
computed from them.

A ridge fit over an alpha grid is, after one spectral decomposition (see
:mod:`~harmonizer_fast.neural.ridge_solvers`), a family of predictions
:math:`F\,\mathrm{diag}(W_a)\,B`, one per alpha :math:`a`. :func:`alpha_path_moments` reduces each
to three per-target sums of its residuals without ever holding the
``(n_alphas, n_samples, n_targets)`` path, and every validation score (:data:`SCORERS`) is a
function of those sums and the moments of the targets (:class:`PathStats`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np

from harmonizer_fast.neural._backend import matmul, residual_moments, threads_for_product

__all__ = ["PathStats", "SCORERS", "DEFAULT_SCORING", "PATH_COLUMNS", "alpha_path_moments", "path_chunk", "path_stats"]


@dataclass
class PathStats:
    """Sums over validation samples, per alpha and target, of residuals ``r = y - y_hat``.

    ``y`` is the target centred by the training offset; ``sr``, ``srr``, ``syr`` have shape
    (n_alphas, n_targets); ``sy``, ``syy`` shape (n_targets,), computed from ``y`` when first
    used (the leave-one-out MSE needs neither); ``n`` the sample count.
    """

    n: int
    y: np.ndarray
    sr: np.ndarray
    srr: np.ndarray
    syr: np.ndarray

    @functools.cached_property
    def sy(self) -> np.ndarray:
        return self.y.sum(axis=0)

    @functools.cached_property
    def syy(self) -> np.ndarray:
        return np.einsum("ij,ij->j", self.y, self.y)

    def total_sum_of_squares(self) -> np.ndarray:
        return self.syy - self.sy**2 / self.n


def _neg_mse(s: PathStats) -> np.ndarray:
    r""":math:`-\frac{1}{n}\sum_i r_{it}^2`."""
    return -s.srr / s.n


def _r2(s: PathStats) -> np.ndarray:
    r""":math:`1 - \sum_i r_{it}^2 / \sum_i (y_{it} - \bar y_t)^2`; a constant target scores 1
    when predicted exactly, else 0 (scikit-learn's ``r2_score``)."""
    sst = s.total_sum_of_squares()
    constant = sst <= 1e-13 * np.maximum(s.syy, np.finfo(float).tiny)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - s.srr / np.where(constant, 1.0, sst)
    fallback = np.where(s.srr <= 1e-13 * np.maximum(s.syy, np.finfo(float).tiny), 1.0, 0.0)
    return np.where(constant, fallback, r2)


def _pearson(s: PathStats) -> np.ndarray:
    r"""Pearson correlation of :math:`y` and :math:`\hat y = y - r` from the sums:
    :math:`n\,\mathrm{cov}(y, \hat y) = S_{yy} - C_{yr}`,
    :math:`n\,\mathrm{var}(\hat y) = S_{yy} - 2 C_{yr} + C_{rr}` (centred sums). Undefined
    (NaN, never selected) where either side is constant."""
    sst = s.total_sum_of_squares()
    c_yr = s.syr - s.sy * s.sr / s.n
    c_rr = s.srr - s.sr**2 / s.n
    var_pred = sst - 2.0 * c_yr + c_rr
    denom = np.sqrt(np.maximum(sst, 0.0) * np.maximum(var_pred, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, (sst - c_yr) / np.where(denom > 0, denom, 1.0), np.nan)


#: Validation scores by name: each maps the residual sums to one score per (alpha, target).
#: ``None`` means scikit-learn's default: negative MSE for leave-one-out, R^2 for K-fold.
SCORERS: Dict[str, Callable[[PathStats], np.ndarray]] = {
    "neg_mean_squared_error": _neg_mse,
    "r2": _r2,
    "pearson": _pearson,
}
DEFAULT_SCORING = {"loo": "neg_mean_squared_error", "kfold": "r2"}

#: Most columns of one product of the alpha path: alphas are stacked, up to
#: ``PATH_COLUMNS // n_targets`` at a time (in chunks of equal size), so that few targets still
#: make a wide product (500 x 200 -> 10, twenty alphas, one thread: twenty 200 x 10 products
#: 0.63 ms on OpenBLAS and 0.72 ms on MKL, one 200 x 200 product 0.43 ms on MKL).
PATH_COLUMNS = 256


# --------------------------------------------------------------------------- alpha path


def path_chunk(n_alphas: int, n_targets: int) -> int:
    """Alphas per product of the alpha path: the fewest chunks of at most ``PATH_COLUMNS //
    n_targets`` alphas (at least one), split evenly (20 alphas of 10 targets: one chunk of
    20; of 80 targets: seven chunks of 3, the last of 2)."""
    n_chunks = -(-n_alphas // max(1, PATH_COLUMNS // n_targets))
    return -(-n_alphas // n_chunks)




def alpha_path_moments(
    F: np.ndarray,
    W: np.ndarray,
    B: np.ndarray,
    Y: np.ndarray,
    D: Optional[np.ndarray] = None,
    residual: bool = False,
) -> np.ndarray:
    r"""Residual sums of a family of spectral ridge solutions, a few alphas at a time.

    For each alpha :math:`a` (row of ``W``) the residuals are

    .. math::

        r^{(a)} = \bigl(Y - F\,\mathrm{diag}(W_a)\,B\bigr) / D_a[:, \text{None}]

    or, with ``residual=True`` (``W`` holds the complementary weights, so the product is the
    residual itself, formed without subtracting), :math:`r^{(a)} = F\,\mathrm{diag}(W_a)\,B / D_a`

    and the result holds, per alpha and target, :math:`\sum_i r`, :math:`\sum_i r^2` and
    :math:`\sum_i Y r` (see :func:`~harmonizer_fast.neural._backend.residual_moments`). The
    ``c`` alphas of a chunk (``c <= max(1, PATH_COLUMNS // n_targets)``) are one product
    :math:`F\,[\mathrm{diag}(W_{a_1}) B, \dots, \mathrm{diag}(W_{a_c}) B]` and one reduction
    pass.

    Memory contract: besides its output (``3 * n_alphas * n_targets`` values) this allocates
    one ``(n_samples, c * n_targets)`` buffer (at most ``max(n_targets, PATH_COLUMNS)``
    columns) and one ``(k, c * n_targets)`` scaled copy of ``B``, both reused for every
    chunk: never an ``(n_alphas, n_samples, n_targets)`` array (beyond ``PATH_COLUMNS``
    columns).

    Parameters
    ----------
    F : (n_samples, k) float64 basis (``X_c V`` or ``Q``, or validation rows of it)
    W : (n_alphas, k) float64 spectral weights
    B : (k, n_targets) float64 projections of the training targets
    Y : (n_samples, n_targets) float64 targets, centred by the training offset
    D : (n_alphas, n_samples) float64 leave-one-out denominators, or None (K-fold)
    residual : whether ``F diag(W_a) B`` is the residual rather than the prediction

    Returns
    -------
    float64 array of shape (n_alphas, 3, n_targets)
    """
    n_alphas, k = W.shape
    n, t = Y.shape
    chunk = path_chunk(n_alphas, t)
    out = np.empty((n_alphas, 3, t))
    # reused by every chunk (a shorter last chunk uses the first values): the products and the
    # scaled copies of B, laid out (k, alpha, target) so that the scaling writes them directly
    product_buffer = np.empty(n * chunk * t)
    scaled_buffer = np.empty(k * chunk * t)
    # small products lose more to BLAS thread start-up/spinning than they gain (see
    # threads_for_product); large ones keep every thread
    with threads_for_product(n * k * t):
        for start in range(0, n_alphas, chunk):
            stop = min(n_alphas, start + chunk)
            width = (stop - start) * t
            scaled = scaled_buffer[: k * width].reshape(k, stop - start, t)
            np.multiply(W[start:stop].T[:, :, None], B[:, None, :], out=scaled)
            product = matmul(F, scaled.reshape(k, width), out=product_buffer[: n * width].reshape(n, width))
            out[start:stop] = residual_moments(
                Y, product.reshape(n, stop - start, t), None if D is None else D[start:stop], residual
            )
    return out


def path_stats(moments: np.ndarray, Y: np.ndarray) -> PathStats:
    """The sums of :func:`alpha_path_moments` (``moments``) with the moments of the targets ``Y``."""
    return PathStats(n=Y.shape[0], y=Y, sr=moments[:, 0], srr=moments[:, 1], syr=moments[:, 2])
