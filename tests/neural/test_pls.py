"""PLSRegression against scikit-learn's NIPALS (same iterates, signs and attributes)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.cross_decomposition import PLSRegression as SkPLS
from sklearn.exceptions import NotFittedError

from harmonizer_fast.neural.pls import PLSRegression

CASES = [  # n, p, targets, components, scale, tol
    (80, 30, 6, 5, False, 1e-6),
    (80, 30, 6, 5, True, 1e-6),
    (60, 100, 12, 10, False, 1e-4),
    (50, 20, 1, 8, False, 1e-6),
    (120, 40, 25, 25, False, 1e-6),
    (30, 200, 6, 8, False, 1e-6),  # p >= 4 n: fit runs kernel NIPALS on X X^T
    (25, 150, 4, 5, True, 1e-6),
]


def make_data(n, p, q, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * rng.uniform(0.5, 2.0, p) + 3.0
    Y = X[:, :4] @ rng.standard_normal((4, q)) + rng.standard_normal((n, q)) + 10.0
    return X.astype(dtype), Y.astype(dtype)


def assert_close(actual, expected, rtol):
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("n,p,q,n_components,scale,tol", CASES)
def test_matches_sklearn(n, p, q, n_components, scale, tol):
    X, Y = make_data(n, p, q)
    ref = SkPLS(n_components, scale=scale, tol=tol).fit(X, Y)
    ours = PLSRegression(n_components, scale=scale, tol=tol).fit(X, Y)
    assert ours.n_iter_ == ref.n_iter_
    Xt, _ = make_data(n, p, q, seed=1)
    assert_close(ours.predict(Xt), ref.predict(Xt), 1e-9)
    assert_close(ours.coef_, ref.coef_, 1e-9)
    assert_close(ours.intercept_, ref.intercept_, 1e-12)
    assert_close(ours.x_weights_, ref.x_weights_, 1e-8)  # same signs
    assert_close(ours.y_weights_, ref.y_weights_, 1e-8)
    assert_close(ours.x_loadings_, ref.x_loadings_, 1e-8)
    assert_close(ours.transform(Xt), ref.transform(Xt), 1e-8)
    xs, ys = ours.transform(Xt, Y)
    rxs, rys = ref.transform(Xt, Y)
    assert_close(ys, rys, 1e-8)
    assert ours.coef_.shape == (q, p)


def test_float32_and_1d_targets():
    X, Y = make_data(70, 15, 3, seed=2, dtype=np.float32)
    ref = SkPLS(4, scale=False).fit(X, Y[:, 0])
    ours = PLSRegression(4).fit(X, Y[:, 0])
    assert ours.predict(X).shape == (70,)
    # scikit-learn centres float32 X in float32 inside predict; we predict in float64
    assert_close(ours.predict(X), ref.predict(X), 1e-5)
    assert_close(ours.coef_, ref.coef_, 1e-9)
    assert ours.score(X, Y[:, 0]) == pytest.approx(ref.score(X, Y[:, 0]), rel=1e-5)


def test_max_iter_warns_like_sklearn_and_keeps_last_iterate():
    X, Y = make_data(60, 20, 8, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SkPLS(3, scale=False, max_iter=2, tol=0.0).fit(X, Y)
    with pytest.warns(RuntimeWarning, match="max_iter=2"):
        ours = PLSRegression(3, max_iter=2, tol=0.0).fit(X, Y)
    assert ours.n_iter_ == ref.n_iter_ == [2, 2, 2]
    assert_close(ours.predict(X), ref.predict(X), 1e-9)


def test_constant_residual_stops_early_like_sklearn():
    rng = np.random.default_rng(4)
    x = rng.integers(-3, 4, (8, 2)).astype(float)
    X = np.c_[x, x.sum(axis=1), x[:, 0] - x[:, 1]]  # rank 2
    y = x[:, 0]  # explained exactly by two components
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SkPLS(4, scale=False).fit(X, y)
    with pytest.warns(RuntimeWarning, match="y residual is constant"):
        ours = PLSRegression(4).fit(X, y)
    assert ours.n_iter_ == ref.n_iter_ == [1, 1]
    assert_close(ours.predict(X), ref.predict(X), 1e-9)


def test_bad_inputs():
    X, Y = make_data(20, 5, 2)
    with pytest.raises(ValueError, match=r"n_components=6 exceeds min\(n_samples, n_features\) = 5"):
        PLSRegression(6).fit(X, Y)
    with pytest.raises(ValueError, match=r"X shape \(20, 5\) and Y shape \(19, 2\)"):
        PLSRegression(2).fit(X, Y[:19])
    Xn = X.copy()
    Xn[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        PLSRegression(2).fit(Xn, Y)
    with pytest.raises(NotFittedError, match="not fitted"):  # scikit-learn's error (issue 13), was RuntimeError
        PLSRegression(2).predict(X)
    with pytest.raises(ValueError, match="has 4 features"):
        PLSRegression(2).fit(X, Y).predict(X[:, :4])


def test_zero_samples_and_constant_x_name_the_argument():
    # before: zero samples died in NumPy's reshape, all-zero X gave NaN coefficients silently
    with pytest.raises(ValueError, match=r"`X` has 0 sample\(s\) \(shape=\(0, 5\)\)"):
        PLSRegression(2).fit(np.empty((0, 5)), np.empty(0))
    with pytest.raises(ValueError, match=r"n_samples=1"):
        PLSRegression(1).fit(np.ones((1, 5)), np.ones(1))
    X, Y = make_data(20, 5, 2)
    for constant in (np.zeros_like(X), np.full_like(X, 3.0)):
        with pytest.raises(ValueError, match=r"`X` \(shape \(20, 5\)\) is constant"):
            PLSRegression(2).fit(constant, Y)
        with pytest.raises(ValueError, match=r"`K` .* constant features"):
            PLSRegression(2).fit_gram(constant @ constant.T, Y)


@pytest.mark.parametrize("n,p,q,n_components,scale,tol", [c for c in CASES if not c[4]])
def test_fit_gram_equals_feature_space_pls(n, p, q, n_components, scale, tol):
    X, Y = make_data(n, p, q, seed=5)
    Xt, _ = make_data(n, p, q, seed=6)
    ours = PLSRegression(n_components, tol=tol).fit(X, Y)
    gram = PLSRegression(n_components, tol=tol).fit_gram(X @ X.T, Y)
    assert gram.n_iter_ == ours.n_iter_
    assert_close(gram.predict_gram(Xt @ X.T), ours.predict(Xt), 1e-6)
    mean = X.mean(axis=0)  # a Gram of centred features gives the same model
    centred = PLSRegression(n_components, tol=tol).fit_gram((X - mean) @ (X - mean).T, Y)
    assert_close(centred.predict_gram((Xt - mean) @ (X - mean).T), ours.predict(Xt), 1e-6)


def test_fit_gram_refuses_scale_and_feature_predict():
    X, Y = make_data(30, 8, 3)
    with pytest.raises(ValueError, match="scale=False only"):
        PLSRegression(2, scale=True).fit_gram(X @ X.T, Y)
    with pytest.raises(ValueError, match="predict with predict_gram"):
        PLSRegression(2).fit_gram(X @ X.T, Y).predict(X)


def test_power_iteration_extension_matches_numpy():
    from harmonizer_fast._ext import extension
    from harmonizer_fast.neural.pls import power_iteration_numpy

    ext = extension()
    if ext is None:
        pytest.skip("C++ extension not built")
    rng = np.random.default_rng(7)
    S = rng.standard_normal((50, 12))
    M = S.T @ S
    for tol, max_iter in ((1e-6, 500), (0.0, 7)):
        v_ref, it_ref = power_iteration_numpy(M, 3, tol, max_iter, np.finfo(float).eps)
        v, it = ext.pls_power_iteration(M, 3, tol, max_iter, np.finfo(float).eps)
        assert it == it_ref
        np.testing.assert_allclose(v, v_ref, rtol=1e-12, atol=1e-14)


def test_deflation_and_start_column_extension_match_numpy():
    from harmonizer_fast._ext import extension
    from harmonizer_fast.neural.pls_nipals import EPS, deflate_numpy, start_column_numpy

    ext = extension()
    if ext is None:
        pytest.skip("C++ extension not built")
    rng = np.random.default_rng(8)
    Y, cross = rng.standard_normal((40, 6)), rng.standard_normal((9, 6))
    xi, delta, g = rng.standard_normal(40), rng.standard_normal(6), rng.standard_normal(9)
    delta[2] = 0.0
    Y[:, 2] = xi * delta[2]  # column 2 deflates to exactly zero: zeroed in both, never the start
    Y[:, 0] = xi * delta[0]  # column 0 too, so the next start column is 1
    Y_ref, cross_ref, Y_ext, cross_ext = Y.copy(), cross.copy(), Y.copy(), cross.copy()
    assert deflate_numpy(Y_ref, xi, delta, cross_ref, g, 2.5) == 1
    assert ext.pls_deflate(Y_ext, xi, delta, cross_ext, g, 2.5, EPS) == 1
    np.testing.assert_array_equal(Y_ext, Y_ref)  # same operations in the same order: same bits
    np.testing.assert_array_equal(cross_ext, cross_ref)
    assert not Y_ext[:, [0, 2]].any() and not cross_ext[:, [0, 2]].any()
    constant = np.zeros((5, 3))
    assert start_column_numpy(constant, np.ones((2, 3))) == ext.pls_start_column(constant, np.ones((2, 3)), EPS) == -1
    with pytest.raises(ValueError, match="writable C-contiguous float64"):
        ext.pls_start_column(np.asfortranarray(Y), cross, EPS)
