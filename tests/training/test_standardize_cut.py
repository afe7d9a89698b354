"""standardize_cut against the TensorFlow fixture, numpy, and its edge cases."""
import numpy as np
import pytest
import torch

from _loss_testing import assert_matches
from harmonizer_fast.training import saliency_standardize_cut, standardize_cut


def numpy_standardize_cut(x: np.ndarray, epsilon: float = 1e-5) -> np.ndarray:
    """relu((x - mean) / (population std + epsilon)) over the two spatial axes, float64."""
    x = x.astype(np.float64)
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)  # ddof=0: the population std
    return np.maximum((x - mean) / (std + epsilon), 0.0)


@pytest.mark.parametrize("case", ["uniform", "normal", "const"])
def test_matches_tensorflow(fixtures_dir, case):
    data = np.load(fixtures_dir / "standardize_cut.npz")
    out = standardize_cut(torch.from_numpy(data[f"input_{case}"]))
    assert out.dtype == torch.float32
    assert_matches(out, data[f"output_{case}"], what=case)
    # The rectified zeros are exact zeros in both.
    np.testing.assert_array_equal(out.numpy() == 0, data[f"output_{case}"] == 0)


def test_constant_map_is_exactly_zero_with_zero_gradient(fixtures_dir):
    x = torch.from_numpy(np.load(fixtures_dir / "standardize_cut.npz")["input_const"]).requires_grad_(True)
    out = standardize_cut(x)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[0], torch.zeros_like(x.grad[0]))
    assert x.grad[1].abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 37, 53), (1, 7, 7), (3, 1, 9), (1, 224, 224)])
def test_odd_sizes_and_batch_of_one_match_numpy(shape):
    x = torch.from_numpy(np.random.RandomState(0).normal(0.5, 3.0, shape).astype(np.float32))
    assert_matches(standardize_cut(x), numpy_standardize_cut(x.numpy()))


def test_one_by_one_maps_are_zero():
    x = torch.randn(4, 1, 1, requires_grad=True)
    out = standardize_cut(x)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_epsilon_is_added_to_the_std():
    x = np.random.RandomState(1).uniform(0, 1e-4, (2, 8, 8)).astype(np.float64)
    out = standardize_cut(torch.from_numpy(x), epsilon=1e-3)
    assert_matches(out, numpy_standardize_cut(x, epsilon=1e-3))


def test_other_axes():
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    moved = standardize_cut(x.permute(2, 0, 1).contiguous()).permute(1, 2, 0)
    assert_matches(standardize_cut(x, axes=(0, 1)), moved)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    x = torch.randn(3, 17, 23).to(dtype)
    out = standardize_cut(x)
    assert out.dtype == dtype
    # Same input values in float32: the only difference is the final rounding to `dtype`.
    expected = standardize_cut(x.float())
    torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0)


def test_float64():
    x = torch.from_numpy(np.random.RandomState(2).normal(size=(2, 11, 13)))
    out = standardize_cut(x)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), numpy_standardize_cut(x.numpy()), rtol=1e-12, atol=1e-13)


def test_non_contiguous_input():
    base = torch.randn(3, 20, 16)
    x = base.transpose(1, 2)  # (3, 16, 20), not contiguous
    assert not x.is_contiguous()
    # Equal up to the summation order of the mean.
    assert_matches(standardize_cut(x), standardize_cut(x.contiguous()))


def test_gradcheck_float64():
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(standardize_cut, (x,))


def test_saliency_standardize_cut_keeps_the_sign_of_the_channel_mean():
    gradient = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    expected = numpy_standardize_cut(gradient.numpy().mean(axis=1))
    np.testing.assert_allclose(saliency_standardize_cut(gradient).numpy(), expected, rtol=1e-12, atol=1e-13)
    # An absolute value would make the map of -g equal to that of g.
    assert not torch.allclose(saliency_standardize_cut(-gradient), saliency_standardize_cut(gradient))


def test_saliency_standardize_cut_gradcheck():
    gradient = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(saliency_standardize_cut, (gradient,))


def test_bad_inputs():
    with pytest.raises(TypeError, match="heatmaps"):
        standardize_cut(np.zeros((2, 4, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="heatmaps.*int64"):
        standardize_cut(torch.zeros(2, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"heatmaps.*\(4, 4\)"):
        standardize_cut(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"input_gradient.*rank 4.*\(2, 4, 4\)"):
        saliency_standardize_cut(torch.zeros(2, 4, 4))
