r"""Solvers of the ridge readout: the spectral decompositions and the three routes that score an
alpha grid from one of them (see :mod:`~harmonizer_fast.neural.ridge` for the maths).

* :func:`primal_loo` (:math:`p < n`): :math:`X_c^\top X_c = V \Lambda V^\top`,
  :math:`F = X_c V`, :math:`w_\alpha = 1/(\lambda + \alpha)`, leave-one-out residuals
  :math:`(y_c - F\,\mathrm{diag}(w_\alpha) F^\top y_c) / (1 - h_\alpha - \tfrac1n)`.
* :func:`primal_kfold`: per fold, the training Gram as a downdate of the full one.
* :func:`dual_scores` (:math:`p \ge n`, or a given Gram): :math:`K_c = Q \Lambda Q^\top` on
  the complement of the constant vector (:func:`eigh_orthogonal_to_ones`), leave-one-out
  residuals formed as sums of non-negative terms, or K-fold on centred fold Grams.

Each route returns the validation scores of every (alpha, target) and a ``refit`` that maps
the chosen alpha of each target to the coefficients (primal: :math:`p \times t`; dual:
:math:`n \times t` dual coefficients). Decompositions and products follow the thread policy
of :mod:`~harmonizer_fast.neural._backend`.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import scipy.linalg
import torch

from harmonizer_fast.spec import shape_of
from harmonizer_fast.neural._backend import (
    SMALL_DECOMPOSITION,
    matmul,
    single_torch_thread,
    threads_for_decomposition,
)
from harmonizer_fast.neural.ridge_path import SCORERS, alpha_path_moments, path_stats

__all__ = [
    "Refit",
    "check_no_overflow",
    "dual_scores",
    "eigh_orthogonal_to_ones",
    "eigh_psd",
    "features_times",
    "kfold_indices",
    "primal_kfold",
    "primal_loo",
    "sample_gram",
    "solve_shifted",
]

#: Feature blocks used when the dual Gram is accumulated from a float32/float64 design
#: (bounds the float64 copy to n x _FEATURE_BLOCK values).
_FEATURE_BLOCK = 4096

#: Maps the chosen alpha of each target to that target's coefficients.
Refit = Callable[[np.ndarray], np.ndarray]
Splits = Optional[Sequence[Tuple[np.ndarray, np.ndarray]]]



def eigh_psd(G: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    r"""Eigendecomposition :math:`G = V \operatorname{diag}(\lambda) V^\top` of a symmetric PSD
    matrix (its lower triangle is read); round-off negatives of :math:`\lambda` are clipped to 0.

    The backend depends on the order only (so the result bits never depend on the load):
    below :data:`~harmonizer_fast.neural._backend.SMALL_DECOMPOSITION`, where decompositions
    run on one thread anyway, torch's LAPACK ``dsyevd`` (MKL in torch's x86 wheels) on one
    torch thread, zero-copy from NumPy; above, NumPy's (OpenBLAS) on the process's threads.
    One thread, quiet machine: order 200 1.70 ms vs NumPy's 2.11 ms, 100: 0.42 vs 0.54 ms,
    500: 15.9 vs 17.6 ms (torch's call costs ~5 us more below order ~20, where both take
    microseconds). Eigenvector signs may differ between backends; every formula using ``V``
    here is invariant to them.
    """
    if G.shape[0] < SMALL_DECOMPOSITION and torch._C.has_lapack:
        if G.flags.f_contiguous and G.flags.writeable:
            column_major, triangle = G, "L"
        else:  # G^T is G in column-major order: torch's LAPACK copy is then a plain memcpy, not a
            # transposing one (order 200: 1.46 vs 1.53 ms); its upper triangle is G's lower one
            column_major, triangle = np.ascontiguousarray(G).T, "U"
            if not column_major.flags.writeable:
                column_major = column_major.copy(order="F")
        with single_torch_thread():
            lam_t, vecs_t = torch.linalg.eigh(torch.from_numpy(column_major), UPLO=triangle)
        lam, vecs = lam_t.numpy(), vecs_t.numpy()
    else:
        with threads_for_decomposition(G.shape[0]):
            lam, vecs = np.linalg.eigh(G)
    return np.maximum(lam, 0.0), vecs


def eigh_orthogonal_to_ones(K: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    r"""Eigenpairs of a centred Gram matrix on the complement of the constant vector.

    A centred Gram :math:`K = J K_0 J` (:math:`J = I - \tfrac1n 1 1^\top`) has :math:`1` in its
    null space. The Householder reflector :math:`H = I - 2 w w^\top / w^\top w`,
    :math:`w = 1/\sqrt n + e_1`, maps :math:`1/\sqrt n` to :math:`-e_1`, so the last
    :math:`n - 1` columns of :math:`H` are an orthonormal basis :math:`P` of :math:`1^\perp`.
    With :math:`P^\top K P = Q' \Lambda Q'^\top` (an :math:`(n-1)`-square problem),
    :math:`F = P Q'` satisfies :math:`K = F \Lambda F^\top`, :math:`F^\top F = I`,
    :math:`F^\top 1 = 0` exactly: the intercept's direction is removed by construction instead
    of being an eigenvalue ~1e-13 that round-off places among the genuine null directions.
    :math:`H K H = K - b w^\top - w b^\top` with :math:`b = \tfrac{2}{c} K w - \tfrac{2 w^\top K w}{c^2} w`,
    :math:`c = w^\top w`, and :math:`F = P Q' = E Q' - \tfrac2c w (w_{1:}^\top Q')` (:math:`E`
    embeds rows 1..n-1): :math:`O(n^2)` beyond the eigendecomposition.

    Returns
    -------
    (lam, F): (n - 1,) eigenvalues >= 0 and the (n, n - 1) orthonormal basis.
    """
    n = K.shape[0]
    w = np.full(n, 1.0 / np.sqrt(n))
    w[0] += 1.0
    c = w @ w
    Kw = K @ w
    b = (2.0 / c) * Kw - (2.0 * (w @ Kw) / c**2) * w
    reflected = K[1:, 1:] - np.outer(b[1:], w[1:]) - np.outer(w[1:], b[1:])
    lam, Q = eigh_psd(reflected)
    F = np.empty((n, n - 1))
    F[0] = 0.0
    F[1:] = Q
    F -= np.outer((2.0 / c) * w, w[1:] @ Q)
    return lam, F


def dual_basis(K: np.ndarray, intercept: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a (centred, with an intercept) Gram: a full orthonormal basis of the
    sample space (of the complement of the constant vector with an intercept)."""
    return eigh_orthogonal_to_ones(K) if intercept and K.shape[0] > 1 else eigh_psd(K)


def sample_gram(X: np.ndarray, x_mean: Optional[np.ndarray]) -> np.ndarray:
    """:math:`X_c X_c^\\top` in float64, accumulated over feature blocks (no full float64 copy)."""
    n, p = X.shape
    K = np.zeros((n, n))
    buffer = np.empty((n, min(p, _FEATURE_BLOCK)))
    for start in range(0, p, _FEATURE_BLOCK):
        columns = X[:, start : start + _FEATURE_BLOCK]
        block = buffer[:, : columns.shape[1]]
        # converting into one reused buffer: np.array(columns, dtype=float64) of a column slice
        # is ~20x slower (3,200 x 4,096 float32: 0.47-0.54 s vs 0.01-0.03 s)
        np.copyto(block, columns)
        if x_mean is not None:
            block -= x_mean[start : start + _FEATURE_BLOCK]
        K += block @ block.T  # NumPy dispatches A @ A.T to dsyrk (half the flops of dgemm)
    return K


def features_times(X: np.ndarray, x_mean: Optional[np.ndarray], C: np.ndarray) -> np.ndarray:
    """:math:`X_c^\\top C` (p x t) in float64 over feature blocks, for dual coefficients."""
    p = X.shape[1]
    out = np.empty((p, C.shape[1]))
    col_sums = C.sum(axis=0)
    for start in range(0, p, _FEATURE_BLOCK):
        block = np.asarray(X[:, start : start + _FEATURE_BLOCK], dtype=np.float64)
        out[start : start + block.shape[1]] = block.T @ C
        if x_mean is not None:
            out[start : start + block.shape[1]] -= np.outer(x_mean[start : start + _FEATURE_BLOCK], col_sums)
    return out


def check_no_overflow(G: np.ndarray, X: np.ndarray, what: str) -> None:
    """A finite ``X`` whose products overflow float64 gives an inf/NaN Gram: say so, naming ``X``."""
    if not np.isfinite(G).all():
        raise ValueError(
            f"`X` (shape {shape_of(X)}, largest |value| {float(np.max(np.abs(X))):.3g}) is finite but "
            f"overflows float64 in {what}; rescale X (for example divide it by its largest absolute value)"
        )


def solve_shifted(G: np.ndarray, R: np.ndarray, alpha_per_column: np.ndarray) -> np.ndarray:
    r"""Columns :math:`(G + \alpha_t I)^{-1} R_{:,t}` for a PSD ``G``.

    One Cholesky factorisation per distinct alpha (k^3/3 flops each) while that is cheaper
    than one eigendecomposition (~9 k^3), else the eigendecomposition serves all alphas."""
    distinct = np.unique(alpha_per_column)
    out = np.empty_like(R)
    if len(distinct) <= 8:
        for a in distinct:
            cols = alpha_per_column == a
            with threads_for_decomposition(G.shape[0]):
                factor = scipy.linalg.cho_factor(G + a * np.eye(G.shape[0]), lower=False, check_finite=False)
                out[:, cols] = scipy.linalg.cho_solve(factor, R[:, cols], check_finite=False)
        return out
    lam, vecs = eigh_psd(G)
    return vecs @ ((vecs.T @ R) / (lam[:, None] + alpha_per_column[None, :]))


def kfold_indices(n_samples: int, n_splits: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Contiguous K-fold splits as scikit-learn's ``KFold(n_splits)`` (no shuffle): the first
    ``n_samples % n_splits`` folds hold one extra sample."""
    if n_splits < 2:
        raise ValueError(f"cv must be at least 2 folds, got cv={n_splits}")
    if n_splits > n_samples:
        raise ValueError(
            f"cv={n_splits} folds need at least {n_splits} samples, got n_samples={n_samples}; "
            "use fewer folds or cv=None (leave-one-out)"
        )
    sizes = np.full(n_splits, n_samples // n_splits)
    sizes[: n_samples % n_splits] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    everything = np.arange(n_samples)
    return [
        (np.concatenate([everything[: bounds[f]], everything[bounds[f + 1] :]]), everything[bounds[f] : bounds[f + 1]])
        for f in range(n_splits)
    ]




# --------------------------------------------------------------------------- routes


def primal_loo(
    Xc: np.ndarray, G: np.ndarray, Yc: np.ndarray, alphas: np.ndarray, scoring: str, intercept: bool
) -> Tuple[np.ndarray, Refit]:
    r"""Exact leave-one-out scores from :math:`G = X_c^\top X_c = V \Lambda V^\top`.

    With :math:`F = X_c V`, :math:`B = F^\top Y_c`, :math:`w_\alpha = 1/(\lambda + \alpha)`, the
    residual of sample :math:`i` left out is
    :math:`(Y_c - F\,\mathrm{diag}(w_\alpha) B)_{it} / (1 - \sum_k F_{ik}^2 w_{\alpha k} - \tfrac1n)`
    (the :math:`\tfrac1n` is the intercept's leverage). Returns the (n_alphas, n_targets)
    scores and the refit :math:`V (B / (\lambda + \alpha_t))` (p x t coefficients).
    """
    n = Xc.shape[0]
    lam, V = eigh_psd(G)
    F = matmul(Xc, V)
    W = np.reciprocal(np.add.outer(alphas, lam))
    B = matmul(Yc.T, F).T  # as F^T Y_c: the (t, n) x (n, k) order is the faster product here
    # leverage of every sample under every alpha: (n_alphas, n); p < n keeps it small
    D = matmul(W, np.square(F).T)
    np.subtract(1.0 - (1.0 / n if intercept else 0.0), D, out=D)
    scores = SCORERS[scoring](path_stats(alpha_path_moments(F, W, B, Yc, D), Yc))
    return scores, lambda chosen: matmul(V, B / np.add.outer(lam, chosen))

def primal_kfold(
    Xc: np.ndarray,
    G: np.ndarray,
    Y: np.ndarray,
    Yc: np.ndarray,
    alphas: np.ndarray,
    scoring: str,
    intercept: bool,
    splits: Sequence[Tuple[np.ndarray, np.ndarray]],
) -> Tuple[np.ndarray, Refit]:
    r"""K-fold scores, averaged over ``splits``: per fold,
    :math:`G_{tr} = G - X_{te}^\top X_{te} - n_{tr}\, s s^\top` (:math:`s` the training rows'
    mean of :math:`X_c`), :math:`G_{tr} = V \Lambda V^\top`, validation predictions
    :math:`(X_{te} - s) V \mathrm{diag}(w_\alpha) V^\top X_{tr}^\top (Y_{tr} - \bar y_{tr})`.
    The refit solves :math:`(G + \alpha_t I)^{-1} X_c^\top Y_c` on all samples."""
    total = np.zeros((len(alphas), Y.shape[1]))
    for train, test in splits:
        y_off = Y[train].mean(axis=0) if intercept else np.zeros(Y.shape[1])
        X_te = Xc[test]
        G_tr = G - X_te.T @ X_te  # the Gram of a fold is a downdate of the full one
        if intercept:
            shift = Xc[train].mean(axis=0)
            G_tr -= len(train) * np.outer(shift, shift)
            X_te = X_te - shift
        lam, V = eigh_psd(G_tr)
        B = V.T @ (Xc[train].T @ (Y[train] - y_off))
        W = 1.0 / (lam[None, :] + alphas[:, None])
        Y_te = Y[test] - y_off
        total += SCORERS[scoring](path_stats(alpha_path_moments(X_te @ V, W, B, Y_te), Y_te))
    return total / len(splits), lambda chosen: solve_shifted(G, Xc.T @ Yc, chosen)

def dual_scores(
    Kc: np.ndarray,
    Y: np.ndarray,
    Yc: np.ndarray,
    alphas: np.ndarray,
    scoring: str,
    intercept: bool,
    splits: Splits,
) -> Tuple[np.ndarray, Refit]:
    r"""Scores of every alpha and the refit of dual coefficients from a (centred) Gram.

    Leave-one-out (``splits=None``): :math:`K_c = F \Lambda F^\top` with :math:`F` an orthonormal
    basis of the sample space (of :math:`1^\perp` with an intercept), residual numerator
    :math:`[F\,\mathrm{diag}(\alpha/(\lambda+\alpha))\,F^\top Y_c]_{it}` and denominator
    :math:`\sum_k F_{ik}^2\,\alpha/(\lambda_k+\alpha)`: sums of non-negative terms, no
    cancellation at near-interpolating alphas. K-fold: the Gram centred on each fold's training
    rows, eigendecomposed per fold. The refit gives :math:`(K_c + \alpha_t I)^{-1} Y_c` (n x t).
    """
    if splits is None:
        lam, F = dual_basis(Kc, intercept)
        B = F.T @ Yc
        complement = alphas[:, None] / (lam[None, :] + alphas[:, None])  # 1 - w_alpha
        D = complement @ (F * F).T
        moments = alpha_path_moments(F, complement, B, Yc, D, residual=True)
        scores = SCORERS[scoring](path_stats(moments, Yc))
        return scores, lambda chosen: F @ (B / (lam[:, None] + chosen[None, :]))
    total = np.zeros((len(alphas), Y.shape[1]))
    for train, test in splits:
        y_off = Y[train].mean(axis=0) if intercept else np.zeros(Y.shape[1])
        K_tr = Kc[np.ix_(train, train)]
        K_te = Kc[np.ix_(test, train)]
        if intercept:  # centre on the training rows of the fold
            row_mean = Kc[train].mean(axis=0)  # <x_j, mean of training rows>
            grand = row_mean[train].mean()
            K_tr = K_tr - row_mean[train][:, None] - row_mean[train][None, :] + grand
            K_te = K_te - row_mean[test][:, None] - row_mean[train][None, :] + grand
        lam, Q = dual_basis(K_tr, intercept)
        B = Q.T @ (Y[train] - y_off)
        W = 1.0 / (lam[None, :] + alphas[:, None])
        Y_te = Y[test] - y_off
        total += SCORERS[scoring](path_stats(alpha_path_moments(K_te @ Q, W, B, Y_te), Y_te))
    return total / len(splits), lambda chosen: solve_shifted(Kc, Yc, chosen)
