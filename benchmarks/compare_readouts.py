"""IT readouts: RidgeCV and PLSRegression against scikit-learn and himalaya on the same data.

Brain-Score-sized problem: 3,200 images, 168 IT sites, 20 alphas (``np.logspace(-3, 6, 20)``);
features p=2,048 (primal route) and p=50,000 (dual route, float32 storage). Every case checks
that the candidates agree with the baseline before its timing is reported.
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import Callable, List, Tuple

import numpy as np

from benchmarks._timing import Comparison, Timing, format_table, measure

ALPHAS = np.logspace(-3, 6, 20)


def make_problem(n: int, p: int, n_targets: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Correlated float32 features (a 64-d latent plus noise) and targets of varied noise."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 64)).astype(np.float32)
    X = latent @ rng.standard_normal((64, p)).astype(np.float32)
    X += 2.0 * rng.standard_normal((n, p)).astype(np.float32)
    readout = rng.standard_normal((64, n_targets)) / 8.0
    noise = rng.standard_normal((n, n_targets)) * rng.uniform(0.3, 3.0, n_targets)
    Y = (latent @ readout + noise).astype(np.float32)
    return X, Y


def _fit_once(fit: Callable[[], object], name: str):
    """Time one fit and keep its model: the slow baselines run once, and that run is also
    the reference the candidate is checked against."""
    start = time.perf_counter()
    model = fit()
    elapsed = time.perf_counter() - start
    return model, Timing(name, elapsed, elapsed, elapsed, 1)


def _reps(quick: bool) -> dict:
    return dict(repeats=3, warmup=1) if quick else dict(repeats=2, warmup=0)


def _assert_predictions(ours: np.ndarray, ref: np.ndarray, rtol: float, what: str) -> None:
    err = np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max()
    if err > rtol:
        raise AssertionError(f"{what}: predictions differ by {err:.2e} (relative to max), tolerance {rtol}")


def _loo_case(X, Y, label: str, quick: bool) -> Comparison:
    from sklearn.linear_model import RidgeCV as SkRidgeCV

    from harmonizer_fast.neural.ridge import RidgeCV

    ref, base = _fit_once(lambda: SkRidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y), "sklearn RidgeCV LOO")
    ours = RidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y)
    np.testing.assert_array_equal(ours.alpha_, ref.alpha_)
    _assert_predictions(ours.predict(X), ref.predict(X).astype(np.float64), 1e-5, label)
    cand = measure(lambda: RidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y), name="RidgeCV LOO", **_reps(quick))
    return Comparison(f"{label} LOO, per-target alpha", base, [cand], note="same alphas_, predictions <= 1e-5")


def _kfold_case(X, Y, label: str, quick: bool, dual: bool) -> Comparison:
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV as HimRidgeCV

    from harmonizer_fast.neural.ridge import RidgeCV

    set_backend("torch", on_error="raise")

    def himalaya_fit():
        if dual:
            model = KernelRidgeCV(alphas=ALPHAS, kernel="linear", cv=5, fit_intercept=True)
        else:
            model = HimRidgeCV(alphas=ALPHAS, cv=5, fit_intercept=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.fit(X, Y)

    def ours_fit():
        # himalaya scores folds by negative MSE and keeps one alpha per target
        return RidgeCV(ALPHAS, cv=5, alpha_per_target=True, scoring="neg_mean_squared_error").fit(X, Y)

    ref, base = _fit_once(himalaya_fit, f"himalaya {'KernelRidgeCV' if dual else 'RidgeCV'} (torch)")
    ours = ours_fit()
    ref_alphas = np.asarray(ref.best_alphas_.cpu() if hasattr(ref.best_alphas_, "cpu") else ref.best_alphas_)
    same = np.isclose(ours.alpha_, ref_alphas, rtol=1e-4)
    if same.mean() < 0.9:
        raise AssertionError(f"{label}: only {same.mean():.0%} of targets chose himalaya's alpha")
    ref_pred = np.asarray(ref.predict(X).cpu() if hasattr(ref.predict(X), "cpu") else ref.predict(X), np.float64)
    # himalaya runs in float32: agreement to float32 accuracy on the targets with the same alpha
    _assert_predictions(ours.predict(X)[:, same], ref_pred[:, same], 2e-3, label)
    cand = measure(ours_fit, name="RidgeCV 5-fold", **_reps(quick))
    cand.extra["same_alpha"] = f"{same.mean():.0%}"
    return Comparison(f"{label} 5-fold, per-target alpha", base, [cand], note="float32 himalaya vs float64 ours")


def _pls_case(X, Y, label: str, quick: bool) -> Comparison:
    from sklearn.cross_decomposition import PLSRegression as SkPLS

    from harmonizer_fast.neural.pls import PLSRegression

    ref, base = _fit_once(lambda: SkPLS(25, scale=False).fit(X, Y), "sklearn PLSRegression(25)")
    ours = PLSRegression(25).fit(X, Y)
    if ours.n_iter_ != ref.n_iter_:
        raise AssertionError(f"{label}: NIPALS iteration counts differ: {ours.n_iter_} vs {ref.n_iter_}")
    _assert_predictions(ours.predict(X), ref.predict(X).astype(np.float64), 1e-4, label)
    cand = measure(lambda: PLSRegression(25).fit(X, Y), name="PLSRegression(25)", **_reps(quick))
    cand.extra["nipals_iters"] = str(sum(ref.n_iter_))
    return Comparison(f"{label} PLS-25", base, [cand], note="same n_iter_, predictions <= 1e-4")


def _pearson_case(Y: np.ndarray) -> Comparison:
    from harmonizer_fast.neural._backend import pearson_per_target, pearson_per_target_numpy

    pred = Y + np.random.default_rng(1).standard_normal(Y.shape).astype(np.float32)
    np.testing.assert_allclose(pearson_per_target(Y, pred), pearson_per_target_numpy(Y, pred), rtol=1e-10)
    base = measure(lambda: pearson_per_target_numpy(Y, pred), name="NumPy", repeats=20, warmup=2)
    cand = measure(lambda: pearson_per_target(Y, pred), name="C++ pearson_per_target", repeats=20, warmup=2)
    return Comparison(f"pearson per target {Y.shape}", base, [cand])


def compare(quick: bool) -> Tuple[str, List[Comparison]]:
    n, t = (800, 40) if quick else (3200, 168)
    p_primal, p_dual = (256, 4000) if quick else (2048, 50000)
    X, Y = make_problem(n, p_primal, t)
    cases = [
        lambda: _pearson_case(Y),
        lambda: _loo_case(X, Y, f"primal n={n} p={p_primal} t={t}", quick),
        lambda: _kfold_case(X, Y, f"primal n={n} p={p_primal} t={t}", quick, dual=False),
        lambda: _pls_case(X, Y, f"n={n} p={p_primal} t={t}", quick),
        lambda: _loo_case(*dual_problem(), f"dual n={n} p={p_dual} t={t} (float32 X)", quick),
        lambda: _kfold_case(*dual_problem(), f"dual n={n} p={p_dual} t={t} (float32 X)", quick, dual=True),
    ]
    cache = {}

    def dual_problem():
        if "dual" not in cache:
            cache["dual"] = make_problem(n, p_dual, t, seed=1)
        return cache["dual"]

    comparisons = []
    for case in cases:
        comparisons.append(case())
        # progress on stderr: a long full run leaves its finished rows behind
        print(format_table(comparisons[-1:]), file=sys.stderr, flush=True)
    return f"IT readouts ({len(ALPHAS)} alphas)", comparisons
