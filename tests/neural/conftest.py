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

