r"""Ridge readout with the regularisation chosen by cross-validation, for IT-cortex scoring.

:class:`RidgeCV` solves, for every alpha of a grid and every target at once,

.. math::

    \hat w_t(\alpha) = \arg\min_w \; \lVert y_t - b_t - X w \rVert^2 + \alpha \lVert w \rVert^2,

with an unpenalised intercept :math:`b_t` (``fit_intercept=True``), and keeps per target (or
for all targets) the alpha with the best validation score. It matches scikit-learn's
``RidgeCV`` (predictions to float rounding) and is several times faster:

* One spectral decomposition serves the whole alpha grid. With :math:`X_c` the centred
  design (:math:`n` samples, :math:`p` features), the *primal* route (:math:`p < n`)
  eigendecomposes :math:`X_c^\top X_c = V \Lambda V^\top` (:math:`p \times p`); the *dual*
  route (:math:`p \ge n`) eigendecomposes :math:`X_c X_c^\top = Q \Lambda Q^\top`
  (:math:`n \times n`), so a 100k-feature layer costs an :math:`n \times n` problem.
  Both give the hat matrix :math:`H_\alpha = F \,\mathrm{diag}(w_\alpha)\, F^\top` with
  :math:`F = X_c V,\ w_\alpha = 1/(\lambda + \alpha)` (primal) or
  :math:`F = Q,\ w_\alpha = \lambda/(\lambda + \alpha)` (dual).
* Leave-one-out (``cv=None``) is exact and closed-form: with :math:`B = F^\top y_c`,

  .. math::

      e_{it}(\alpha) = \frac{y_{c,it} - [F\,\mathrm{diag}(w_\alpha) B]_{it}}
                            {1 - [H_\alpha]_{ii} - \tfrac{1}{n}\,[\text{intercept}]}

  is the error on sample :math:`i` of the model fitted without it (the :math:`1/n` is the
  hat value of the intercept, as in scikit-learn's GCV). In the dual, where :math:`p \ge n`
  and a small alpha nearly interpolates, :math:`H_\alpha \to I - \tfrac1n 1 1^\top`: numerator and
  denominator are then tiny differences of O(1) terms, and forming them as differences lost
  up to 8 digits (a relative error of 6e-9 in the LOO MSE at 30 x 70, alpha 0.01, which
  changed with the BLAS kernels of the machine). The dual route therefore never subtracts:
  :math:`Q` is an orthonormal basis of the whole sample space (of the complement of
  :math:`1`, with an intercept, see :func:`eigh_orthogonal_to_ones`), so
  :math:`I - H_\alpha - \tfrac1n 1 1^\top = Q\,\mathrm{diag}(\alpha/(\lambda+\alpha))\,Q^\top`
  and both are sums of non-negative weights: numerator :math:`[Q\,\mathrm{diag}(\alpha/(\lambda+\alpha)) B]_{it}`,
  denominator :math:`\sum_k Q_{ik}^2\, \alpha/(\lambda_k+\alpha)`.
* Kernel form: the dual route needs the features only through the Gram matrix
  :math:`K = X X^\top`, so :meth:`RidgeCV.fit_gram` fits from a precomputed train Gram and
  :meth:`RidgeCV.predict_gram` predicts from the test x train cross-Gram, with the same
  predictions as :meth:`RidgeCV.fit` / :meth:`RidgeCV.predict` on the features (for layers
  whose features do not fit in memory: accumulate :math:`K` over feature blocks).
* K-fold (``cv=int`` or a splitter) decomposes each training fold (the primal Gram of a
  fold is a downdate of the full one) and predicts its validation fold for all alphas.
* Each alpha is scored from three per-target sums of its residuals (one C++ pass, see
  :func:`~harmonizer_fast.neural._backend.residual_moments`), never keeping an
  ``(n_alphas, n_samples, n_targets)`` array: see :func:`alpha_path_moments`.

All arithmetic is float64 (as scikit-learn >= 1.5 does for this estimator); float32 inputs
give float32 ``coef_``/``intercept_``/predictions. The estimator is a scikit-learn estimator
(``clone``, ``get_params``/``set_params``, grid search, ``NotFittedError``, R^2 ``score``).
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.linalg
from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from harmonizer_fast.spec import shape_of
from harmonizer_fast.neural._backend import (
    centre_cross_gram,
    centre_gram,
    check_features,
    check_gram,
    check_targets,
    single_blas_thread,
    pearson_per_target,
    residual_moments,
)

__all__ = [
    "RidgeCV",
    "alpha_path_moments",
    "eigh_orthogonal_to_ones",
    "kfold_indices",
    "pearson_per_target",
    "SCORERS",
]

#: Feature blocks used when the dual Gram is accumulated from a float32/float64 design
#: (bounds the float64 copy to n x _FEATURE_BLOCK values).
_FEATURE_BLOCK = 4096
#: Multiply-adds below which a product runs on one BLAS thread.
_SMALL_PRODUCT = 50_000_000
#: Order below which a decomposition runs on one BLAS thread: threading a small ``eigh`` or
#: Cholesky costs more than it saves, and far more on a busy machine (a 39 x 39 ``eigh`` took
#: 37 ms on two OpenBLAS threads at load 6, 0.3 ms on one). A rule on the size only, so the
#: result bits never depend on the load.
_SMALL_DECOMPOSITION = 512


# --------------------------------------------------------------------------- scoring


@dataclass
class _PathStats:
    """Sums over validation samples, per alpha and target, of residuals ``r = y - y_hat``.

    ``y`` is the target centred by the training offset; ``sr``, ``srr``, ``syr`` have shape
    (n_alphas, n_targets); ``sy``, ``syy`` shape (n_targets,); ``n`` the sample count.
    """

    n: int
    sy: np.ndarray
    syy: np.ndarray
    sr: np.ndarray
    srr: np.ndarray
    syr: np.ndarray

    def total_sum_of_squares(self) -> np.ndarray:
        return self.syy - self.sy**2 / self.n


def _neg_mse(s: _PathStats) -> np.ndarray:
    r""":math:`-\frac{1}{n}\sum_i r_{it}^2`."""
    return -s.srr / s.n


def _r2(s: _PathStats) -> np.ndarray:
    r""":math:`1 - \sum_i r_{it}^2 / \sum_i (y_{it} - \bar y_t)^2`; a constant target scores 1
    when predicted exactly, else 0 (scikit-learn's ``r2_score``)."""
    sst = s.total_sum_of_squares()
    constant = sst <= 1e-13 * np.maximum(s.syy, np.finfo(float).tiny)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - s.srr / np.where(constant, 1.0, sst)
    fallback = np.where(s.srr <= 1e-13 * np.maximum(s.syy, np.finfo(float).tiny), 1.0, 0.0)
    return np.where(constant, fallback, r2)


def _pearson(s: _PathStats) -> np.ndarray:
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
SCORERS: Dict[str, Callable[[_PathStats], np.ndarray]] = {
    "neg_mean_squared_error": _neg_mse,
    "r2": _r2,
    "pearson": _pearson,
}
_DEFAULT_SCORING = {"loo": "neg_mean_squared_error", "kfold": "r2"}


# --------------------------------------------------------------------------- alpha path


def alpha_path_moments(
    F: np.ndarray,
    W: np.ndarray,
    B: np.ndarray,
    Y: np.ndarray,
    D: Optional[np.ndarray] = None,
    residual: bool = False,
) -> np.ndarray:
    r"""Residual sums of a family of spectral ridge solutions, one alpha at a time.

    For each alpha :math:`a` (row of ``W``) the residuals are

    .. math::

        r^{(a)} = \bigl(Y - F\,\mathrm{diag}(W_a)\,B\bigr) / D_a[:, \text{None}]

    or, with ``residual=True`` (``W`` holds the complementary weights, so the product is the
    residual itself, formed without subtracting), :math:`r^{(a)} = F\,\mathrm{diag}(W_a)\,B / D_a`

    and the result holds, per alpha and target, :math:`\sum_i r`, :math:`\sum_i r^2` and
    :math:`\sum_i Y r` (see :func:`~harmonizer_fast.neural._backend.residual_moments`).

    Memory contract: besides its output (``3 * n_alphas * n_targets`` values) this allocates
    one ``(n_samples, n_targets)`` buffer, reused for every alpha, and one
    ``(k, n_targets)`` scaled copy of ``B`` at a time: never an
    ``(n_alphas, n_samples, n_targets)`` array.

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
    n_alphas = W.shape[0]
    out = np.empty((n_alphas, 3, Y.shape[1]))
    prediction = np.empty_like(Y)
    # small products lose more to BLAS thread start-up/spinning than they gain (see
    # single_blas_thread); large ones keep every thread
    small = F.shape[0] * F.shape[1] * B.shape[1] < _SMALL_PRODUCT
    with single_blas_thread() if small else contextlib.nullcontext():
        for a in range(n_alphas):
            np.matmul(F, W[a][:, None] * B, out=prediction)
            out[a] = residual_moments(Y, prediction, None if D is None else D[a], residual)
    return out


def _path_stats(moments: np.ndarray, Y: np.ndarray) -> _PathStats:
    return _PathStats(
        n=Y.shape[0],
        sy=Y.sum(axis=0),
        syy=np.einsum("ij,ij->j", Y, Y),
        sr=moments[:, 0],
        srr=moments[:, 1],
        syr=moments[:, 2],
    )


# --------------------------------------------------------------------------- decompositions


def _decomposition_threads(order: int) -> "contextlib.AbstractContextManager[None]":
    return single_blas_thread() if order < _SMALL_DECOMPOSITION else contextlib.nullcontext()


def _eigh(G: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of a symmetric PSD matrix; round-off negatives are clipped to 0."""
    with _decomposition_threads(G.shape[0]):
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
    lam, Q = _eigh(reflected)
    F = np.empty((n, n - 1))
    F[0] = 0.0
    F[1:] = Q
    F -= np.outer((2.0 / c) * w, w[1:] @ Q)
    return lam, F


def _dual_basis(K: np.ndarray, intercept: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a (centred, with an intercept) Gram: a full orthonormal basis of the
    sample space (of the complement of the constant vector with an intercept)."""
    return eigh_orthogonal_to_ones(K) if intercept and K.shape[0] > 1 else _eigh(K)


def _sample_gram(X: np.ndarray, x_mean: Optional[np.ndarray]) -> np.ndarray:
    """:math:`X_c X_c^\\top` in float64, accumulated over feature blocks (no full float64 copy)."""
    n, p = X.shape
    K = np.zeros((n, n))
    for start in range(0, p, _FEATURE_BLOCK):
        block = np.array(X[:, start : start + _FEATURE_BLOCK], dtype=np.float64, order="C")
        if x_mean is not None:
            block -= x_mean[start : start + _FEATURE_BLOCK]
        K += block @ block.T  # NumPy dispatches A @ A.T to dsyrk (half the flops of dgemm)
    return K


def _features_times(X: np.ndarray, x_mean: Optional[np.ndarray], C: np.ndarray) -> np.ndarray:
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


def _check_no_overflow(G: np.ndarray, X: np.ndarray, what: str) -> None:
    """A finite ``X`` whose products overflow float64 gives an inf/NaN Gram: say so, naming ``X``."""
    if not np.isfinite(G).all():
        raise ValueError(
            f"`X` (shape {shape_of(X)}, largest |value| {float(np.max(np.abs(X))):.3g}) is finite but "
            f"overflows float64 in {what}; rescale X (for example divide it by its largest absolute value)"
        )


def _solve_shifted(G: np.ndarray, R: np.ndarray, alpha_per_column: np.ndarray) -> np.ndarray:
    r"""Columns :math:`(G + \alpha_t I)^{-1} R_{:,t}` for a PSD ``G``.

    One Cholesky factorisation per distinct alpha (k^3/3 flops each) while that is cheaper
    than one eigendecomposition (~9 k^3), else the eigendecomposition serves all alphas."""
    distinct = np.unique(alpha_per_column)
    out = np.empty_like(R)
    if len(distinct) <= 8:
        for a in distinct:
            cols = alpha_per_column == a
            with _decomposition_threads(G.shape[0]):
                factor = scipy.linalg.cho_factor(G + a * np.eye(G.shape[0]), lower=False, check_finite=False)
                out[:, cols] = scipy.linalg.cho_solve(factor, R[:, cols], check_finite=False)
        return out
    lam, vecs = _eigh(G)
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


# --------------------------------------------------------------------------- estimator


CVLike = Union[None, int, Iterable[Tuple[np.ndarray, np.ndarray]], object]
Refit = Callable[[np.ndarray], np.ndarray]


class RidgeCV(MultiOutputMixin, RegressorMixin, BaseEstimator):
    r"""Ridge regression over a grid of alphas, chosen by leave-one-out or K-fold CV.

    A scikit-learn estimator: ``clone``-able, ``get_params``/``set_params``, usable in
    ``GridSearchCV``/pipelines, ``NotFittedError`` before ``fit``, ``score`` is the mean R^2
    over targets (``RegressorMixin``).

    Parameters
    ----------
    alphas : sequence of float > 0
        Regularisation strengths to try.
    fit_intercept : bool
        Fit an unpenalised intercept per target (X and Y are centred by their training means).
    cv : None, int, splitter or iterable of (train, test) index arrays
        None: efficient exact leave-one-out (scikit-learn's GCV formula). int: that many
        contiguous folds (``KFold`` without shuffling). An object with ``split(X, Y)`` or an
        iterable of index pairs: those folds.
    alpha_per_target : bool
        Choose the alpha of each target separately (any ``cv``; scikit-learn only allows it with
        leave-one-out, and for K-fold this equals running scikit-learn's RidgeCV per target).
    scoring : None, 'neg_mean_squared_error', 'r2' or 'pearson'
        Validation score to maximise (see :data:`SCORERS`). None as scikit-learn: negative MSE
        for leave-one-out, R^2 (``Ridge.score``) for K-fold. Per fold (or over all LOO samples)
        per target, then averaged over folds and, unless ``alpha_per_target``, over targets.

    Attributes
    ----------
    alpha_ : float, or (n_targets,) array when ``alpha_per_target`` and several targets
    best_score_ : float or (n_targets,) array, the chosen alpha's validation score
    cv_scores_ : (n_alphas, n_targets) array, validation score of every alpha and target
    coef_ : (n_targets, n_features) array, or (n_features,) for 1-D ``Y`` (not after ``fit_gram``)
    intercept_ : (n_targets,) array, or float for 1-D ``Y`` (not after ``fit_gram``)
    dual_coef_ : (n_samples, n_targets) array, only after ``fit_gram``
    solver_ : 'primal' (eigendecomposition of X^T X, p < n), 'dual' (of X X^T) or 'gram'
    """

    def __init__(
        self,
        alphas: Sequence[float] = (0.1, 1.0, 10.0),
        fit_intercept: bool = True,
        cv: CVLike = None,
        alpha_per_target: bool = False,
        scoring: Optional[str] = None,
    ) -> None:
        self.alphas = alphas
        self.fit_intercept = fit_intercept
        self.cv = cv
        self.alpha_per_target = alpha_per_target
        self.scoring = scoring

    # ---------------------------------------------------------------- validation

    def _check_params(self) -> Tuple[np.ndarray, str]:
        alphas = np.atleast_1d(np.asarray(self.alphas, dtype=np.float64))
        if alphas.ndim != 1 or alphas.size == 0:
            raise ValueError(f"alphas must be a non-empty 1-D sequence, got shape {shape_of(alphas)}")
        if not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
            raise ValueError(f"alphas must be finite and > 0, got {alphas.tolist()}")
        kind = "loo" if self.cv is None else "kfold"
        scoring = _DEFAULT_SCORING[kind] if self.scoring is None else self.scoring
        if scoring not in SCORERS:
            raise ValueError(f"scoring must be None or one of {sorted(SCORERS)}, got {self.scoring!r}")
        return alphas, scoring

    def _check_n_samples(self, n: int, shape: Tuple[int, ...], name: str) -> None:
        if self.cv is None and n < 2:
            raise ValueError(f"leave-one-out needs at least 2 samples, got n_samples={n} (`{name}` shape {shape})")

    def _splits(self, X: object, Y: np.ndarray) -> List[Tuple[np.ndarray, np.ndarray]]:
        n = Y.shape[0]
        if isinstance(self.cv, numbers.Integral) and not isinstance(self.cv, bool):
            return kfold_indices(n, int(self.cv))
        raw = self.cv.split(X, Y) if hasattr(self.cv, "split") else self.cv
        try:
            splits = [(np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64)) for tr, te in raw]
        except TypeError as exc:
            raise TypeError(
                f"cv must be None, an int, a splitter with split(X, Y) or an iterable of (train, test) "
                f"index arrays, got {type(self.cv).__name__}"
            ) from exc
        if not splits:
            raise ValueError("cv produced no splits")
        for tr, te in splits:
            if tr.size < 1 or te.size < 1:
                raise ValueError(f"every split needs train and test samples, got sizes {tr.size} and {te.size}")
        return splits

    @staticmethod
    def _centred_targets(Y2: np.ndarray, intercept: bool) -> Tuple[np.ndarray, np.ndarray]:
        y_mean = Y2.mean(axis=0) if intercept else np.zeros(Y2.shape[1])
        Yc = Y2 - y_mean
        if not np.isfinite(np.einsum("ij,ij->j", Yc, Yc)).all():
            raise ValueError(
                f"`Y` (shape {shape_of(Y2)}, largest |value| {float(np.max(np.abs(Y2))):.3g}) is finite but its "
                "sums of squares overflow float64; rescale Y"
            )
        return y_mean, Yc

    # ---------------------------------------------------------------- fitting

    def fit(self, X: object, Y: object) -> "RidgeCV":
        """Fit on ``X`` (n_samples, n_features) and ``Y`` (n_samples,) or (n_samples, n_targets)."""
        alphas, scoring = self._check_params()
        X = check_features(X, "X")
        Y2, one_d = check_targets(Y, X.shape[0], X.shape, "Y")
        n, p = X.shape
        self._check_n_samples(n, X.shape, "X")
        intercept = bool(self.fit_intercept)
        y_mean, Yc = self._centred_targets(Y2, intercept)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by _check_no_overflow
            x_mean = X.mean(axis=0, dtype=np.float64) if intercept else None
        splits = None if self.cv is None else self._splits(X, Y2)
        if p < n:
            self.solver_ = "primal"
            with np.errstate(over="ignore", invalid="ignore"):
                Xc = X - x_mean if x_mean is not None else X.astype(np.float64)
                G = Xc.T @ Xc
            _check_no_overflow(G, X, "X^T X")
            if splits is None:
                scores, refit = self._primal_loo(Xc, G, Yc, alphas, scoring, intercept)
            else:
                scores, refit = self._primal_kfold(Xc, G, Y2, Yc, alphas, scoring, intercept, splits)
            coef_t = refit(self._select(scores, alphas))
        else:
            self.solver_ = "dual"
            with np.errstate(over="ignore", invalid="ignore"):
                K = _sample_gram(X, x_mean)
            _check_no_overflow(K, X, "X X^T")
            scores, refit = self._dual_scores(K, Y2, Yc, alphas, scoring, intercept, splits)
            coef_t = _features_times(X, x_mean, refit(self._select(scores, alphas)))

        intercept_ = y_mean - (x_mean @ coef_t if x_mean is not None else 0.0)
        self.cv_scores_ = scores
        self.n_features_in_ = p
        self._one_d = one_d
        self._coef64 = np.ascontiguousarray(coef_t.T)
        self._intercept64 = np.asarray(intercept_, dtype=np.float64).reshape(-1)
        self.coef_ = self._coef64.astype(X.dtype)
        self.intercept_ = self._intercept64.astype(X.dtype)
        if one_d:
            self.coef_ = self.coef_[0]
            self.intercept_ = float(self.intercept_[0])
        for stale in ("dual_coef_", "_gram_col_mean", "_gram_grand_mean", "_y_mean"):
            self.__dict__.pop(stale, None)
        return self

    def fit_gram(self, K: object, Y: object) -> "RidgeCV":
        r"""Fit from the train Gram matrix :math:`K_{ij} = \langle x_i, x_j \rangle` (n x n).

        Same alphas, scores and predictions as :meth:`fit` on features ``X`` with
        ``K = X @ X.T``, whatever ``p``: the dual route (see the module docstring) needs ``X``
        only through ``K``. With ``fit_intercept`` the Gram is centred here,
        :math:`K_c = J K J`, so a Gram of raw or of centred features gives the same model
        (centre the features first when their mean is large against their spread: the
        centring of ``K`` cancels in float64). The dual coefficients are
        :math:`C = (K_c + \alpha I)^{-1} Y_c` (one alpha per target or for all), and
        :meth:`predict_gram` returns :math:`K^{\times}_c C + \bar y`.

        Parameters
        ----------
        K : (n_samples, n_samples) symmetric PSD array (a linear kernel of the features)
        Y : (n_samples,) or (n_samples, n_targets)
        """
        alphas, scoring = self._check_params()
        K = check_gram(K, "K")
        Y2, one_d = check_targets(Y, K.shape[0], K.shape, "Y")
        n = K.shape[0]
        self._check_n_samples(n, K.shape, "K")
        intercept = bool(self.fit_intercept)
        y_mean, Yc = self._centred_targets(Y2, intercept)
        if intercept:
            Kc, self._gram_col_mean, self._gram_grand_mean = centre_gram(K)
        else:
            Kc, self._gram_col_mean, self._gram_grand_mean = K, None, None
        splits = None if self.cv is None else self._splits(Kc, Y2)
        self.solver_ = "gram"
        scores, refit = self._dual_scores(Kc, Y2, Yc, alphas, scoring, intercept, splits)
        C = refit(self._select(scores, alphas))
        self.cv_scores_ = scores
        self.n_train_samples_ = n
        self.dual_coef_ = C[:, 0] if one_d else C
        self._y_mean = y_mean
        self._one_d = one_d
        for stale in ("coef_", "intercept_", "_coef64", "_intercept64", "n_features_in_"):
            self.__dict__.pop(stale, None)
        return self

    def _select(self, scores: np.ndarray, alphas: np.ndarray) -> np.ndarray:
        """First best alpha (scikit-learn keeps the earliest on ties); NaN scores never win."""
        ranked = np.where(np.isnan(scores), -np.inf, scores)
        n_targets = scores.shape[1]
        if self.alpha_per_target and n_targets > 1:
            best = np.argmax(ranked, axis=0)
            self.alpha_ = alphas[best]
            self.best_score_ = scores[best, np.arange(n_targets)]
            return self.alpha_
        mean_scores = np.mean(scores, axis=1)
        best = int(np.argmax(np.where(np.isnan(mean_scores), -np.inf, mean_scores)))
        self.alpha_ = float(alphas[best])
        self.best_score_ = float(mean_scores[best])
        return np.full(n_targets, alphas[best])

    @staticmethod
    def _primal_loo(Xc, G, Yc, alphas, scoring, intercept) -> Tuple[np.ndarray, Refit]:
        n = Xc.shape[0]
        lam, V = _eigh(G)
        F = Xc @ V
        W = 1.0 / (lam[None, :] + alphas[:, None])
        B = F.T @ Yc
        # leverage of every sample under every alpha: (n_alphas, n); p < n keeps it small
        D = 1.0 - W @ (F * F).T - (1.0 / n if intercept else 0.0)
        scores = SCORERS[scoring](_path_stats(alpha_path_moments(F, W, B, Yc, D), Yc))
        return scores, lambda chosen: V @ (B / (lam[:, None] + chosen[None, :]))

    @staticmethod
    def _primal_kfold(Xc, G, Y, Yc, alphas, scoring, intercept, splits) -> Tuple[np.ndarray, Refit]:
        total = np.zeros((len(alphas), Y.shape[1]))
        for train, test in splits:
            y_off = Y[train].mean(axis=0) if intercept else np.zeros(Y.shape[1])
            X_te = Xc[test]
            G_tr = G - X_te.T @ X_te  # the Gram of a fold is a downdate of the full one
            if intercept:
                shift = Xc[train].mean(axis=0)
                G_tr -= len(train) * np.outer(shift, shift)
                X_te = X_te - shift
            lam, V = _eigh(G_tr)
            B = V.T @ (Xc[train].T @ (Y[train] - y_off))
            W = 1.0 / (lam[None, :] + alphas[:, None])
            Y_te = Y[test] - y_off
            total += SCORERS[scoring](_path_stats(alpha_path_moments(X_te @ V, W, B, Y_te), Y_te))
        return total / len(splits), lambda chosen: _solve_shifted(G, Xc.T @ Yc, chosen)

    @staticmethod
    def _dual_scores(Kc, Y, Yc, alphas, scoring, intercept, splits) -> Tuple[np.ndarray, Refit]:
        """Scores of every alpha and the refit of dual coefficients from a (centred) Gram."""
        if splits is None:
            lam, F = _dual_basis(Kc, intercept)
            B = F.T @ Yc
            complement = alphas[:, None] / (lam[None, :] + alphas[:, None])  # 1 - w_alpha
            D = complement @ (F * F).T
            moments = alpha_path_moments(F, complement, B, Yc, D, residual=True)
            scores = SCORERS[scoring](_path_stats(moments, Yc))
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
            lam, Q = _dual_basis(K_tr, intercept)
            B = Q.T @ (Y[train] - y_off)
            W = 1.0 / (lam[None, :] + alphas[:, None])
            Y_te = Y[test] - y_off
            total += SCORERS[scoring](_path_stats(alpha_path_moments(K_te @ Q, W, B, Y_te), Y_te))
        return total / len(splits), lambda chosen: _solve_shifted(Kc, Yc, chosen)

    # ---------------------------------------------------------------- inference

    def _predict64(self, X: object) -> Tuple[np.ndarray, np.dtype]:
        check_is_fitted(self)
        if not hasattr(self, "_coef64"):
            raise ValueError("this RidgeCV was fitted from a Gram matrix (fit_gram): predict with predict_gram")
        Xv = check_features(X, "X", self.n_features_in_, type(self).__name__)
        return Xv.astype(np.float64, copy=False) @ self._coef64.T + self._intercept64, Xv.dtype

    def predict(self, X: object) -> np.ndarray:
        """Predictions ``X @ coef_.T + intercept_``, (n_samples, n_targets) or (n_samples,)."""
        pred, dtype = self._predict64(X)
        pred = pred.astype(dtype, copy=False)
        return pred[:, 0] if self._one_d else pred

    def predict_gram(self, K_cross: object) -> np.ndarray:
        r"""Predictions from the cross-Gram :math:`K^{\times}_{ij} = \langle x^{test}_i, x_j \rangle`
        (n_test x n_train, same features and inner product as the Gram given to :meth:`fit_gram`).

        With an intercept it is centred as the train Gram was,
        :math:`K^{\times}_c = K^{\times} - \bar k^{\times} 1^\top - 1 \bar k^\top + \bar{\bar k}`
        (row means of the cross-Gram, column means and grand mean of the train Gram), which
        equals the inner products of test and train features both centred by the train mean;
        then :math:`\hat Y = K^{\times}_c C + \bar y` (float64).
        """
        check_is_fitted(self)
        if not hasattr(self, "dual_coef_"):
            raise ValueError("this RidgeCV was fitted on features (fit): predict with predict")
        Kx = check_features(K_cross, "K_cross", self.n_train_samples_, type(self).__name__).astype(np.float64)
        if self._gram_col_mean is not None:
            Kx = centre_cross_gram(Kx, self._gram_col_mean, self._gram_grand_mean)
        C = self.dual_coef_.reshape(self.n_train_samples_, -1)
        pred = Kx @ C + self._y_mean
        return pred[:, 0] if self._one_d else pred

    def score_pearson(self, X: object, Y: object) -> float:
        """Mean over targets of the Pearson correlation between predictions and ``Y``."""
        pred, _ = self._predict64(X)
        Y2, _ = check_targets(Y, pred.shape[0], np.shape(X), "Y")
        if Y2.shape[1] != pred.shape[1]:
            raise ValueError(f"`Y` has {Y2.shape[1]} targets but the model predicts {pred.shape[1]}")
        return float(np.mean(pearson_per_target(Y2, pred)))
