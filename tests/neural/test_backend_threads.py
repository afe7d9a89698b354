"""Readout results are bitwise reproducible: they never depend on the machine's load, and the
C++ reductions give the same bits whatever the number of OpenMP threads."""
import os

import numpy as np
import pytest

from harmonizer_fast.neural import _backend
from harmonizer_fast.neural.pls import PLSRegression
from harmonizer_fast.neural.ridge import RidgeCV

threadpoolctl = pytest.importorskip("threadpoolctl")


def _fits(X, Y):
    ridge = RidgeCV((0.1, 10.0, 1000.0), alpha_per_target=True).fit(X, Y)
    kfold = RidgeCV((0.1, 10.0, 1000.0), cv=3).fit(X, Y)
    pls = PLSRegression(5).fit(X, Y)
    return [ridge.coef_, ridge.cv_scores_, kfold.coef_, pls.coef_]


@pytest.mark.parametrize("shape", [(400, 320), (300, 420)], ids=["primal", "dual"])
def test_fits_do_not_depend_on_the_load(monkeypatch, shape):
    # before: decompositions ran on one BLAS thread above a load threshold and on all below it,
    # and OpenBLAS's eigh gives different bits on 1 and 2 threads from ~300 x 300 up
    rng = np.random.default_rng(0)
    X = rng.standard_normal(shape)
    Y = X[:, :8] @ rng.standard_normal((8, 6)) + rng.standard_normal((shape[0], 6))
    results = []
    for load in (0.1, 64.0):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        results.append(_fits(X, Y))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_residual_moments_same_bits_whatever_the_openmp_threads():
    if not any(i["user_api"] == "openmp" for i in threadpoolctl.threadpool_info()):
        pytest.skip("no OpenMP runtime loaded")
    rng = np.random.default_rng(1)
    Y = rng.standard_normal((8192, 1024))  # n * t = 2**23: large enough to start threads
    M = Y + rng.standard_normal((8192, 1024))
    d = 0.5 + rng.random(8192)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        one = _backend.residual_moments(Y, M, d)
        pearson_one = _backend.pearson_per_target(Y, M)
    with threadpoolctl.threadpool_limits(limits=max(2, os.cpu_count() or 2), user_api="openmp"):
        many = _backend.residual_moments(Y, M, d)
        pearson_many = _backend.pearson_per_target(Y, M)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(pearson_one, pearson_many)
