r"""PLS regression readout (NIPALS, as scikit-learn's ``PLSRegression``), made fast: the
scikit-learn estimator. The algorithm, its algebra (NIPALS in target space, deflation by
rank-one updates, the kernel form from the Gram matrix) and its solver functions are in
:mod:`~harmonizer_fast.neural.pls_nipals`.

:meth:`PLSRegression.fit` runs NIPALS in feature space, or on the Gram :math:`X_c X_c^\top`
when ``p >= 4 n``; :meth:`PLSRegression.fit_gram` / :meth:`PLSRegression.predict_gram` fit and
predict from precomputed Grams. Sign convention (largest :math:`|u|` entry positive),
``x_rotations_``, ``coef_`` (n_targets, n_features) and ``intercept_`` follow scikit-learn >= 1.3.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    MultiOutputMixin,
    RegressorMixin,
    TransformerMixin,
)
from sklearn.utils.validation import check_is_fitted

from harmonizer_fast.spec import shape_of
from harmonizer_fast.neural._backend import (
    centre_cross_gram,
    centre_gram,
    check_features,
    check_gram,
    check_targets,
    threads_for_product,
)
from harmonizer_fast.neural.pls_nipals import (
    feature_components,
    kernel_components,
    kernel_route,
    pinv,
    power_iteration_numpy,
)

__all__ = ["PLSRegression", "power_iteration_numpy"]

#: fit() runs kernel NIPALS on X X^T when p >= this ratio times n: the Gram (one dsyrk,
#: n^2 p / 2 multiply-adds on every thread) then replaces two memory-bound passes over X and a
#: p t^2 product per component (500 x 50,000 -> 100: 25 x 400 MB of reads).
_KERNEL_ROUTE_RATIO = 4


def _std_or_one(A: np.ndarray) -> np.ndarray:
    std = A.std(axis=0, ddof=1)
    std[std == 0.0] = 1.0
    return std


class PLSRegression(ClassNamePrefixFeaturesOutMixin, TransformerMixin, RegressorMixin, MultiOutputMixin, BaseEstimator):
    r"""Partial least squares regression (NIPALS, mode A, regression deflation).

    A scikit-learn estimator (``clone``, ``get_params``/``set_params``, grid search,
    ``NotFittedError``, R^2 ``score``). ``max_iter=500`` and ``tol=1e-6`` are scikit-learn's
    defaults; ``n_components=25, scale=False`` are Brain-Score's (it calls scikit-learn's
    ``PLSRegression(25, scale=False)`` with the other defaults).

    Parameters
    ----------
    n_components : int
        Number of components, at most ``min(n_samples, n_features)``.
    scale : bool
        Divide X and Y columns by their standard deviation (ddof=1) after centring.
    max_iter : int
        Maximum NIPALS iterations per component (a ``RuntimeWarning`` is issued when reached).
    tol : float
        Stop when the squared change of the X weights is below ``tol``.

    Attributes
    ----------
    x_weights_, x_loadings_, x_rotations_ : (n_features, n_components)
    y_weights_, y_loadings_, y_rotations_ : (n_targets, n_components)
    coef_ : (n_targets, n_features), ``Y_hat = (X - x_mean) @ coef_.T + intercept_``
    intercept_ : (n_targets,)
    n_iter_ : list of int, NIPALS iterations of each component
    dual_coef_ : (n_samples, n_targets), only after :meth:`fit_gram`
    """

    def __init__(self, n_components: int = 25, scale: bool = False, max_iter: int = 500, tol: float = 1e-6) -> None:
        self.n_components = n_components
        self.scale = scale
        self.max_iter = max_iter
        self.tol = tol

    def _check_params(self, n: int, p: Optional[int], name: str) -> int:
        if n < 2:
            raise ValueError(f"PLS needs at least 2 samples, got n_samples={n} (`{name}` shape {_shape(n, p)})")
        if not isinstance(self.n_components, numbers.Integral) or isinstance(self.n_components, bool) or self.n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {self.n_components!r}")
        bound, what = (min(n, p), "min(n_samples, n_features)") if p is not None else (n, "n_samples")
        if self.n_components > bound:
            raise ValueError(
                f"n_components={self.n_components} exceeds {what} = {bound} for `{name}` of shape "
                f"{_shape(n, p)}; reduce n_components"
            )
        if not isinstance(self.max_iter, numbers.Integral) or isinstance(self.max_iter, bool) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {self.max_iter!r}")
        if not (isinstance(self.tol, numbers.Real) and self.tol >= 0):
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")
        return int(self.n_components)

    # ---------------------------------------------------------------- feature space

    def fit(self, X: object, Y: object) -> "PLSRegression":
        """Fit on ``X`` (n_samples, n_features) and ``Y`` (n_samples,) or (n_samples, n_targets)."""
        Xv = check_features(X, "X")
        Y2, one_d = check_targets(Y, Xv.shape[0], Xv.shape, "Y")
        n, p = Xv.shape
        n_comp = self._check_params(n, p, "X")
        q = Y2.shape[1]
        X0 = Xv.astype(np.float64)  # working copy, centred (and scaled) in place
        self._x_mean = X0.mean(axis=0)
        X0 -= self._x_mean
        if not np.any(X0):
            raise ValueError(
                f"`X` (shape {shape_of(Xv)}) is constant: every feature has zero variance after centring "
                "(all-zero X?), so PLS has no direction to extract"
            )
        self._y_mean = Y2.mean(axis=0)
        Yk = Y2 - self._y_mean
        if self.scale:
            self._x_std = _std_or_one(X0)
            X0 /= self._x_std
            self._y_std = _std_or_one(Yk)
            Yk /= self._y_std
        else:
            self._x_std = np.ones(p)
            self._y_std = np.ones(q)

        kernel = p >= _KERNEL_ROUTE_RATIO * n
        route = kernel_route if kernel else feature_components
        # X^T Y, two passes over X per component (and the Gram on the kernel route): a small fit
        # runs on one BLAS thread from end to end (see threads_for_product)
        with threads_for_product(n * p * (q + n_comp + (n if kernel else 0))):
            W, C, T, P, L, self.n_iter_ = route(X0, Yk, n_comp, float(self.tol), int(self.max_iter), Xv.shape)
            self.x_rotations_ = W @ pinv(P.T @ W)
            self.y_rotations_ = C @ pinv(L.T @ C)
            self.coef_ = ((self.x_rotations_ @ L.T) * self._y_std).T / self._x_std
        self.x_weights_, self.y_weights_, self.x_loadings_, self.y_loadings_ = W, C, P, L
        self._x_scores = T
        self.intercept_ = self._y_mean
        self.n_features_in_ = p
        self._n_features_out = W.shape[1]  # names of transform's columns (get_feature_names_out)
        self._one_d = one_d
        self.__dict__.pop("dual_coef_", None)
        return self

    def fit_gram(self, K: object, Y: object) -> "PLSRegression":
        r"""Fit from the train Gram matrix :math:`K_{ij} = \langle x_i, x_j \rangle` (n x n).

        Kernel PLS equal to :meth:`fit` on features ``X`` with ``K = X @ X.T`` (``scale=False``
        only): same ``n_iter_``, same predictions through :meth:`predict_gram` (see the module
        docstring for the algebra). ``K`` is centred here (:math:`J K J`), so a Gram of raw or
        of centred features gives the same model. Costs :math:`O(n^2 t)` once and
        :math:`O(n^2 + n t^2)` per component, never the feature dimension.
        """
        if self.scale:
            raise ValueError("scale=True needs the features' standard deviations: fit_gram supports scale=False only")
        K = check_gram(K, "K")
        Y2, one_d = check_targets(Y, K.shape[0], K.shape, "Y")
        n = K.shape[0]
        n_comp = self._check_params(n, None, "K")
        Kc, col_mean, grand = centre_gram(K)
        if not np.any(np.abs(Kc) > 1e-14 * max(float(np.max(np.abs(K))), np.finfo(float).tiny)):
            raise ValueError(
                f"`K` (shape {shape_of(K)}) is the Gram of constant features (zero after centring): "
                "PLS has no direction to extract"
            )
        self._y_mean = Y2.mean(axis=0)
        Yk = Y2 - self._y_mean
        A, T, L, self.n_iter_ = kernel_components(Kc, Yk, n_comp, float(self.tol), int(self.max_iter), "K", K.shape)
        n_done = len(self.n_iter_)
        A, T, L = A[:, :n_done], T[:, :n_done], L[:, :n_done]
        ss_all = np.einsum("ij,ij->j", T, T)
        PtW = (T.T @ (Kc @ A)) / ss_all[:, None]
        self.dual_coef_ = A @ pinv(PtW) @ L.T
        self.intercept_ = self._y_mean
        self.n_train_samples_ = n
        self._gram_col_mean, self._gram_grand_mean = col_mean, grand
        self._one_d = one_d
        for stale in ("coef_", "x_weights_", "y_weights_", "x_loadings_", "y_loadings_", "x_rotations_",
                      "y_rotations_", "n_features_in_"):
            self.__dict__.pop(stale, None)
        return self

    def predict_gram(self, K_cross: object) -> np.ndarray:
        r"""Predictions from the cross-Gram :math:`K^{\times}_{ij} = \langle x^{test}_i, x_j \rangle`
        (n_test x n_train), centred as the train Gram was:
        :math:`\hat Y = (K^{\times} - \bar k^{\times} 1^\top - 1 \bar k^\top + \bar{\bar k})\, C + \bar y`."""
        check_is_fitted(self)
        if not hasattr(self, "dual_coef_"):
            raise ValueError("this PLSRegression was fitted on features (fit): predict with predict")
        Kx = check_features(K_cross, "K_cross", self.n_train_samples_, type(self).__name__).astype(np.float64)
        Kx = centre_cross_gram(Kx, self._gram_col_mean, self._gram_grand_mean)
        pred = Kx @ self.dual_coef_ + self.intercept_
        return pred[:, 0] if self._one_d else pred

    # ---------------------------------------------------------------- inference

    def _features(self, X: object) -> np.ndarray:
        check_is_fitted(self)
        if not hasattr(self, "coef_"):
            raise ValueError("this PLSRegression was fitted from a Gram matrix (fit_gram): predict with predict_gram")
        return check_features(X, "X", self.n_features_in_, type(self).__name__).astype(np.float64)

    def predict(self, X: object) -> np.ndarray:
        """Predictions ``(X - x_mean) @ coef_.T + intercept_`` (float64)."""
        pred = (self._features(X) - self._x_mean) @ self.coef_.T + self.intercept_
        return pred[:, 0] if self._one_d else pred

    def transform(self, X: object, Y: Optional[object] = None) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """X scores ``((X - x_mean) / x_std) @ x_rotations_``; with ``Y`` also its scores."""
        Xv = self._features(X)
        x_scores = ((Xv - self._x_mean) / self._x_std) @ self.x_rotations_
        if Y is None:
            return x_scores
        Y2, _ = check_targets(Y, Xv.shape[0], Xv.shape, "Y")
        if Y2.shape[1] != self.y_rotations_.shape[0]:
            raise ValueError(f"`Y` has {Y2.shape[1]} targets, the model was fitted with {self.y_rotations_.shape[0]}")
        return x_scores, ((Y2 - self._y_mean) / self._y_std) @ self.y_rotations_

    def fit_transform(self, X: object, y: Optional[object] = None) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """``fit(X, y).transform(X, y)``: X scores, and Y scores when ``y`` is given (as scikit-learn)."""
        return self.fit(X, y).transform(X, y)


def _shape(n: int, p: Optional[int]) -> Tuple[int, ...]:
    """Shape of the fitted input: (n, p) features or an (n, n) Gram."""
    return (n, n) if p is None else (n, p)
