r"""PLS regression readout (NIPALS, as scikit-learn's ``PLSRegression``), made fast.

Component :math:`k` of PLS regression finds the first singular pair of the cross-covariance
:math:`S_k = X_k^\top Y_k` (:math:`p \times t`) by NIPALS power iterations, then deflates
:math:`X_{k+1} = X_k - \xi \gamma^\top`, :math:`Y_{k+1} = Y_k - \xi \delta^\top` with the scores
:math:`\xi = X_k u` and loadings :math:`\gamma = X_k^\top \xi / \xi^\top\xi`,
:math:`\delta = Y_k^\top \xi / \xi^\top\xi`.

scikit-learn runs every inner iteration on the full data (two :math:`n \times p` products per
iteration) and rewrites :math:`X_k` at each deflation. Here the same iterates are computed
with small matrices only:

* The NIPALS update :math:`u \propto X^\top Y v`, :math:`v \propto Y^\top X u` is a power
  iteration on :math:`S S^\top`; scale factors do not change :math:`u` after normalisation, so
  it runs on :math:`v` in target space with :math:`M = S^\top S` (:math:`t \times t`):
  :math:`v_{i+1} \propto M v_i`, :math:`u_i = S v_i / \lVert S v_i \rVert`. The convergence test
  :math:`\lVert u_i - u_{i-1} \rVert^2 < \text{tol}` is evaluated exactly from :math:`M`:
  :math:`\lVert u_i \rVert^2 + \lVert u_{i-1} \rVert^2 - 2\, v_i^\top M v_{i-1} / (\lVert S v_i\rVert \lVert S v_{i-1}\rVert)`.
  Same start (the first non-constant column of :math:`Y_k`), same stopping iteration.
* Deflating :math:`X` and :math:`Y` by the same score :math:`\xi` gives
  :math:`S_{k+1} = S_k - (\xi^\top\xi)\, \gamma \delta^\top` (a rank-one update), and
  :math:`X_k` is never formed: :math:`X_k u = X u - \Xi_{<k} (\Gamma_{<k}^\top u)`,
  :math:`X_k^\top \xi = X^\top \xi - \Gamma_{<k} (\Xi_{<k}^\top \xi)`.

So a component costs two passes over :math:`X` plus :math:`O(p t^2)`, whatever the number of
inner iterations; the inner iterations run in C++ (``csrc/pls.cpp``) on the :math:`t \times t`
matrix. Sign convention (largest :math:`|u|` entry positive), ``x_rotations_``,
``coef_`` (n_targets, n_features) and ``intercept_`` follow scikit-learn >= 1.3.

Kernel form (:meth:`PLSRegression.fit_gram`, ``scale=False``): the same iterates need the
features only through the centred Gram :math:`K_c = X_c X_c^\top`. Since
:math:`X_k = \Pi_k X_c` (:math:`\Pi_k` projects out the earlier scores) and
:math:`\Pi_k Y_k = Y_k`, :math:`S_k = X_c^\top Y_k`, so

* :math:`M_k = S_k^\top S_k = Y_k^\top Z_k` with :math:`Z_k = K_c Y_k`, kept up to date as
  :math:`Z_{k+1} = Z_k - (K_c \xi)\,\delta^\top`;
* the weights are :math:`u = X_c^\top a` with :math:`a = Y_k v / (\lVert S v\rVert + \epsilon)`,
  :math:`\lVert S v \rVert^2 = v^\top M v`; the score is
  :math:`\xi = X_k u = \Pi_k K_c a = K_c a - \sum_{j<k} \xi_j\, \xi_j^\top K_c a / \xi_j^\top \xi_j`;
* with :math:`A = [a_k]`, :math:`\Xi = [\xi_k]`, :math:`D = \mathrm{diag}(\xi_k^\top\xi_k)`:
  :math:`W = X_c^\top A`, the X loadings are :math:`P = X_c^\top \Xi D^{-1}`, so
  :math:`P^\top W = D^{-1} \Xi^\top K_c A` and the predictions
  :math:`\hat Y = X^{\times}_c W (P^\top W)^{+} L^\top + \bar y = K^{\times}_c\, A\,(D^{-1}\Xi^\top K_c A)^{+} L^\top + \bar y`.

Same start vector, same power iteration, same stopping iteration, so the same predictions
as the feature-space fit to rounding. :meth:`PLSRegression.fit` itself takes this route when
``p >= 4 n`` (then forms :math:`W = X_c^\top A` and :math:`P = X_c^\top \Xi D^{-1}` and sets the
signs at the end), so a wide layer costs one Gram instead of 50 passes over :math:`X`. Only the component signs are not fixed (the
largest-|u| rule needs :math:`u` in feature space); flipping a component leaves the
predictions unchanged.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Optional, Tuple, Union

import numpy as np
import scipy.linalg
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    MultiOutputMixin,
    RegressorMixin,
    TransformerMixin,
)
from sklearn.utils.validation import check_is_fitted

from harmonizer_fast._ext import extension
from harmonizer_fast.spec import shape_of
from harmonizer_fast.neural._backend import (
    centre_cross_gram,
    centre_gram,
    check_features,
    check_gram,
    check_targets,
    single_blas_thread,
)

__all__ = ["PLSRegression", "power_iteration_numpy"]

_EPS = np.finfo(np.float64).eps
#: fit() runs kernel NIPALS on X X^T when p >= this ratio times n: the Gram (one dsyrk,
#: n^2 p / 2 multiply-adds on every thread) then replaces two memory-bound passes over X and a
#: p t^2 product per component (500 x 50,000 -> 100: 25 x 400 MB of reads).
_KERNEL_ROUTE_RATIO = 4


def power_iteration_numpy(M: np.ndarray, start: int, tol: float, max_iter: int, eps: float) -> Tuple[np.ndarray, int]:
    r"""NIPALS X weights of one component, iterated in target space (see the module docstring).

    Power iteration :math:`v_{i+1} = M v_i / \lVert M v_i \rVert` from :math:`e_{start}`, stopped
    when :math:`\lVert u_i - u_{i-1} \rVert^2 < \text{tol}` with
    :math:`u_i = S v_i / (\lVert S v_i \rVert + \epsilon)`, evaluated from :math:`M = S^\top S`.
    Reference of the C++ ``pls_power_iteration``; returns ``(v, n_iter)``, ``n_iter = max_iter``
    when ``tol`` was not reached (the last iterate is kept, as scikit-learn does)."""
    q = M.shape[0]
    v = np.zeros(q)
    v[start] = 1.0
    Mv = M[:, start].copy()
    norm_sq = v @ Mv  # ||S v||^2
    prev_v = prev_Mv = None
    prev_scale = 0.0
    for i in range(max_iter):
        scale = 1.0 / (np.sqrt(max(norm_sq, 0.0)) + eps)  # u_i = scale * S v_i
        if prev_v is not None:
            u_sq = scale * scale * norm_sq
            prev_u_sq = prev_scale * prev_scale * (prev_v @ prev_Mv)
            cross = scale * prev_scale * (v @ prev_Mv)
            if u_sq + prev_u_sq - 2.0 * cross < tol:
                return v, i + 1
        if i == max_iter - 1:
            break
        # the next v is proportional to S^T u_i = scale * M v_i; normalised so the recursion
        # neither overflows nor underflows (directions are all that matter)
        prev_v, prev_Mv, prev_scale = v, Mv, scale
        v = Mv / np.linalg.norm(Mv)
        Mv = M @ v
        norm_sq = v @ Mv
    return v, max_iter


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

    # ---------------------------------------------------------------- shared pieces

    def _start_column(self, Yk: np.ndarray, cross: np.ndarray, k: int) -> Optional[int]:
        """Zero the (numerically) constant columns of the deflated Y and of its cross-product
        ``cross`` (S or Z); the first non-constant column starts NIPALS (None: all constant)."""
        # largest |entry| per column from two reductions, without an (n, t) temporary
        largest = np.maximum(Yk.max(axis=0), -Yk.min(axis=0))
        constant_cols = largest < 10 * _EPS
        if constant_cols.any():
            Yk[:, constant_cols] = 0.0
            cross[:, constant_cols] = 0.0
            largest[constant_cols] = 0.0
        nonconstant = np.flatnonzero(largest > _EPS)
        if nonconstant.size == 0:
            warnings.warn(f"y residual is constant at iteration {k}", RuntimeWarning, stacklevel=4)
            return None
        return int(nonconstant[0])

    def _target_direction(self, M: np.ndarray, start: int) -> Tuple[np.ndarray, float]:
        r"""Power iteration of one component on ``M = S^T S``: the target-space direction ``v``
        and :math:`1 / (\lVert S v \rVert + \epsilon)` (records ``n_iter_``, warns at max_iter)."""
        if M.shape[0] == 1:
            v, n_iter = np.ones(1), 1
        else:
            ext = extension()
            M = np.ascontiguousarray(M)
            run = power_iteration_numpy if ext is None else ext.pls_power_iteration
            v, n_iter = run(M, start, float(self.tol), int(self.max_iter), _EPS)
            if n_iter == self.max_iter:
                warnings.warn(
                    f"PLS NIPALS reached max_iter={self.max_iter} without converging (tol={self.tol}); "
                    "increase max_iter or tol",
                    RuntimeWarning,
                    stacklevel=4,
                )
        self.n_iter_.append(int(n_iter))
        return v, 1.0 / (np.sqrt(max(float(v @ M @ v), 0.0)) + _EPS)

    @staticmethod
    def _check_score(ss: float, k: int, name: str, shape: Tuple[int, ...]) -> None:
        if not (ss > 0.0 and np.isfinite(ss)):
            raise ValueError(
                f"PLS component {k + 1}: the deflated `{name}` (shape {shape}) has no variance along "
                f"X^T Y (X of rank {k} after centring, or uncorrelated with Y); use n_components <= {k}"
            )

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

        W = np.zeros((p, n_comp))  # x weights
        C = np.zeros((q, n_comp))  # y weights
        T = np.zeros((n, n_comp))  # x scores
        P = np.zeros((p, n_comp))  # x loadings
        L = np.zeros((q, n_comp))  # y loadings
        if p >= _KERNEL_ROUTE_RATIO * n:
            self._kernel_route(X0, Yk, W, C, T, P, L, Xv.shape)
        else:
            self._feature_route(X0, Yk, W, C, T, P, L, Xv.shape)
        self.x_weights_, self.y_weights_, self.x_loadings_, self.y_loadings_ = W, C, P, L
        self._x_scores = T
        self.x_rotations_ = W @ scipy.linalg.pinv(P.T @ W, check_finite=False)
        self.y_rotations_ = C @ scipy.linalg.pinv(L.T @ C, check_finite=False)
        self.coef_ = ((self.x_rotations_ @ L.T) * self._y_std).T / self._x_std
        self.intercept_ = self._y_mean
        self.n_features_in_ = p
        self._n_features_out = W.shape[1]  # names of transform's columns (get_feature_names_out)
        self._one_d = one_d
        self.__dict__.pop("dual_coef_", None)
        return self

    def _feature_route(self, X0, Yk, W, C, T, P, L, shape) -> None:
        """NIPALS in feature space (module docstring), filling W, C, T, P, L in place."""
        S = X0.T @ Yk  # cross-covariance of the deflated matrices, kept up to date
        self.n_iter_ = []
        with single_blas_thread():  # only matrix-vector and t x t work from here
            for k in range(W.shape[1]):
                start = self._start_column(Yk, S, k)
                if start is None:
                    break
                v, scale = self._target_direction(S.T @ S, start)
                u = scale * (S @ v)
                u *= np.sign(u[np.argmax(np.abs(u))])  # sign: largest |u| entry positive
                xi = X0 @ u - T[:, :k] @ (P[:, :k].T @ u)
                ss = float(xi @ xi)
                self._check_score(ss, k, "X", shape)
                delta = (Yk.T @ xi) / ss  # y weights = y loadings under regression deflation
                gamma = (X0.T @ xi - P[:, :k] @ (T[:, :k].T @ xi)) / ss
                Yk -= np.outer(xi, delta)
                S -= ss * np.outer(gamma, delta)
                W[:, k], C[:, k], T[:, k], P[:, k], L[:, k] = u, delta, xi, gamma, delta

    def _kernel_route(self, X0, Yk, W, C, T, P, L, shape) -> None:
        """The same components from the n x n Gram when p >> n: one dsyrk of X, then only
        n-sized work per component, and W = X^T A, P = X^T T / diag(T^T T) at the end; the
        signs are set afterwards (flipping a component changes no later one)."""
        A, T[:], L[:] = self._kernel_components(X0 @ X0.T, Yk, W.shape[1], "X", shape)
        ss = np.einsum("ij,ij->j", T, T)
        W[:] = X0.T @ A
        P[:] = (X0.T @ T) / np.where(ss > 0, ss, 1.0)
        signs = np.sign(W[np.argmax(np.abs(W), axis=0), np.arange(W.shape[1])])
        signs[signs == 0] = 1.0
        for M in (W, T, P, L):
            M *= signs
        C[:] = L

    # ---------------------------------------------------------------- kernel form

    def _kernel_components(
        self, Kc: np.ndarray, Yk: np.ndarray, n_comp: int, name: str, shape: Tuple[int, ...]
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kernel NIPALS (module docstring) on a centred Gram; deflates ``Yk`` in place.

        Returns ``(A, T, L)``, (n, n_comp), (n, n_comp), (t, n_comp), zero past the components
        extracted (``len(self.n_iter_)``): the weights are ``X_c^T A``."""
        n = Kc.shape[0]
        A = np.zeros((n, n_comp))
        T = np.zeros((n, n_comp))
        L = np.zeros((Yk.shape[1], n_comp))
        Z = Kc @ Yk  # = X_c S_k, kept up to date
        self.n_iter_ = []
        with single_blas_thread():
            for k in range(n_comp):
                start = self._start_column(Yk, Z, k)
                if start is None:
                    break
                M = Yk.T @ Z
                v, scale = self._target_direction((M + M.T) / 2.0, start)
                a = scale * (Yk @ v)
                Ka = Kc @ a
                xi = Ka - T[:, :k] @ ((T[:, :k].T @ Ka) / np.einsum("ij,ij->j", T[:, :k], T[:, :k]))
                ss = float(xi @ xi)
                self._check_score(ss, k, name, shape)
                delta = (Yk.T @ xi) / ss
                Yk -= np.outer(xi, delta)
                Z -= np.outer(Kc @ xi, delta)
                A[:, k], T[:, k], L[:, k] = a, xi, delta
        return A, T, L

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
        A, T, L = self._kernel_components(Kc, Yk, n_comp, "K", K.shape)
        n_done = len(self.n_iter_)
        A, T, L = A[:, :n_done], T[:, :n_done], L[:, :n_done]
        ss_all = np.einsum("ij,ij->j", T, T)
        PtW = (T.T @ (Kc @ A)) / ss_all[:, None]
        self.dual_coef_ = A @ scipy.linalg.pinv(PtW, check_finite=False) @ L.T
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
