"""Gaussian pyramid with TensorFlow 'SAME' padding against the TensorFlow fixture and scipy."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from _loss_testing import assert_matches
from harmonizer_fast.training import pyramidal_representation
from harmonizer_fast.training.pyramid import pyramid_level_shapes, same_padding

CASES = {"s224_": (224, 224), "s37x53_": (37, 53), "s7_": (7, 7)}


def scipy_downsample(image: np.ndarray) -> np.ndarray:
    """One level, independently: full-resolution zero-padded correlation, then subsampling.

    A 5-tap 'SAME' window at output i starts at input 2i - before, so it is centred at
    2i - before + 2, with before = floor(total / 2) of TF's padding: 2i + 1 for an even
    side (pads 1, 2), 2i for an odd one (pads 2, 2).
    """
    b = np.array([1.0, 4.0, 6.0, 4.0, 1.0])
    full = ndimage.correlate(image.astype(np.float64), np.outer(b, b) / 256.0, mode="constant", cval=0.0)
    centres = [np.arange(-(-n // 2)) * 2 + (1 if n % 2 == 0 else 0) for n in image.shape]
    return full[np.ix_(*centres)]


@pytest.mark.parametrize("prefix", sorted(CASES))
def test_matches_tensorflow(fixtures_dir, prefix):
    data = np.load(fixtures_dir / "pyramid.npz")
    image = torch.from_numpy(data[f"{prefix}input"]).permute(0, 3, 1, 2)  # NHWC -> NCHW
    levels = pyramidal_representation(image, 5)
    assert len(levels) == 6
    for i, level in enumerate(levels):
        expected = data[f"{prefix}level{i}"].transpose(0, 3, 1, 2)
        assert level.dtype == torch.float32
        assert_matches(level, expected, what=f"{prefix}level{i}")
    # (N, H, W) input gives the same maps without the channel axis.
    for level, level3 in zip(levels, pyramidal_representation(image[:, 0], 5)):
        assert level3.shape == level.shape[:1] + level.shape[2:]
        torch.testing.assert_close(level3, level[:, 0], rtol=0, atol=0)


def test_level_shapes():
    assert pyramid_level_shapes(224, 224, 5) == [(224, 224), (112, 112), (56, 56), (28, 28), (14, 14), (7, 7)]
    assert pyramid_level_shapes(37, 53, 5) == [(37, 53), (19, 27), (10, 14), (5, 7), (3, 4), (2, 2)]
    image = torch.rand(2, 37, 53)
    assert [tuple(m.shape[-2:]) for m in pyramidal_representation(image, 5)] == pyramid_level_shapes(37, 53, 5)


@pytest.mark.parametrize("size, expected", [(224, (1, 2)), (14, (1, 2)), (7, (2, 2)), (1, (2, 2)), (2, (1, 2))])
def test_same_padding_of_the_5x5_stride_2_kernel(size, expected):
    assert same_padding(size) == expected


@pytest.mark.parametrize("size, expected", [(32, (0, 1)), (33, (1, 1))])
def test_same_padding_of_a_3x3_stride_2_kernel(size, expected):
    assert same_padding(size, kernel_size=3, stride=2) == expected


@pytest.mark.parametrize("shape", [(1, 7, 7), (2, 37, 53), (1, 1, 1), (1, 2, 5), (1, 16, 9)])
def test_matches_scipy_on_odd_and_tiny_sizes(shape):
    image = np.random.RandomState(3).uniform(0, 1, shape)
    levels = pyramidal_representation(torch.from_numpy(image), 4)
    expected = image
    for level in levels[1:]:
        expected = np.stack([scipy_downsample(m) for m in expected])
        np.testing.assert_allclose(level.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_symmetric_padding_would_be_shifted():
    # The TF rule pads (1, 2) on an even side; PyTorch's padding=2 gives the same size, other values.
    image = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
    kernel = (torch.outer(kernel, kernel) / 256).view(1, 1, 5, 5)
    symmetric = torch.nn.functional.conv2d(image, kernel, stride=2, padding=2)
    level1 = pyramidal_representation(image, 1)[1]
    assert level1.shape == symmetric.shape
    assert (level1 - symmetric).abs().max() > 1e-3


def test_channels_are_filtered_independently():
    image = torch.rand(2, 3, 20, 13)
    levels = pyramidal_representation(image, 3)
    for c in range(3):
        for level, single in zip(levels, pyramidal_representation(image[:, c : c + 1], 3)):
            torch.testing.assert_close(level[:, c : c + 1], single, rtol=0, atol=0)


def test_zero_levels_returns_the_input():
    image = torch.rand(2, 5, 5)
    (level0,) = pyramidal_representation(image, 0)
    assert level0 is image


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    image = torch.rand(2, 30, 22).to(dtype)
    for level, reference in zip(pyramidal_representation(image, 5), pyramidal_representation(image.float(), 5)):
        assert level.dtype == dtype
        torch.testing.assert_close(level, reference.to(dtype), rtol=0, atol=0)


def test_float64_and_non_contiguous():
    image = torch.rand(2, 24, 30, dtype=torch.float64).transpose(1, 2)
    assert not image.is_contiguous()
    for level, reference in zip(pyramidal_representation(image, 5), pyramidal_representation(image.contiguous(), 5)):
        assert level.dtype == torch.float64
        torch.testing.assert_close(level, reference, rtol=1e-14, atol=1e-15)


def test_gradients_flow_to_the_input():
    image = torch.rand(1, 9, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: pyramidal_representation(x, 3)[-1], (image,))


def test_bad_inputs():
    with pytest.raises(TypeError, match="image"):
        pyramidal_representation(np.zeros((1, 8, 8)), 2)
    with pytest.raises(ValueError, match=r"image.*\(8, 8\)"):
        pyramidal_representation(torch.zeros(8, 8), 2)
    with pytest.raises(ValueError, match=r"image.*\(1, 1, 1, 8, 8\)"):
        pyramidal_representation(torch.zeros(1, 1, 1, 8, 8), 2)
    with pytest.raises(ValueError, match="num_levels"):
        pyramidal_representation(torch.zeros(1, 8, 8), -1)
    with pytest.raises(ValueError, match="num_levels"):
        pyramidal_representation(torch.zeros(1, 8, 8), 2.0)
