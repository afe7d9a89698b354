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
inner iterations. Sign convention (largest :math:`|u|` entry positive), ``x_rotations_``,
``coef_`` (n_targets, n_features) and ``intercept_`` follow scikit-learn >= 1.3.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple, Union

import numpy as np
import scipy.linalg

from harmonizer_fast._validation import shape_of
from harmonizer_fast.neural._backend import check_features, check_targets, single_blas_thread

__all__ = ["PLSRegression"]


class PLSRegression:
    r"""Partial least squares regression (NIPALS, mode A, regression deflation).

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
    """

    def __init__(self, n_components: int = 25, scale: bool = False, max_iter: int = 500, tol: float = 1e-6) -> None:
        self.n_components = n_components
        self.scale = scale
        self.max_iter = max_iter
        self.tol = tol

    def _check_params(self, n: int, p: int) -> None:
        if not isinstance(self.n_components, (int, np.integer)) or self.n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {self.n_components!r}")
        if self.n_components > min(n, p):
            raise ValueError(
                f"n_components={self.n_components} exceeds min(n_samples, n_features) = {min(n, p)} "
                f"for X of shape ({n}, {p}); reduce n_components"
            )
        if not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {self.max_iter!r}")
        if not (self.tol >= 0):
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")

    def fit(self, X: object, Y: object) -> "PLSRegression":
        """Fit on ``X`` (n_samples, n_features) and ``Y`` (n_samples,) or (n_samples, n_targets)."""
        Xv = check_features(X, "X")
        Y2, one_d = check_targets(Y, Xv.shape[0], Xv.shape, "Y")
        n, p = Xv.shape
        if n < 2:
            raise ValueError(f"PLS needs at least 2 samples, got X shape {shape_of(Xv)}")
        self._check_params(n, p)
        q = Y2.shape[1]
        X0 = Xv.astype(np.float64)  # working copy, centred (and scaled) in place
        self._x_mean = X0.mean(axis=0)
        X0 -= self._x_mean
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

        n_comp = int(self.n_components)
        W = np.zeros((p, n_comp))  # x weights
        C = np.zeros((q, n_comp))  # y weights
        T = np.zeros((n, n_comp))  # x scores
        P = np.zeros((p, n_comp))  # x loadings
        L = np.zeros((q, n_comp))  # y loadings
        S = X0.T @ Yk  # cross-covariance of the deflated matrices, kept up to date
        with single_blas_thread():  # only matrix-vector and t x t work from here
            self._components(X0, Yk, S, W, C, T, P, L)
        self.x_weights_, self.y_weights_, self.x_loadings_, self.y_loadings_ = W, C, P, L
        self._x_scores = T
        self.x_rotations_ = W @ scipy.linalg.pinv(P.T @ W, check_finite=False)
        self.y_rotations_ = C @ scipy.linalg.pinv(L.T @ C, check_finite=False)
        self.coef_ = ((self.x_rotations_ @ L.T) * self._y_std).T / self._x_std
        self.intercept_ = self._y_mean
        self.n_features_in_ = p
        self._one_d = one_d
        return self

    def _components(self, X0, Yk, S, W, C, T, P, L) -> None:
        """Extract the components in place into W, C, T, P, L (deflating Yk and S)."""
        eps = np.finfo(np.float64).eps
        self.n_iter_ = []
        for k in range(W.shape[1]):
            constant_cols = np.all(np.abs(Yk) < 10 * eps, axis=0)
            Yk[:, constant_cols] = 0.0
            S[:, constant_cols] = 0.0
            nonconstant = np.flatnonzero(np.any(np.abs(Yk) > eps, axis=0))
            if nonconstant.size == 0:
                warnings.warn(f"y residual is constant at iteration {k}", RuntimeWarning, stacklevel=3)
                break
            u, n_iter = self._first_weights(S, int(nonconstant[0]), eps)
            self.n_iter_.append(n_iter)
            # sign: largest |u| entry positive
            u *= np.sign(u[np.argmax(np.abs(u))])
            xi = X0 @ u - T[:, :k] @ (P[:, :k].T @ u)
            ss = xi @ xi
            v = (Yk.T @ xi) / ss  # y weights (= y loadings under regression deflation)
            gamma = (X0.T @ xi - P[:, :k] @ (T[:, :k].T @ xi)) / ss
            delta = v
            Yk -= np.outer(xi, delta)
            S -= ss * np.outer(gamma, delta)
            W[:, k], C[:, k], T[:, k], P[:, k], L[:, k] = u, v, xi, gamma, delta

    def _first_weights(self, S: np.ndarray, start: int, eps: float) -> Tuple[np.ndarray, int]:
        """NIPALS X weights of one component, iterated in target space (see module docstring)."""
        q = S.shape[1]
        if q == 1:
            raw = S[:, 0].copy()
            return raw / (np.sqrt(raw @ raw) + eps), 1
        M = S.T @ S
        v = np.zeros(q)
        v[start] = 1.0
        Mv = M[:, start].copy()
        norm_sq = v @ Mv  # ||S v||^2
        prev_v = prev_Mv = None
        prev_scale = 0.0
        n_iter = self.max_iter
        for i in range(self.max_iter):
            norm = np.sqrt(max(norm_sq, 0.0))
            scale = 1.0 / (norm + eps)  # u_i = scale * S v_i, as x_weights /= ||x_weights|| + eps
            if prev_v is not None:
                u_sq = scale * scale * norm_sq
                prev_u_sq = prev_scale * prev_scale * (prev_v @ prev_Mv)
                cross = scale * prev_scale * (v @ prev_Mv)
                if u_sq + prev_u_sq - 2.0 * cross < self.tol:
                    n_iter = i + 1
                    break
            if i == self.max_iter - 1:
                break  # scikit-learn returns the last iterate's weights
            # next v is proportional to S^T u_i = scale * M v_i; rescale to unit length so the
            # recursion neither overflows nor underflows (directions are all that matter)
            prev_v, prev_Mv, prev_scale = v, Mv, scale
            v = Mv / np.linalg.norm(Mv)
            Mv = M @ v
            norm_sq = v @ Mv
        if n_iter == self.max_iter:
            warnings.warn(
                f"PLS NIPALS reached max_iter={self.max_iter} without converging (tol={self.tol}); "
                "increase max_iter or tol",
                RuntimeWarning,
                stacklevel=3,
            )
        raw = S @ v
        return raw / (np.sqrt(raw @ raw) + eps), n_iter

    # ---------------------------------------------------------------- inference

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("this PLSRegression is not fitted yet: call fit(X, Y) first")

    def predict(self, X: object) -> np.ndarray:
        """Predictions ``(X - x_mean) @ coef_.T + intercept_`` (float64)."""
        self._check_fitted()
        Xv = check_features(X, "X", self.n_features_in_).astype(np.float64)
        pred = (Xv - self._x_mean) @ self.coef_.T + self.intercept_
        return pred[:, 0] if self._one_d else pred

    def transform(self, X: object, Y: Optional[object] = None) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """X scores ``((X - x_mean) / x_std) @ x_rotations_``; with ``Y`` also its scores."""
        self._check_fitted()
        Xv = check_features(X, "X", self.n_features_in_).astype(np.float64)
        x_scores = ((Xv - self._x_mean) / self._x_std) @ self.x_rotations_
        if Y is None:
            return x_scores
        Y2, _ = check_targets(Y, Xv.shape[0], Xv.shape, "Y")
        if Y2.shape[1] != self.y_rotations_.shape[0]:
            raise ValueError(f"`Y` has {Y2.shape[1]} targets, the model was fitted with {self.y_rotations_.shape[0]}")
        return x_scores, ((Y2 - self._y_mean) / self._y_std) @ self.y_rotations_

    def score(self, X: object, Y: object) -> float:
        """Mean over targets of R^2 (scikit-learn's ``score``)."""
        pred = np.asarray(self.predict(X)).reshape(np.shape(X)[0], -1)
        Y2, _ = check_targets(Y, pred.shape[0], np.shape(X), "Y")
        sse = ((Y2 - pred) ** 2).sum(axis=0)
        sst = ((Y2 - Y2.mean(axis=0)) ** 2).sum(axis=0)
        return float(np.mean(np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), (sse == 0).astype(float))))


def _std_or_one(A: np.ndarray) -> np.ndarray:
    std = A.std(axis=0, ddof=1)
    std[std == 0.0] = 1.0
    return std
