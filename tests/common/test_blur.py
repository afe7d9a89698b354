"""gaussian_kernel / gaussian_blur against the TensorFlow reference (fixture blur.npz)."""
import numpy as np
import pytest
import scipy.signal
import torch

from harmonizer_fast.common import gaussian_blur, gaussian_kernel

RTOL = 1e-5


@pytest.fixture(scope="module")
def blur_fixture(fixtures_dir):
    return np.load(fixtures_dir / "blur.npz")


@pytest.mark.parametrize("args,key", [((), "kernel_default"), ((5, 2), "kernel_5_2")])
def test_kernel_matches_reference_bitwise(blur_fixture, args, key):
    kernel = gaussian_kernel(*args)
    expected = blur_fixture[key][:, :, 0, 0]
    assert kernel.dtype == torch.float32 and kernel.shape == expected.shape
    np.testing.assert_array_equal(kernel.numpy(), expected)


def test_default_kernel_is_off_centre():
    kernel = gaussian_kernel().numpy()
    assert np.unravel_index(kernel.argmax(), kernel.shape) == (4, 5)
    assert kernel.sum() == pytest.approx(1.0, rel=1e-6)
    # the grid is x = -5..4 (columns), y = 4..-5 (rows): column 0 (x = -5) and row 9 (y = -5)
    # have no mirror image, so the kernel is not symmetric about its middle
    np.testing.assert_allclose(kernel[:, 1:], kernel[:, 1:][:, ::-1], rtol=1e-6)
    assert not np.allclose(kernel, kernel[:, ::-1])


@pytest.mark.parametrize("kernel_key,blurred_key", [("kernel_default", "blurred_default"), ("kernel_5_2", "blurred_5_2")])
def test_blur_matches_reference(blur_fixture, kernel_key, blurred_key):
    heatmap = torch.from_numpy(blur_fixture["heatmap"][:, :, 0])
    kernel = torch.from_numpy(blur_fixture[kernel_key])  # the reference (kh, kw, 1, 1) layout
    blurred = gaussian_blur(heatmap, kernel)
    assert blurred.shape == heatmap.shape and blurred.dtype == torch.float32
    np.testing.assert_allclose(blurred.numpy(), blur_fixture[blurred_key][:, :, 0], rtol=RTOL, atol=0)


def test_blur_batch_equals_scipy_cross_correlation():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 17, 12))
    kernel = gaussian_kernel(10, 3).double()
    blurred = gaussian_blur(torch.from_numpy(maps), kernel)
    assert blurred.dtype == torch.float64
    for single, out in zip(maps, blurred.numpy()):
        padded = np.pad(single, ((4, 5), (4, 5)))  # TF 'SAME' at stride 1: 4 before, 5 after
        expected = scipy.signal.correlate2d(padded, kernel.numpy(), mode="valid")
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)


def test_impulse_moves_towards_lower_columns():
    impulse = torch.zeros(32, 32)
    impulse[15, 15] = 1.0
    blurred = gaussian_blur(impulse, gaussian_kernel())
    assert np.unravel_index(int(blurred.argmax()), (32, 32)) == (15, 14)


def test_blur_rejects_bad_input():
    with pytest.raises(ValueError, match=r"heatmap.*\(2, 3, 4, 5\)"):
        gaussian_blur(torch.zeros(2, 3, 4, 5), gaussian_kernel())
    with pytest.raises(ValueError, match="kernel"):
        gaussian_blur(torch.zeros(8, 8), torch.zeros(3, 3, 2, 1))
    with pytest.raises(TypeError, match="heatmap"):
        gaussian_blur(np.zeros((8, 8)), gaussian_kernel())
    with pytest.raises(ValueError, match="size"):
        gaussian_kernel(0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_kernel(5, -1.0)
