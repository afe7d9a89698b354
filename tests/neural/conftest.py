"""Shared helpers of the neural tests."""
import numpy as np
import pytest
from skimage.transform import resize


def tf_resize(maps: np.ndarray, size) -> np.ndarray:
    """Independent TF-style bilinear resize (half-pixel centres, no antialias) of (H, W[, C]) maps."""
    return resize(maps.astype(np.float64), size, order=1, anti_aliasing=False, mode="edge")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _pls_until_ported(monkeypatch):
    """TEMPORARY: until harmonizer_fast.neural.pls exists, brain_score uses scikit-learn's PLS."""
    try:
        import harmonizer_fast.neural.pls  # noqa: F401
    except ImportError:
        from sklearn.cross_decomposition import PLSRegression

        from harmonizer_fast.neural import metrics

        monkeypatch.setattr(metrics, "_make_pls", lambda n: PLSRegression(n, scale=False, tol=1e-4))
