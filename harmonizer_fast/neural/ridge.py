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

Where things live: this module holds the estimator (parameters, validation order, result
attributes); :mod:`~harmonizer_fast.neural.ridge_solvers` the decompositions and the three
routes; :mod:`~harmonizer_fast.neural.ridge_path` the alpha path and the validation scores;
:mod:`~harmonizer_fast.neural._backend` input validation, the C++ reductions and the BLAS
thread policy.

Leave-one-out against scikit-learn when :math:`p \ge n`: scikit-learn's gram mode corrects
the leave-one-out denominator for the intercept by subtracting :math:`(G^{-1} 1)_i / n` from
:math:`[G^{-1}]_{ii}`, two terms of size :math:`\approx 1/(\alpha n)` whose difference is the
:math:`\sum_k Q_{ik}^2/(\lambda_k + \alpha)` that matters (over the other eigenvectors). The
rounding of both terms (of the subtraction, and of the computed eigenvector of the constant
direction, whose eigenvalue is a round-off ~1e-9 instead of 0) is amplified by their size over
their difference, so its LOO errors are off by a relative amount that grows as
:math:`1/\alpha` (4e-9 at 500 x 50,000, alpha 1e-3). The dual route here removes that direction
exactly and equals a refit-per-sample leave-one-out to ~1e-15, so where scikit-learn's error
exceeds the gap between two alphas the chosen alphas can differ (a tie within scikit-learn's
accuracy; see ``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import numbers
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from harmonizer_fast.spec import shape_of
from harmonizer_fast.neural._backend import (
    centre_columns,
    centre_cross_gram,
    centre_gram,
    check_features,
    check_finite,
    check_gram,
    check_targets,
    pearson_per_target,
    threads_for_product,
)
from harmonizer_fast.neural.ridge_path import DEFAULT_SCORING, SCORERS, alpha_path_moments
from harmonizer_fast.neural.ridge_solvers import (
    check_no_overflow,
    dual_scores,
    eigh_orthogonal_to_ones,
    features_times,
    kfold_indices,
    primal_kfold,
    primal_loo,
    sample_gram,
)

__all__ = [
    "RidgeCV",
    "alpha_path_moments",
    "eigh_orthogonal_to_ones",
    "kfold_indices",
    "pearson_per_target",
    "SCORERS",
]


# --------------------------------------------------------------------------- estimator


CVLike = Union[None, int, Iterable[Tuple[np.ndarray, np.ndarray]], object]


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
        if not (alphas.min() > 0 and alphas.max() < np.inf):  # False for a NaN too
            raise ValueError(f"alphas must be finite and > 0, got {alphas.tolist()}")
        kind = "loo" if self.cv is None else "kfold"
        scoring = DEFAULT_SCORING[kind] if self.scoring is None else self.scoring
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
        if intercept:
            Yc, y_mean, sums_of_squares = centre_columns(Y2)
        else:
            Yc, y_mean = Y2, np.zeros(Y2.shape[1])
            sums_of_squares = np.einsum("ij,ij->j", Yc, Yc)
        if not np.isfinite(sums_of_squares).all():
            raise ValueError(
                f"`Y` (shape {shape_of(Y2)}, largest |value| {float(np.max(np.abs(Y2))):.3g}) is finite but its "
                "sums of squares overflow float64; rescale Y"
            )
        return y_mean, Yc

    @staticmethod
    def _centred_features(X: np.ndarray, intercept: bool) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """(X_c in float64 for the primal route (p < n), else None; the column means, or None
        without an intercept), after checking that ``X`` is finite. With an intercept on the
        primal route the finiteness comes from the column means of the centring pass (a NaN or
        inf makes its column's mean non-finite): one pass over ``X`` instead of two."""
        n, p = X.shape
        if intercept and p < n:
            Xc, x_mean, _ = centre_columns(X)
            if not np.isfinite(x_mean).all():
                check_finite(X, "X")  # names the NaN/inf; finite data whose sums overflow go on
            return Xc, x_mean  # to check_no_overflow, which names the overflow
        check_finite(X, "X")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by check_no_overflow
            x_mean = X.mean(axis=0, dtype=np.float64) if intercept else None
        return (X.astype(np.float64) if p < n else None), x_mean

    # ---------------------------------------------------------------- fitting

    def fit(self, X: object, Y: object) -> "RidgeCV":
        """Fit on ``X`` (n_samples, n_features) and ``Y`` (n_samples,) or (n_samples, n_targets)."""
        alphas, scoring = self._check_params()
        X = check_features(X, "X", finite=False)  # checked by _centred_features
        intercept = bool(self.fit_intercept)
        Xc, x_mean = self._centred_features(X, intercept)
        Y2, one_d = check_targets(Y, X.shape[0], X.shape, "Y")
        n, p = X.shape
        self._check_n_samples(n, X.shape, "X")
        y_mean, Yc = self._centred_targets(Y2, intercept)
        splits = None if self.cv is None else self._splits(X, Y2)
        k = min(n, p)
        # a small fit runs on one BLAS thread from end to end (see threads_for_product): its Gram,
        # decomposition and products are each too small to gain from threads
        with threads_for_product(n * k * (p + Y2.shape[1])):  # the Gram, then one path product
            if p < n:
                self.solver_ = "primal"
                with np.errstate(over="ignore", invalid="ignore"):
                    G = Xc.T @ Xc
                check_no_overflow(G, X, "X^T X")
                if splits is None:
                    scores, refit = primal_loo(Xc, G, Yc, alphas, scoring, intercept)
                else:
                    scores, refit = primal_kfold(Xc, G, Y2, Yc, alphas, scoring, intercept, splits)
                coef_t = refit(self._select(scores, alphas))
            else:
                self.solver_ = "dual"
                with np.errstate(over="ignore", invalid="ignore"):
                    K = sample_gram(X, x_mean)
                check_no_overflow(K, X, "X X^T")
                scores, refit = dual_scores(K, Y2, Yc, alphas, scoring, intercept, splits)
                coef_t = features_times(X, x_mean, refit(self._select(scores, alphas)))

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
        with threads_for_product(n * n * (n + Y2.shape[1])):  # as in fit
            scores, refit = dual_scores(Kc, Y2, Yc, alphas, scoring, intercept, splits)
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
