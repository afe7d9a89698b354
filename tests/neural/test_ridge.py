"""RidgeCV against scikit-learn (LOO and K-fold, primal and dual), brute-force CV, and the
fused C++ reductions against their NumPy references."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.stats
from sklearn.linear_model import Ridge as SkRidge
from sklearn.linear_model import RidgeCV as SkRidgeCV
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import KFold

from harmonizer_fast.neural import _backend
from harmonizer_fast.neural.ridge import RidgeCV, alpha_path_moments, kfold_indices, pearson_per_target

ALPHAS = (0.01, 0.3, 3.0, 30.0, 300.0)
SHAPES = {"primal": (48, 12), "dual": (30, 70)}


def make_data(n, p, n_targets=5, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * rng.uniform(0.5, 3.0, p) + 1.5
    W = rng.standard_normal((p, n_targets)) * (rng.random((p, n_targets)) < 0.3)
    noise = rng.standard_normal((n, n_targets)) * rng.uniform(0.5, 8.0, n_targets)
    Y = X @ W + noise + rng.uniform(-3, 3, n_targets)
    return X.astype(dtype), Y.astype(dtype)


def assert_close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("route", sorted(SHAPES))
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("alpha_per_target", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_loo_matches_sklearn(route, fit_intercept, alpha_per_target, dtype):
    X, Y = make_data(*SHAPES[route], dtype=dtype)
    ours = RidgeCV(ALPHAS, fit_intercept=fit_intercept, alpha_per_target=alpha_per_target).fit(X, Y)
    # scikit-learn's RidgeCV computes in float64 whatever the input: feed it the same values
    ref = SkRidgeCV(ALPHAS, fit_intercept=fit_intercept, alpha_per_target=alpha_per_target).fit(
        X.astype(np.float64), Y.astype(np.float64)
    )
    assert ours.solver_ == route
    np.testing.assert_array_equal(ours.alpha_, ref.alpha_)
    assert_close(ours.best_score_, ref.best_score_, 1e-9)
    rtol = 1e-5 if dtype == np.float32 else 1e-9
    assert_close(ours.predict(X), ref.predict(X.astype(np.float64)), rtol)
    assert_close(ours.coef_, ref.coef_, rtol)
    assert_close(ours.intercept_, ref.intercept_, rtol)
    assert ours.coef_.dtype == dtype and ours.predict(X).dtype == dtype
    assert ours.coef_.shape == (Y.shape[1], X.shape[1])


@pytest.mark.parametrize("route", sorted(SHAPES))
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kfold_matches_sklearn(route, fit_intercept, dtype):
    X, Y = make_data(*SHAPES[route], seed=1, dtype=dtype)
    ours = RidgeCV(ALPHAS, fit_intercept=fit_intercept, cv=5).fit(X, Y)
    ref = SkRidgeCV(ALPHAS, fit_intercept=fit_intercept, cv=5).fit(X.astype(np.float64), Y.astype(np.float64))
    assert ours.alpha_ == ref.alpha_
    assert_close(ours.best_score_, ref.best_score_, 1e-9)
    rtol = 1e-5 if dtype == np.float32 else 1e-8
    assert_close(ours.predict(X), ref.predict(X.astype(np.float64)), rtol)


@pytest.mark.parametrize("route", sorted(SHAPES))
def test_kfold_alpha_per_target_equals_sklearn_per_target(route):
    X, Y = make_data(*SHAPES[route], seed=2)
    folds = KFold(4, shuffle=True, random_state=0)
    ours = RidgeCV(ALPHAS, cv=folds, alpha_per_target=True).fit(X, Y)
    refs = [SkRidgeCV(ALPHAS, cv=folds).fit(X, Y[:, j]) for j in range(Y.shape[1])]
    np.testing.assert_array_equal(ours.alpha_, [r.alpha_ for r in refs])
    assert_close(ours.best_score_, [r.best_score_ for r in refs], 1e-9)
    assert_close(ours.predict(X), np.stack([r.predict(X) for r in refs], axis=1), 1e-8)
    assert len(set(ours.alpha_.tolist())) > 1  # the data really need different alphas


def test_single_target_1d():
    X, Y = make_data(*SHAPES["primal"], seed=3)
    y = Y[:, 0]
    for cv in (None, 3):
        ours = RidgeCV(ALPHAS, cv=cv, alpha_per_target=True).fit(X, y)
        ref = SkRidgeCV(ALPHAS, cv=cv).fit(X, y)
        assert ours.predict(X).shape == (X.shape[0],) and ours.coef_.shape == (X.shape[1],)
        assert isinstance(ours.intercept_, float) and ours.alpha_ == ref.alpha_
        assert_close(ours.predict(X), ref.predict(X), 1e-9)


def test_loo_r2_scoring_matches_sklearn():
    X, Y = make_data(*SHAPES["dual"], seed=4)
    for apt in (True, False):
        ours = RidgeCV(ALPHAS, scoring="r2", alpha_per_target=apt).fit(X, Y)
        ref = SkRidgeCV(ALPHAS, scoring="r2", alpha_per_target=apt).fit(X, Y)
        np.testing.assert_array_equal(ours.alpha_, ref.alpha_)
        assert_close(ours.best_score_, ref.best_score_, 1e-9)


def brute_force_loo_predictions(X, Y, alpha):
    preds = np.empty_like(Y)
    for i in range(X.shape[0]):
        keep = np.arange(X.shape[0]) != i
        preds[i] = SkRidge(alpha=alpha).fit(X[keep], Y[keep]).predict(X[i : i + 1])[0]
    return preds


@pytest.mark.parametrize("route", sorted(SHAPES))
def test_loo_pearson_and_grid_equal_brute_force(route):
    X, Y = make_data(*SHAPES[route], seed=5)
    X, Y = X[:24], Y[:24]
    ours = RidgeCV(ALPHAS, scoring="pearson", alpha_per_target=True).fit(X, Y)
    mse = RidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y)
    for a, alpha in enumerate(ALPHAS):
        preds = brute_force_loo_predictions(X, Y, alpha)
        expected = [scipy.stats.pearsonr(Y[:, j], preds[:, j])[0] for j in range(Y.shape[1])]
        assert_close(ours.cv_scores_[a], expected, 1e-9)
        assert_close(mse.cv_scores_[a], -((Y - preds) ** 2).mean(axis=0), 1e-9)
    np.testing.assert_array_equal(ours.alpha_, np.asarray(ALPHAS)[np.argmax(ours.cv_scores_, axis=0)])


def test_kfold_pearson_equals_brute_force():
    X, Y = make_data(*SHAPES["dual"], seed=6)
    ours = RidgeCV(ALPHAS, cv=3, scoring="pearson", alpha_per_target=True).fit(X, Y)
    for a, alpha in enumerate(ALPHAS):
        per_fold = []
        for train, test in KFold(3).split(X):
            pred = SkRidge(alpha=alpha).fit(X[train], Y[train]).predict(X[test])
            per_fold.append([scipy.stats.pearsonr(Y[test, j], pred[:, j])[0] for j in range(Y.shape[1])])
        assert_close(ours.cv_scores_[a], np.mean(per_fold, axis=0), 1e-9)


def test_splits_as_iterable_and_kfold_indices_match_sklearn():
    for n, k in [(10, 3), (12, 4), (7, 7)]:
        for (tr, te), (str_, ste) in zip(kfold_indices(n, k), KFold(k).split(np.zeros((n, 1)))):
            np.testing.assert_array_equal(tr, str_)
            np.testing.assert_array_equal(te, ste)
    X, Y = make_data(*SHAPES["primal"], seed=7)
    a = RidgeCV(ALPHAS, cv=list(KFold(4).split(X))).fit(X, Y)
    b = RidgeCV(ALPHAS, cv=4).fit(X, Y)
    assert a.alpha_ == b.alpha_
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=1e-12)


def test_score_and_score_pearson():
    X, Y = make_data(*SHAPES["primal"], seed=8)
    Xt, Yt = make_data(*SHAPES["primal"], seed=9)
    ours = RidgeCV(ALPHAS).fit(X, Y)
    ref = SkRidgeCV(ALPHAS).fit(X, Y)
    assert ours.score(Xt, Yt) == pytest.approx(ref.score(Xt, Yt), rel=1e-9)
    pred = ref.predict(Xt)
    expected = np.mean([scipy.stats.pearsonr(Yt[:, j], pred[:, j])[0] for j in range(Yt.shape[1])])
    assert ours.score_pearson(Xt, Yt) == pytest.approx(expected, rel=1e-9)


def test_torch_inputs_accepted():
    torch = pytest.importorskip("torch")
    X, Y = make_data(*SHAPES["primal"], seed=10)
    a = RidgeCV(ALPHAS).fit(torch.from_numpy(X), torch.from_numpy(Y))
    b = RidgeCV(ALPHAS).fit(X, Y)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))


# ----------------------------------------------------------------- errors


def test_bad_inputs_raise_helpful_errors():
    X, Y = make_data(*SHAPES["primal"])
    with pytest.raises(ValueError, match=r"X shape \(48, 12\) and Y shape \(40, 5\)"):
        RidgeCV().fit(X, Y[:40])
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"`X` \(shape \(48, 12\)\) contains 1 non-finite"):
        RidgeCV().fit(Xn, Y)
    Yn = Y.copy()
    Yn[0, 0] = np.inf
    with pytest.raises(ValueError, match="`Y`.*non-finite"):
        RidgeCV().fit(X, Yn)
    with pytest.raises(ValueError, match=r"cv=5 folds need at least 5 samples, got n_samples=4"):
        RidgeCV(cv=5).fit(X[:4], Y[:4])
    with pytest.raises(ValueError, match="at least 2 samples"):
        RidgeCV().fit(X[:1], Y[:1])
    with pytest.raises(ValueError, match="must be 2-D"):
        RidgeCV().fit(X[:, 0], Y)
    with pytest.raises(ValueError, match="alphas must be finite and > 0"):
        RidgeCV(alphas=(1.0, 0.0)).fit(X, Y)
    with pytest.raises(ValueError, match="scoring must be None or one of"):
        RidgeCV(scoring="accuracy").fit(X, Y)
    with pytest.raises(NotFittedError, match="not fitted"):  # scikit-learn's error (issue 13), was RuntimeError
        RidgeCV().predict(X)
    model = RidgeCV().fit(X, Y)
    with pytest.raises(ValueError, match="has 11 features"):
        model.predict(X[:, :11])
    with pytest.raises(TypeError, match="cv must be None, an int"):
        RidgeCV(cv=3.5).fit(X, Y)


# ----------------------------------------------------------------- kernels and memory


def test_alpha_path_never_holds_alphas_by_samples_by_targets():
    rng = np.random.default_rng(0)
    n, k, t, n_alphas = 2000, 30, 100, 60
    F, B, Y = rng.standard_normal((n, k)), rng.standard_normal((k, t)), rng.standard_normal((n, t))
    W, D = rng.random((n_alphas, k)), 1.0 + rng.random((n_alphas, n))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        out = alpha_path_moments(F, W, B, Y, D)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    full_path_bytes = n_alphas * n * t * 8
    # contract: output + one (n, t) buffer + small temporaries (and the BLAS thread control's
    # bookkeeping, well under 1 MiB)
    assert peak < out.nbytes + 3 * n * t * 8 + 2**20 < full_path_bytes / 5
    for a in (0, n_alphas - 1):
        R = (Y - F @ (W[a][:, None] * B)) / D[a][:, None]
        np.testing.assert_allclose(out[a], [R.sum(0), (R * R).sum(0), (Y * R).sum(0)], rtol=1e-10, atol=1e-9)


def test_residual_moments_extension_matches_numpy():
    rng = np.random.default_rng(1)
    Y, M, d = rng.standard_normal((300, 70)), rng.standard_normal((300, 70)), 0.5 + rng.random(300)
    for dd in (d, None):
        ref = _backend.residual_moments_numpy(Y, M, dd)
        np.testing.assert_allclose(_backend.residual_moments(Y, M, dd), ref, rtol=1e-12, atol=1e-10)


def test_residual_moments_of_stacked_alphas_equal_one_alpha_at_a_time():
    # the alpha path reduces c alphas of one product F [W_1 B, ..., W_c B] in one pass: each
    # alpha's sums must be the bits of its own (n, t) call, and the NumPy reference's values
    rng = np.random.default_rng(4)
    n, c, t = 700, 3, 9
    Y, M, D = rng.standard_normal((n, t)), rng.standard_normal((n, c, t)), 0.5 + rng.random((c, n))
    for residual in (False, True):
        for DD in (D, None):
            stacked = _backend.residual_moments(Y, M, DD, residual)
            assert stacked.shape == (c, 3, t)
            for a in range(c):
                alone = _backend.residual_moments(Y, np.ascontiguousarray(M[:, a]), None if DD is None else DD[a], residual)
                np.testing.assert_array_equal(stacked[a], alone)
            ref = _backend.residual_moments_numpy(Y, M, DD, residual)
            np.testing.assert_allclose(stacked, ref, rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError, match=r"d must have shape \(3, 700\)"):
        _backend.residual_moments(Y, M, D[:, :10])
    with pytest.raises(ValueError, match="M \\(n, t\\) or \\(n, c, t\\)"):
        _backend.residual_moments(Y, M[:, :, :4])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_centre_columns_equals_numpy_and_flags_non_finite_columns(dtype):
    rng = np.random.default_rng(7)
    X = (rng.standard_normal((301, 17)) * 5.0 + 40.0).astype(dtype)
    centred, mean, sums = _backend.centre_columns(X)
    ref_centred, ref_mean, ref_sums = _backend.centre_columns_numpy(X)
    np.testing.assert_array_equal(mean, X.mean(axis=0, dtype=np.float64))  # same bits as NumPy's mean
    np.testing.assert_array_equal(centred, ref_centred)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-13)
    assert centred.dtype == np.float64
    X[5, 3], X[7, 9] = np.inf, np.nan
    mean = _backend.centre_columns(X)[1]
    assert not np.isfinite(mean[[3, 9]]).any() and np.isfinite(np.delete(mean, [3, 9])).all()
    Y = rng.standard_normal((301, 2))
    for fit_intercept in (True, False):  # the centring pass and the plain check name the same count
        with pytest.raises(ValueError, match=r"`X` \(shape \(301, 17\)\) contains 2 non-finite"):
            RidgeCV(fit_intercept=fit_intercept).fit(X, Y)


def test_alpha_path_chunks_equal_one_alpha_at_a_time(monkeypatch):
    # chunks of equal size and a shorter last one give the same sums as one alpha per product
    from harmonizer_fast.neural import ridge_path

    rng = np.random.default_rng(5)
    n, k, t, n_alphas = 300, 40, 7, 11
    F, B, Y = rng.standard_normal((n, k)), rng.standard_normal((k, t)), rng.standard_normal((n, t))
    W, D = rng.random((n_alphas, k)), 1.0 + rng.random((n_alphas, n))
    monkeypatch.setattr(ridge_path, "PATH_COLUMNS", t)  # one alpha per product
    single = alpha_path_moments(F, W, B, Y, D)
    for columns in (3 * t, 4 * t, 256):  # chunks of 3 (last 2), of 4 (last 3), all 11 at once
        monkeypatch.setattr(ridge_path, "PATH_COLUMNS", columns)
        np.testing.assert_allclose(alpha_path_moments(F, W, B, Y, D), single, rtol=1e-12, atol=1e-10)
        products = np.stack([F @ (W[a][:, None] * B) for a in range(n_alphas)])  # the residuals
        np.testing.assert_allclose(
            alpha_path_moments(F, W, B, Y, residual=True)[:, 1], (products**2).sum(axis=1), rtol=1e-12
        )


def test_small_products_and_decompositions_match_numpy_and_restore_thread_counts():
    import threadpoolctl
    import torch

    from harmonizer_fast.neural.ridge_solvers import eigh_psd

    rng = np.random.default_rng(6)
    A, B = rng.standard_normal((120, 50)), rng.standard_normal((50, 30))
    threads_before = (torch.get_num_threads(), [i["num_threads"] for i in threadpoolctl.threadpool_info()])
    out = np.empty((120, 30))
    assert _backend.matmul(A, B, out=out) is out  # torch's BLAS on one thread (small)
    np.testing.assert_allclose(out, A @ B, rtol=1e-13, atol=1e-12)
    read_only = A.copy()
    read_only.flags.writeable = False  # torch cannot view it: NumPy's product, same values
    np.testing.assert_allclose(_backend.matmul(read_only, B), A @ B, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(_backend.matmul(A[:, ::-1], B[::-1]), A @ B, rtol=1e-13, atol=1e-12)  # negative strides
    G = A.T @ A
    lam, V = eigh_psd(G)  # order 50: torch's LAPACK on one thread
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(G), rtol=1e-12, atol=1e-12 * lam.max())
    np.testing.assert_allclose(V @ np.diag(lam) @ V.T, G, atol=1e-11 * lam.max())
    np.testing.assert_allclose(V.T @ V, np.eye(50), atol=1e-13)
    lower = np.tril(G) + np.triu(rng.standard_normal((50, 50)), 1)  # only the lower triangle is read
    for layout in (lower, np.asfortranarray(lower)):
        np.testing.assert_allclose(eigh_psd(layout)[0], lam, rtol=1e-12, atol=1e-12 * lam.max())
    with _backend.single_blas_thread():
        assert torch.get_num_threads() == 1
        assert {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"} == {1}
    assert threads_before == (torch.get_num_threads(), [i["num_threads"] for i in threadpoolctl.threadpool_info()])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pearson_per_target_matches_scipy(dtype):
    rng = np.random.default_rng(2)
    A = rng.standard_normal((500, 40)) + 100.0
    B = A * 0.3 + rng.standard_normal((500, 40))
    A, B = A.astype(dtype), B.astype(dtype)
    expected = [scipy.stats.pearsonr(A[:, j].astype(np.float64), B[:, j].astype(np.float64))[0] for j in range(40)]
    np.testing.assert_allclose(pearson_per_target(A, B), expected, rtol=1e-10)
    np.testing.assert_allclose(_backend.pearson_per_target_numpy(A, B), expected, rtol=1e-10)
    np.testing.assert_allclose(pearson_per_target(A[:, 0], B[:, 0]), expected[:1], rtol=1e-10)


def test_pearson_per_target_constant_column_warns_and_bad_shapes_raise():
    A = np.random.default_rng(3).standard_normal((20, 3))
    B = A.copy()
    B[:, 1] = 2.0
    with pytest.warns(RuntimeWarning, match="1 of 3 target"):
        out = pearson_per_target(A, B)
    assert np.isnan(out[1]) and out[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"same shape.*\(20, 3\) and \(20, 2\)"):
        pearson_per_target(A, B[:, :2])


def test_zero_samples_and_overflow_name_the_argument():
    # before: zero samples died in NumPy's reshape, a huge finite X in eigh (inf Gram), a huge
    # Y gave NaN scores
    for cv in (None, 3):
        with pytest.raises(ValueError, match=r"`X` has 0 sample\(s\) \(shape=\(0, 5\)\)"):
            RidgeCV(cv=cv).fit(np.empty((0, 5)), np.empty(0))
    X, Y = make_data(*SHAPES["primal"], seed=11)
    with pytest.raises(ValueError, match=r"`X` has 0 sample\(s\)"):
        RidgeCV().fit(X, Y).predict(np.empty((0, X.shape[1])))
    for route in sorted(SHAPES):
        X, Y = make_data(*SHAPES[route], seed=12)
        for cv in (None, 3):
            with pytest.raises(ValueError, match=r"`X` \(shape .*largest \|value\| .*e\+1[0-9]{2}\) is finite but overflows"):
                RidgeCV(cv=cv).fit(X * 1e160, Y)
            with pytest.raises(ValueError, match=r"`Y` .* overflow"):
                RidgeCV(cv=cv).fit(X, Y * 1e160)


def exact_loo_mse(X, Y, alphas):
    """Leave-one-out MSE by refitting without each sample (dual form, intercept by centring)."""
    n = X.shape[0]
    out = np.zeros((len(alphas), Y.shape[1]))
    for i in range(n):
        keep = np.arange(n) != i
        x_mean, y_mean = X[keep].mean(axis=0), Y[keep].mean(axis=0)
        Xs = X[keep] - x_mean
        K, k_i = Xs @ Xs.T, (X[i] - x_mean) @ Xs.T
        for a, alpha in enumerate(alphas):
            c = scipy.linalg.solve(K + alpha * np.eye(n - 1), Y[keep] - y_mean, assume_a="pos")
            out[a] += (Y[i] - y_mean - k_i @ c) ** 2
    return out / n


def test_dual_loo_is_exact_where_sklearn_intercept_correction_cancels():
    # The 500 x 50,000 -> 100 grid shape: 2 targets chose alpha 1e-3 where scikit-learn chose
    # 8.9e-3. scikit-learn's gram mode eigendecomposes the centred Gram, whose constant
    # direction has a round-off eigenvalue instead of 0, and corrects the leave-one-out
    # denominator for the intercept by subtracting (G^-1 1)_i / n ~ 1 / (alpha n) from
    # diag(G^-1) ~ 1 / (alpha n) + sum_k Q_ik^2 / lambda_k: the cancellation costs an error
    # ~ 1 / alpha (x10 per decade of alpha), large when ||K|| is large against alpha. Ours
    # removes the constant direction exactly (eigh_orthogonal_to_ones) and never subtracts.
    rng = np.random.default_rng(1)
    n, p, t = 40, 600, 6
    X = 300.0 * rng.standard_normal((n, p))
    Y = X[:, :5] @ rng.standard_normal((5, t)) / 300.0 + rng.standard_normal((n, t))
    alphas = np.logspace(-4, 2, 7)
    exact = exact_loo_mse(X, Y, alphas)
    ours = RidgeCV(alphas, alpha_per_target=True).fit(X, Y)
    assert ours.solver_ == "dual"
    np.testing.assert_allclose(-ours.cv_scores_, exact, rtol=1e-12)
    np.testing.assert_array_equal(ours.alpha_, alphas[np.argmin(exact, axis=0)])
    ref = SkRidgeCV(alphas, alpha_per_target=True, store_cv_results=True).fit(X, Y)
    sk_error = np.abs(ref.cv_results_.reshape(n, t, -1).mean(axis=0).T - exact).max(axis=1) / exact.max(axis=1)
    assert sk_error[0] > 1e-7 and sk_error[0] > 5 * sk_error[1] > 25 * sk_error[2]  # ~ 1 / alpha
    assert (ref.alpha_ != ours.alpha_).any()  # and it moves scikit-learn's choice


# ----------------------------------------------------------------- kernel (Gram) form


@pytest.mark.parametrize("route", sorted(SHAPES))
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("cv", [None, 4], ids=["loo", "kfold"])
def test_fit_gram_predicts_as_features(route, fit_intercept, cv):
    X, Y = make_data(*SHAPES[route], seed=13)
    Xt, _ = make_data(*SHAPES[route], seed=14)
    kwargs = dict(fit_intercept=fit_intercept, cv=cv, alpha_per_target=True)
    ours = RidgeCV(ALPHAS, **kwargs).fit(X, Y)
    gram = RidgeCV(ALPHAS, **kwargs).fit_gram(X @ X.T, Y)
    assert gram.solver_ == "gram" and gram.dual_coef_.shape == (X.shape[0], Y.shape[1])
    np.testing.assert_array_equal(gram.alpha_, ours.alpha_)
    assert_close(gram.cv_scores_, ours.cv_scores_, 1e-7)
    assert_close(gram.predict_gram(Xt @ X.T), ours.predict(Xt), 1e-7)
    if fit_intercept:  # a Gram of centred features gives the same model
        mean = X.mean(axis=0)
        centred = RidgeCV(ALPHAS, **kwargs).fit_gram((X - mean) @ (X - mean).T, Y)
        assert_close(centred.predict_gram((Xt - mean) @ (X - mean).T), ours.predict(Xt), 1e-7)


def test_fit_gram_bad_inputs():
    X, Y = make_data(*SHAPES["dual"], seed=15)
    with pytest.raises(ValueError, match=r"`K` must be a square .* got shape \(30, 70\)"):
        RidgeCV().fit_gram(X, Y)
    K = X @ X.T
    K[0, 1] += 1.0
    with pytest.raises(ValueError, match="`K` .* is not symmetric"):
        RidgeCV().fit_gram(K, Y)
    model = RidgeCV().fit_gram(X @ X.T, Y)
    with pytest.raises(ValueError, match="K_cross has 29 features, but RidgeCV is expecting 30"):
        model.predict_gram(X[:5] @ X[:29].T)
    with pytest.raises(ValueError, match="predict with predict_gram"):
        model.predict(X)
    with pytest.raises(ValueError, match="predict with predict$"):
        RidgeCV().fit(X, Y).predict_gram(X @ X.T)
