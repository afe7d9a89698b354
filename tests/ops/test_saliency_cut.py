"""Fused saliency cut (ops.saliency_cut) against the pure-torch saliency_standardize_cut."""
import pytest
import torch

from _ops_helpers import assert_matches, make_input, randn
from harmonizer_fast.ops.saliency_cut import saliency_cut
from harmonizer_fast.training.loss import saliency_standardize_cut

SHAPES = [(2, 3, 224, 224), (5, 3, 37, 53), (1, 1, 37, 53), (5, 3, 7, 7), (1, 3, 1, 1), (5, 1, 1, 1)]


def _reference_and_fused(x: torch.Tensor, seed: int = 1):
    """Forward values, per-map maxima and input gradients (for a random upstream) of both paths."""
    reference = saliency_standardize_cut(x, backend="torch")
    fused, fused_max = saliency_cut(x)
    upstream = randn(reference.shape, seed)
    (grad_reference,) = torch.autograd.grad((reference * upstream).sum(), x)
    (grad_fused,) = torch.autograd.grad((fused * upstream).sum(), x)
    return reference, fused, fused_max, grad_reference, grad_fused


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_max_and_gradient_match_reference(shape):
    x = make_input(shape, seed=sum(shape))
    reference, fused, fused_max, grad_reference, grad_fused = _reference_and_fused(x)
    assert fused.dtype == torch.float32
    assert_matches(fused, reference, what="saliency")
    assert_matches(fused_max, reference.amax(dim=(1, 2)), what="maximum")
    assert_matches(grad_fused, grad_reference, what="input gradient")


def test_non_contiguous_input():
    base = make_input((3, 37, 53, 3), seed=3, requires_grad=False)
    x = base.permute(0, 3, 1, 2).requires_grad_(True)  # channels-last storage, NCHW view
    assert not x.is_contiguous()
    reference, fused, _, grad_reference, grad_fused = _reference_and_fused(x)
    assert_matches(fused, reference, what="saliency")
    assert_matches(grad_fused, grad_reference, what="input gradient")
    sliced = make_input((2, 3, 40, 60), seed=4, requires_grad=False)[:, :, 1:38, 2:55].requires_grad_(True)
    reference, fused, _, grad_reference, grad_fused = _reference_and_fused(sliced)
    assert_matches(fused, reference, what="sliced saliency")
    assert_matches(grad_fused, grad_reference, what="sliced input gradient")


def test_constant_map_gives_zero_output_and_gradient():
    x = make_input((3, 3, 16, 16), seed=5, requires_grad=False).clone()
    x[1] = 0.25  # exactly representable: every mean is exact, std exactly 0
    x[2] = 0.0
    x.requires_grad_(True)
    reference, fused, fused_max, grad_reference, grad_fused = _reference_and_fused(x)
    assert torch.equal(fused[1:], torch.zeros_like(fused[1:]))
    assert torch.equal(fused_max[1:], torch.zeros_like(fused_max[1:]))
    assert torch.equal(grad_fused[1:], torch.zeros_like(grad_fused[1:]))
    assert_matches(fused, reference, what="saliency")
    assert_matches(grad_fused, grad_reference, what="input gradient")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x = make_input((2, 3, 37, 53), dtype=dtype, seed=6)
    reference, fused, fused_max, grad_reference, grad_fused = _reference_and_fused(x)
    # Both paths compute in float32 from the same half-precision values.
    assert fused.dtype == torch.float32
    assert_matches(fused, reference, what="saliency")
    assert_matches(fused_max, reference.amax(dim=(1, 2)), what="maximum")
    assert grad_fused.dtype == dtype
    assert_matches(grad_fused, grad_reference, dtype=dtype, what="input gradient")


def test_backend_triton_dispatch_and_maximum_is_not_differentiable():
    x = make_input((2, 3, 7, 7), seed=7)
    assert_matches(saliency_standardize_cut(x, backend="triton"), saliency_standardize_cut(x, backend="torch"))
    _, fused_max = saliency_cut(x)
    assert not fused_max.requires_grad


@pytest.mark.parametrize("upstream", ["constant", "differentiable"])
def test_second_derivative_raises(upstream):
    x = make_input((2, 3, 7, 7), seed=8)
    fused, _ = saliency_cut(x)
    weights = randn(fused.shape, 9)
    outer = (fused * weights).sum() if upstream == "constant" else (fused.square() * weights).sum()
    (grad,) = torch.autograd.grad(outer, x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(grad.square().sum(), x)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="input_gradient"):
        saliency_cut(torch.zeros(2, 7, 7))
    with pytest.raises(TypeError, match="input_gradient"):
        saliency_cut(torch.zeros(2, 3, 7, 7, dtype=torch.int32))
