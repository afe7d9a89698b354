"""pytest-benchmark timings of the IT readouts (see compare_readouts.py for the full comparison).

Small shapes (quick-mode sizes) so the file runs in about a minute:
``python -m pytest benchmarks/test_bench_readouts.py``.
"""
import numpy as np
import pytest
from sklearn.cross_decomposition import PLSRegression as SkPLS
from sklearn.linear_model import RidgeCV as SkRidgeCV

from benchmarks.compare_readouts import ALPHAS, make_problem
from harmonizer_fast.neural.pls import PLSRegression
from harmonizer_fast.neural.ridge import RidgeCV

ROUTES = {"primal": (800, 256), "dual": (400, 3000)}
N_TARGETS = 40


@pytest.fixture(scope="module", params=sorted(ROUTES))
def problem(request):
    n, p = ROUTES[request.param]
    return make_problem(n, p, N_TARGETS)


@pytest.mark.parametrize("variant", ["sklearn", "harmonizer_fast"])
def test_ridge_loo(benchmark, problem, variant):
    X, Y = problem
    cls = SkRidgeCV if variant == "sklearn" else RidgeCV
    model = benchmark(lambda: cls(ALPHAS, alpha_per_target=True).fit(X, Y))
    ref = SkRidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y)
    np.testing.assert_array_equal(model.alpha_, ref.alpha_)


def test_ridge_kfold(benchmark, problem):
    X, Y = problem
    model = benchmark(lambda: RidgeCV(ALPHAS, cv=5, alpha_per_target=True).fit(X, Y))
    assert model.alpha_.shape == (N_TARGETS,)


@pytest.mark.parametrize("variant", ["sklearn", "harmonizer_fast"])
def test_pls25(benchmark, variant):
    X, Y = make_problem(*ROUTES["primal"], N_TARGETS)
    model = benchmark(lambda: (SkPLS(25, scale=False) if variant == "sklearn" else PLSRegression(25)).fit(X, Y))
    ref = PLSRegression(25).fit(X, Y)
    np.testing.assert_allclose(model.predict(X), ref.predict(X), rtol=1e-4, atol=1e-4 * np.abs(ref.predict(X)).max())


def test_grid_runs_at_tiny_sizes(capsys):
    from benchmarks.compare_readouts import TINY_GRID, format_grid, run_grid

    rows = run_grid(TINY_GRID[:1], TINY_GRID[:1], repeats=2, budget_s=5.0)
    table = format_grid(rows)
    assert [r["kind"] for r in rows] == ["ridge", "pls"] and all(r["ratio"] > 0 for r in rows)
    assert "RidgeCV LOO | 60 x 30 -> 3" in table and "PLS-25 | 60 x 30 -> 3" in table


def test_ridge_check_accepts_another_alpha_only_at_a_tie():
    from types import SimpleNamespace

    from benchmarks.compare_readouts import check_ridge_against_sklearn

    X, Y = make_problem(40, 400, 4)  # p >> n: the smallest alphas nearly interpolate, their LOO MSE tie
    ours = RidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y)
    ref = SkRidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y)
    assert check_ridge_against_sklearn(ours, ref, X, Y, "same") == ""
    j = int(np.flatnonzero(ours.alpha_ == ALPHAS[0])[0])
    for other, tie in ((ALPHAS[1], True), (ALPHAS[-1], False)):
        forged = SimpleNamespace(alpha_=np.where(np.arange(Y.shape[1]) == j, other, ref.alpha_), predict=ref.predict)
        if tie:
            assert "1 of 4 targets chose another alpha than scikit-learn at a tie" in check_ridge_against_sklearn(
                ours, forged, X, Y, "tie"
            )
        else:
            with pytest.raises(AssertionError, match="tie tolerance"):
                check_ridge_against_sklearn(ours, forged, X, Y, "no tie")
