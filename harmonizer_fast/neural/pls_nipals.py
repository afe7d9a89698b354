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

import warnings
from typing import List, Tuple

import numpy as np

from harmonizer_fast._ext import extension
from harmonizer_fast.neural._backend import single_blas_thread

__all__ = [
    "EPS",
    "feature_components",
    "kernel_components",
    "kernel_route",
    "deflate_numpy",
    "pinv",
    "power_iteration_numpy",
    "start_column_numpy",
]

EPS = np.finfo(np.float64).eps

#: the five (n_features or n_samples or n_targets, n_components) matrices of a feature-space fit
#: and the NIPALS iterations of each component: x weights W, y weights C, x scores T,
#: x loadings P, y loadings L
Components = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, List[int]]


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


def pinv(A: np.ndarray) -> np.ndarray:
    r"""Moore-Penrose pseudo-inverse by SVD with scikit-learn's cut-off (scipy's ``pinv``
    default): singular values below :math:`\max(m, n)\,\epsilon\,\sigma_{max}` are dropped.
    Called on small (n_components, n_components) matrices, where NumPy's SVD call costs a
    fraction of scipy's wrapper (input checks and a workspace query per call)."""
    u, s, vt = np.linalg.svd(A, full_matrices=False)
    keep = s > max(A.shape) * EPS * (s[0] if s.size else 0.0)
    return (vt[keep].T / s[keep]) @ u[:, keep].T


def start_column_numpy(Yk: np.ndarray, cross: np.ndarray) -> int:
    """Zero the (numerically) constant columns of the deflated Y and of its cross-product
    ``cross`` (S or Z), in place; the first non-constant column starts NIPALS (-1: all
    constant). Reference of the C++ ``pls_start_column``."""
    largest = np.abs(Yk).max(axis=0)
    constant_cols = largest < 10 * EPS
    if constant_cols.any():
        Yk[:, constant_cols] = 0.0
        cross[:, constant_cols] = 0.0
        largest[constant_cols] = 0.0
    first = int(np.argmax(largest > EPS))
    return first if largest[first] > EPS else -1


def deflate_numpy(
    Yk: np.ndarray, xi: np.ndarray, delta: np.ndarray, cross: np.ndarray, g: np.ndarray, coeff: float
) -> int:
    r""":math:`Y_k \mathrel{-}= \xi \delta^\top`, ``cross`` :math:`\mathrel{-}= c\, g \delta^\top` in place
    (the rank-one deflations of Y and of its cross-product), then the next start column as
    :func:`start_column_numpy` finds it. Reference of the C++ ``pls_deflate``."""
    Yk -= np.outer(xi, delta)
    cross -= coeff * np.outer(g, delta)
    return start_column_numpy(Yk, cross)


def _start_column(Yk: np.ndarray, cross: np.ndarray) -> int:
    ext = extension()
    return start_column_numpy(Yk, cross) if ext is None else ext.pls_start_column(Yk, cross, EPS)


def _deflate(Yk: np.ndarray, xi: np.ndarray, delta: np.ndarray, cross: np.ndarray, g: np.ndarray, coeff: float) -> int:
    ext = extension()
    if ext is None:
        return deflate_numpy(Yk, xi, delta, cross, g, coeff)
    return ext.pls_deflate(Yk, xi, delta, cross, g, coeff, EPS)


def _constant_residual(start: int, k: int) -> bool:
    """Whether component ``k`` has no start column (as scikit-learn, warn and stop there)."""
    if start >= 0:
        return False
    warnings.warn(f"y residual is constant at iteration {k}", RuntimeWarning, stacklevel=4)
    return True


def _target_direction(
    M: np.ndarray, start: int, tol: float, max_iter: int, n_iter: List[int]
) -> Tuple[np.ndarray, float]:
    r"""Power iteration of one component on ``M = S^T S``: the target-space direction ``v``
    and :math:`1 / (\lVert S v \rVert + \epsilon)` (appends to ``n_iter``, warns at max_iter)."""
    if M.shape[0] == 1:
        v, iters = np.ones(1), 1
    else:
        ext = extension()
        run = power_iteration_numpy if ext is None else ext.pls_power_iteration
        v, iters = run(np.ascontiguousarray(M), start, tol, max_iter, EPS)
        if iters == max_iter:
            warnings.warn(
                f"PLS NIPALS reached max_iter={max_iter} without converging (tol={tol}); "
                "increase max_iter or tol",
                RuntimeWarning,
                stacklevel=4,
            )
    n_iter.append(int(iters))
    return v, 1.0 / (np.sqrt(max(float(v @ M @ v), 0.0)) + EPS)


def _check_score(ss: float, k: int, name: str, shape: Tuple[int, ...]) -> None:
    if not (ss > 0.0 and np.isfinite(ss)):
        raise ValueError(
            f"PLS component {k + 1}: the deflated `{name}` (shape {shape}) has no variance along "
            f"X^T Y (X of rank {k} after centring, or uncorrelated with Y); use n_components <= {k}"
        )


def feature_components(
    X0: np.ndarray, Yk: np.ndarray, n_comp: int, tol: float, max_iter: int, shape: Tuple[int, ...]
) -> Components:
    """NIPALS in feature space (module docstring) on centred (scaled) ``X0`` and ``Yk``; deflates
    ``Yk`` in place. Components past the last extracted one stay zero."""
    n, p = X0.shape
    q = Yk.shape[1]
    W, P = np.zeros((p, n_comp)), np.zeros((p, n_comp))  # x weights, x loadings
    C, L = np.zeros((q, n_comp)), np.zeros((q, n_comp))  # y weights, y loadings
    T = np.zeros((n, n_comp))  # x scores
    n_iter: List[int] = []
    S = X0.T @ Yk  # cross-covariance of the deflated matrices, kept up to date
    with single_blas_thread():  # only matrix-vector and t x t work from here
        start = _start_column(Yk, S)
        for k in range(n_comp):
            if _constant_residual(start, k):
                break
            v, scale = _target_direction(S.T @ S, start, tol, max_iter, n_iter)
            u = scale * (S @ v)
            u *= np.sign(u[np.argmax(np.abs(u))])  # sign: largest |u| entry positive
            xi = X0 @ u - T[:, :k] @ (P[:, :k].T @ u)
            ss = float(xi @ xi)
            _check_score(ss, k, "X", shape)
            delta = (Yk.T @ xi) / ss  # y weights = y loadings under regression deflation
            gamma = (X0.T @ xi - P[:, :k] @ (T[:, :k].T @ xi)) / ss
            W[:, k], C[:, k], T[:, k], P[:, k], L[:, k] = u, delta, xi, gamma, delta
            # Y_{k+1} = Y_k - xi delta^T, S_{k+1} = S_k - (xi^T xi) gamma delta^T
            start = _deflate(Yk, xi, delta, S, gamma, ss)
    return W, C, T, P, L, n_iter


def kernel_route(
    X0: np.ndarray, Yk: np.ndarray, n_comp: int, tol: float, max_iter: int, shape: Tuple[int, ...]
) -> Components:
    """The components of :func:`feature_components` from the n x n Gram when p >> n: one dsyrk of
    X, then only n-sized work per component, and W = X^T A, P = X^T T / diag(T^T T) at the end;
    the signs are set afterwards (flipping a component changes no later one)."""
    A, T, L, n_iter = kernel_components(X0 @ X0.T, Yk, n_comp, tol, max_iter, "X", shape)
    ss = np.einsum("ij,ij->j", T, T)
    W = X0.T @ A
    P = (X0.T @ T) / np.where(ss > 0, ss, 1.0)
    signs = np.sign(W[np.argmax(np.abs(W), axis=0), np.arange(W.shape[1])])
    signs[signs == 0] = 1.0
    for M in (W, T, P, L):
        M *= signs
    return W, L.copy(), T, P, L, n_iter


def kernel_components(
    Kc: np.ndarray, Yk: np.ndarray, n_comp: int, tol: float, max_iter: int, name: str, shape: Tuple[int, ...]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[int]]:
    """Kernel NIPALS (module docstring) on a centred Gram; deflates ``Yk`` in place.

    Returns ``(A, T, L, n_iter)``, (n, n_comp), (n, n_comp), (t, n_comp), zero past the
    components extracted (``len(n_iter)``): the weights are ``X_c^T A``."""
    n = Kc.shape[0]
    A = np.zeros((n, n_comp))
    T = np.zeros((n, n_comp))
    L = np.zeros((Yk.shape[1], n_comp))
    n_iter: List[int] = []
    Z = Kc @ Yk  # = X_c S_k, kept up to date
    with single_blas_thread():
        start = _start_column(Yk, Z)
        for k in range(n_comp):
            if _constant_residual(start, k):
                break
            M = Yk.T @ Z
            v, scale = _target_direction((M + M.T) / 2.0, start, tol, max_iter, n_iter)
            a = scale * (Yk @ v)
            Ka = Kc @ a
            xi = Ka - T[:, :k] @ ((T[:, :k].T @ Ka) / np.einsum("ij,ij->j", T[:, :k], T[:, :k]))
            ss = float(xi @ xi)
            _check_score(ss, k, name, shape)
            delta = (Yk.T @ xi) / ss
            A[:, k], T[:, k], L[:, k] = a, xi, delta
            start = _deflate(Yk, xi, delta, Z, Kc @ xi, 1.0)  # Z_{k+1} = Z_k - (K_c xi) delta^T
    return A, T, L, n_iter
