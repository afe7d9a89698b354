"""Fused pyramid (ops.pyramid) against the pure-torch pyramidal_representation and the TF fixture."""
import numpy as np
import pytest
import torch

from _ops_helpers import DEVICE, assert_matches, make_input, randn
from harmonizer_fast.ops.pyramid import downsample, downsample_adjoint, pyramid
from harmonizer_fast.training.pyramid import pyramidal_representation

SHAPES = [(2, 224, 224), (2, 37, 53), (5, 7, 7), (1, 1, 1), (2, 3, 37, 53), (5, 1, 1, 1)]


def _levels_and_gradients(x: torch.Tensor, num_levels: int, seed: int = 1):
    reference = pyramidal_representation(x, num_levels, backend="torch")
    fused = pyramid(x, num_levels)
    weights = [randn(level.shape, seed + i) for i, level in enumerate(reference)]
    (grad_reference,) = torch.autograd.grad(sum((w * lv.float()).sum() for w, lv in zip(weights, reference)), x)
    (grad_fused,) = torch.autograd.grad(sum((w * lv.float()).sum() for w, lv in zip(weights, fused)), x)
    return reference, fused, grad_reference, grad_fused


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_levels_and_gradient_match_reference(shape):
    x = make_input(shape, seed=sum(shape))
    reference, fused, grad_reference, grad_fused = _levels_and_gradients(x, 5)
    assert len(fused) == 6
    for level, (a, b) in enumerate(zip(fused, reference)):
        assert a.dtype == b.dtype
        assert_matches(a, b, what=f"level {level}")
    assert_matches(grad_fused, grad_reference, what="input gradient")


@pytest.mark.parametrize("prefix", ["s224_", "s37x53_", "s7_"])
def test_matches_tensorflow_fixture(prefix, fixtures_dir):
    data = np.load(fixtures_dir / "pyramid.npz")
    image = torch.from_numpy(data[f"{prefix}input"]).permute(0, 3, 1, 2).to(DEVICE)  # NHWC -> NCHW
    for level, got in enumerate(pyramid(image, 5)):
        expected = torch.from_numpy(data[f"{prefix}level{level}"]).permute(0, 3, 1, 2).to(DEVICE)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_adjoint_is_the_transpose():
    """<D x, y> == <x, D^T y> for the kernels themselves, on even, odd and unit sides."""
    for shape in [(3, 37, 53), (2, 16, 9), (1, 1, 1)]:
        x = make_input(shape, seed=11, requires_grad=False)
        down, _ = downsample(x)
        y = randn(down.shape, 12)
        lhs = (down.double() * y.double()).sum()
        rhs = (x.double() * downsample_adjoint(y, shape).double()).sum()
        assert abs(float(lhs - rhs)) <= 1e-5 * max(1.0, abs(float(lhs)))


def test_non_contiguous_input():
    x = make_input((2, 37, 53), seed=13, contiguous=False)
    reference, fused, grad_reference, grad_fused = _levels_and_gradients(x, 5)
    for a, b in zip(fused, reference):
        assert_matches(a, b)
    assert_matches(grad_fused, grad_reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x = make_input((2, 37, 53), dtype=dtype, seed=14)
    reference, fused, grad_reference, grad_fused = _levels_and_gradients(x, 5)
    for a, b in zip(fused, reference):
        assert a.dtype == dtype
        assert_matches(a, b, dtype=dtype)
    assert grad_fused.dtype == dtype
    assert_matches(grad_fused, grad_reference, dtype=dtype)


def test_unused_levels_and_zero_levels():
    x = make_input((2, 19, 11), seed=15)
    fused = pyramid(x, 3)
    reference = pyramidal_representation(x, 3, backend="torch")
    (grad_fused,) = torch.autograd.grad(fused[2].sum(), x)
    (grad_reference,) = torch.autograd.grad(reference[2].sum(), x)
    assert_matches(grad_fused, grad_reference)
    only = pyramid(x, 0)
    assert len(only) == 1 and only[0] is x


def test_backend_dispatch_and_second_derivative_raises():
    x = make_input((2, 9, 9), seed=16)
    levels = pyramidal_representation(x, 2, backend="triton")
    assert_matches(levels[2], pyramidal_representation(x, 2, backend="torch")[2])
    (grad,) = torch.autograd.grad(levels[2].square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(grad.sum(), x)
