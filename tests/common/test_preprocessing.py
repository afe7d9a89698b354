"""preprocess_input: /255, minus the ImageNet mean, divided by the ImageNet std."""
import numpy as np
import pytest
import torch

from harmonizer_fast.common import preprocess_input

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def test_matches_numpy_formula():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(2, 3, 5, 7)).astype(np.float32)
    out = preprocess_input(torch.from_numpy(images))
    expected = (images.astype(np.float64) / 255.0 - MEAN[:, None, None]) / STD[:, None, None]
    assert out.dtype == torch.float32 and out.shape == images.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_uint8_and_single_image():
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).reshape(3, 4, 4)
    out = preprocess_input(image)
    expected = (image.numpy() / 255.0 - MEAN[:, None, None]) / STD[:, None, None]
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_float64_stays_float64():
    images = torch.full((1, 3, 2, 2), 255.0, dtype=torch.float64)
    out = preprocess_input(images)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), (1.0 - MEAN) / STD, rtol=1e-15)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"3 \(RGB\) channels.*\(2, 4, 4, 3\)"):
        preprocess_input(torch.zeros(2, 4, 4, 3))
    with pytest.raises(ValueError, match="rank"):
        preprocess_input(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="dtype"):
        preprocess_input(torch.zeros(1, 3, 2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        preprocess_input(np.zeros((1, 3, 2, 2)))
    bad = torch.zeros(1, 3, 2, 2)
    bad[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        preprocess_input(bad)
