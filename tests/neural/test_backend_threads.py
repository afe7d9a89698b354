"""decomposition_threads: all BLAS threads on an idle machine, one when the cores are busy."""
import pytest

from harmonizer_fast.neural import _backend

threadpoolctl = pytest.importorskip("threadpoolctl")


def _blas_threads():
    return max(info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas")


@pytest.mark.parametrize("load,expect_single", [(0.3, False), (64.0, True)])
def test_decomposition_threads_follow_the_load(monkeypatch, load, expect_single):
    import os

    import numpy  # noqa: F401  (loads the BLAS whose threads are limited)

    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    before = _blas_threads()
    with _backend.decomposition_threads():
        inside = _blas_threads()
    assert _blas_threads() == before
    assert inside == (1 if expect_single else before)
