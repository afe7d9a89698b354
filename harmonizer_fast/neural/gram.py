r"""Exact linear algebra on a layer's features through their Gram matrix.

A readout that sees the features only through inner products (ridge with intercept, PLS
without scaling) predicts the same from any coordinates with the same Gram matrix, so a wide
layer (d features >> n images) is scored at ``n x n`` values: :func:`exact_embedding` (the rows
of X in an n-dimensional basis), :func:`gram_embedding` and :func:`gram_ridge_predict` (train
and test coordinates of a Gram matrix of all images, and the dual ridge on them), and
:class:`GramPCA` / :func:`layer_pca` (Brain-Score's PCA layer reduction from an ``m x m``
Gram matrix instead of an SVD). :mod:`harmonizer_fast.neural.features` streams the features.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from harmonizer_fast.neural.ridge import RidgeCV
from harmonizer_fast.neural.ridge_solvers import sample_gram

__all__ = ["GramPCA", "exact_embedding", "gram_embedding", "gram_ridge_predict", "layer_pca"]


def gram_embedding(gram: np.ndarray, train: np.ndarray, test: np.ndarray, rtol: float = 1e-10):
    r"""Train and test coordinates whose inner products reproduce ``gram`` (Nystroem, exact).

    With :math:`K_{train} = Q \Lambda Q^\top` (eigenvalues above ``rtol`` times the largest),
    :math:`\Phi_{train} = Q \Lambda^{1/2}` and :math:`\Phi_{test} = K_{test,train} Q \Lambda^{-1/2}`
    give :math:`\Phi_{train}\Phi_{train}^\top = K_{train}` and
    :math:`\Phi_{test}\Phi_{train}^\top = K_{test,train}` (the test rows of a Gram of real
    features lie in the span of the train rows). Any estimator that depends on the features only
    through inner products with the train features, ridge included, is therefore unchanged.
    """
    eigval, eigvec = np.linalg.eigh(gram[np.ix_(train, train)])
    keep = eigval > rtol * max(float(eigval.max()), 0.0)
    if not keep.any():
        raise ValueError("the train Gram matrix is zero: the layer's features are all zero")
    eigval, eigvec = eigval[keep], eigvec[:, keep]
    root = np.sqrt(eigval)
    return eigvec * root, (gram[np.ix_(test, train)] @ eigvec) / root


def gram_ridge_predict(
    gram: np.ndarray,
    targets: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    alphas: Sequence[float] = (1.0,),
) -> np.ndarray:
    r"""Ridge regression with intercept from an (n, n) Gram matrix of all images (dual form).

    Equals ridge on the features themselves (centred by the train mean, unpenalised intercept),
    :math:`\hat Y_{test} = K^c_{test,train} (K^c_{train} + \alpha I)^{-1} (Y_{train} - \bar y) + \bar y`,
    computed by :class:`~harmonizer_fast.neural.ridge.RidgeCV` on :func:`gram_embedding`
    coordinates, so ``alphas`` is chosen by its exact leave-one-out error on the train images
    (one alpha for all targets).
    """
    gram = np.asarray(gram, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or targets.shape[0] != gram.shape[0]:
        raise ValueError(f"`gram` must be (n, n) and `targets` (n, t), got {gram.shape} and {targets.shape}")
    phi_train, phi_test = gram_embedding(gram, np.asarray(train), np.asarray(test))
    ridge = RidgeCV(alphas=alphas).fit(phi_train, targets[train])
    return np.asarray(ridge.predict(phi_test))


def exact_embedding(features: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    r"""Coordinates of the ``n`` rows of wide ``features`` (n x d, d > n) in an n-dimensional basis.

    With the Gram matrix :math:`G = X X^\top = Q \Lambda Q^\top` (float64, eigenvalues above
    ``rtol`` times the largest), :math:`\Phi = Q \Lambda^{1/2}` equals :math:`X V` for an
    orthonormal basis :math:`V` of the row space of :math:`X` (:math:`\Phi\Phi^\top = G`). A readout
    that is equivariant under orthogonal maps of the features, as PLS without scaling and ridge
    (with intercept) are, therefore predicts exactly the same from :math:`\Phi` as from
    :math:`X`, for any train/test split of these rows, at ``n x n`` instead of ``n x d`` values.
    Narrow features (d <= n) are returned unchanged.
    """
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"`features` must be (n, d), got shape {x.shape}")
    n, d = x.shape
    if d <= n:
        return x
    eigval, eigvec = np.linalg.eigh(sample_gram(x, None))
    keep = eigval > rtol * max(float(eigval.max()), 0.0)
    if not keep.any():
        return np.zeros((n, 1))
    return eigvec[:, keep] * np.sqrt(eigval[keep])


class GramPCA:
    r"""Principal components of ``m`` reference rows from their ``m x m`` Gram matrix.

    With the centred reference :math:`R_c = R - \bar r` and :math:`R_c R_c^\top = U \Lambda U^\top`
    (float64, eigenvalues in decreasing order), the components are
    :math:`V^\top = \Lambda^{-1/2} U^\top R_c` (orthonormal rows: the right singular vectors of
    :math:`R_c`, as ``sklearn.decomposition.PCA`` finds them by SVD) and
    ``transform(X)`` is :math:`(X - \bar r) V`. Only components with positive variance on the
    reference are kept (at most ``m - 1``), so ``k = min(n_components, rank)``. Working memory is
    the centred reference plus the ``k x d`` float32 components, where an SVD needs several copies.
    """

    def __init__(self, reference: np.ndarray, n_components: int, rtol: float = 1e-10) -> None:
        ref = np.asarray(reference, dtype=np.float32)
        self.mean_ = ref.mean(0, dtype=np.float64)
        centered = ref - self.mean_.astype(np.float32)
        eigval, eigvec = np.linalg.eigh(sample_gram(centered, None))
        eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
        positive = int(np.sum(eigval > rtol * max(float(eigval[0]), 0.0)))
        k = min(int(n_components), positive)
        if k < 1:
            raise ValueError(f"the reference features of shape {ref.shape} have no variance: no principal component")
        left = (eigvec[:, :k] / np.sqrt(eigval[:k])).T  # (k, m) float64
        d = centered.shape[1]
        self.components_ = np.empty((k, d), dtype=np.float32)
        step = max(1, 2**25 // max(centered.shape[0], 1))
        for start in range(0, d, step):
            self.components_[:, start:start + step] = left @ centered[:, start:start + step].astype(np.float64)
        self.explained_variance_ = eigval[:k] / (centered.shape[0] - 1)
        self.n_components_ = k

    def transform(self, features: np.ndarray) -> np.ndarray:
        """``(features - mean) @ components.T`` (float64), without a centred copy of ``features``."""
        x = np.asarray(features, dtype=np.float32)
        return (x @ self.components_.T).astype(np.float64) - self.mean_ @ self.components_.T.astype(np.float64)


def layer_pca(reference: np.ndarray, n_components: int = 1000) -> Optional[GramPCA]:
    """Brain-Score's layer reduction: principal components fitted on ``reference`` (m images x d
    features of one layer), at most ``n_components`` of them (:class:`GramPCA`).

    Returns None when the layer has no more than ``n_components`` features: Brain-Score keeps such
    layers as they are. Unlike Brain-Score's ``sklearn`` PCA, which with ``m <= n_components``
    fitting images also returns components of zero variance on them (directions its SVD completes
    arbitrarily), only components with positive variance are kept.
    """
    x = np.asarray(reference)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"`reference` must be (m >= 2, d) features, got shape {x.shape}")
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise ValueError(f"`n_components` must be a positive int, got {n_components!r}")
    if x.shape[1] <= n_components:
        return None
    return GramPCA(x, n_components)
