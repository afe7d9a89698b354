"""Fused alignment loss and pyramidal MSE (ops.alignment_loss) against the pure-torch reference."""
import numpy as np
import pytest
import torch

from _ops_helpers import DEVICE, assert_matches, generator, make_input
from harmonizer_fast.ops.alignment_loss import alignment_loss, harmonization_term, pyramidal_mse_with_tokens
from harmonizer_fast.ops.saliency_cut import saliency_cut
from harmonizer_fast.training import loss as reference

TOKENS = {
    "zero": lambda n: torch.zeros(n, device=DEVICE),
    "fractional": lambda n: torch.rand(n, generator=generator(n)).to(DEVICE),
    "one": lambda n: torch.ones(n, device=DEVICE),
}


def _saliency(shape, seed, dtype=torch.float32, contiguous=True):
    """A standardized-cut-like saliency: rectified normal values (many exact zeros)."""
    return make_input(shape, dtype=dtype, seed=seed, contiguous=contiguous, requires_grad=False).relu().requires_grad_(True)


def _human(shape, seed, contiguous=True):
    return make_input(shape, seed=seed, contiguous=contiguous, requires_grad=False).abs()


def _check_alignment(saliency, human, tokens, nb_levels=5, dtype=torch.float32):
    expected = reference.alignment_loss(saliency, human, tokens, nb_levels, backend="torch")
    got = alignment_loss(saliency, human, tokens, nb_levels)
    assert got.dtype == torch.float32 and got.ndim == 0
    (grad_expected,) = torch.autograd.grad(expected, saliency)
    (grad_got,) = torch.autograd.grad(got, saliency)
    assert_matches(got, expected, what="loss")
    assert grad_got.dtype == saliency.dtype
    assert_matches(grad_got, grad_expected, dtype=dtype, what="saliency gradient")
    return got


@pytest.mark.parametrize("tokens", sorted(TOKENS))
@pytest.mark.parametrize("shape", [(5, 37, 53), (1, 7, 7), (5, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_alignment_loss_matches_reference(shape, tokens):
    got = _check_alignment(_saliency(shape, 1), _human(shape, 2), TOKENS[tokens](shape[0]))
    if tokens == "zero":
        assert got.item() == 0.0


def test_alignment_loss_matches_reference_224():
    _check_alignment(_saliency((2, 224, 224), 1), _human((2, 224, 224), 2), TOKENS["fractional"](2))


@pytest.mark.parametrize("nb_levels", [1, 3, 6])
def test_alignment_loss_levels(nb_levels):
    _check_alignment(_saliency((3, 37, 53), 3), _human((3, 37, 53), 4), TOKENS["fractional"](3), nb_levels)


def test_alignment_loss_constant_human_map_and_non_contiguous():
    human = _human((3, 37, 53), 5, contiguous=False).clone()
    human[1] = 0.25  # standardize-cut gives exactly 0 there
    saliency = _saliency((3, 37, 53), 6, contiguous=False)
    assert not saliency.is_contiguous()
    _check_alignment(saliency, human.transpose(-1, -2).contiguous().transpose(-1, -2), TOKENS["fractional"](3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_alignment_loss_half_precision(dtype):
    _check_alignment(_saliency((3, 37, 53), 7, dtype=dtype), _human((3, 37, 53), 8), TOKENS["fractional"](3), dtype=dtype)


def test_saliency_max_passed_equals_computed():
    saliency = _saliency((3, 37, 53), 9)
    human, tokens = _human((3, 37, 53), 10), TOKENS["one"](3)
    passed = alignment_loss(saliency, human, tokens, saliency_max=saliency.detach().amax(dim=(1, 2)))
    assert_matches(passed, alignment_loss(saliency, human, tokens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_harmonization_term_matches_reference_composition(dtype):
    """The one-op saliency cut + alignment loss, with a non-unit upstream (the scale read on the device)."""
    gradient = make_input((3, 3, 37, 53), dtype=dtype, seed=11)
    human, tokens = _human((3, 37, 53), 12), TOKENS["fractional"](3)
    expected = reference.alignment_loss(reference.saliency_standardize_cut(gradient, backend="torch"), human, tokens, backend="torch")
    got = harmonization_term(gradient, human, tokens)
    (grad_expected,) = torch.autograd.grad(3.5 * expected, gradient)
    (grad_got,) = torch.autograd.grad(3.5 * got, gradient)
    assert_matches(got, expected)
    assert grad_got.dtype == dtype
    assert_matches(grad_got, grad_expected, dtype=dtype)
    assert_matches(got, alignment_loss(saliency_cut(gradient)[0], human, tokens), what="two-op composition")


def test_harmonization_term_zero_tokens_second_derivative_and_bad_input():
    gradient = make_input((2, 3, 9, 9), seed=27)
    human = _human((2, 9, 9), 28)
    assert harmonization_term(gradient, human, TOKENS["zero"](2)).item() == 0.0
    (grad,) = torch.autograd.grad(harmonization_term(gradient, human, TOKENS["one"](2)), gradient, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(grad.square().sum(), gradient)
    with pytest.raises(ValueError, match="true_heatmaps"):
        harmonization_term(gradient, human[:, :8], TOKENS["one"](2))


@pytest.mark.parametrize("tokens", sorted(TOKENS))
def test_pyramidal_mse_matches_reference(tokens):
    true = make_input((5, 37, 53), seed=13)
    pred = make_input((5, 37, 53), seed=14, contiguous=False)
    weights = TOKENS[tokens](5)
    expected = reference.pyramidal_mse_with_tokens(true, pred, weights, backend="torch")
    got = pyramidal_mse_with_tokens(true, pred, weights)
    grads_expected = torch.autograd.grad(expected, (true, pred))
    grads_got = torch.autograd.grad(got, (true, pred))
    assert_matches(got, expected)
    for a, b in zip(grads_got, grads_expected):
        assert_matches(a, b)


@pytest.mark.parametrize("case", ["a", "b", "c", "d"])
def test_pyramidal_mse_matches_tensorflow_fixture(case, fixtures_dir):
    data = np.load(fixtures_dir / "pyramidal_mse.npz")
    size = "37x53" if case == "d" else "224"
    true, pred, tokens = (torch.from_numpy(data[k]).to(DEVICE) for k in (f"true_{size}", f"pred_{size}", f"tokens_{case}"))
    got = reference.pyramidal_mse_with_tokens(true, pred, tokens, backend="triton")
    torch.testing.assert_close(got.cpu(), torch.from_numpy(data[f"loss_{case}"]), rtol=1e-5, atol=1e-7)


def test_backend_triton_dispatch_and_unsupported_gradients():
    saliency, tokens = _saliency((2, 7, 7), 15), TOKENS["one"](2)
    human = _human((2, 7, 7), 16).requires_grad_(True)
    # The fused op gives no gradient to the human map: "triton" says so, "torch" serves it.
    with pytest.raises(ValueError, match="true_heatmaps"):
        reference.alignment_loss(saliency, human, tokens, backend="triton")
    expected = reference.alignment_loss(saliency, human.detach(), tokens, backend="torch")
    assert_matches(reference.alignment_loss(saliency, human.detach(), tokens, backend="triton"), expected)


@pytest.mark.parametrize("which", ["alignment", "pyramidal_mse"])
def test_second_derivative_raises(which):
    saliency, human, tokens = _saliency((2, 9, 9), 17), _human((2, 9, 9), 18), TOKENS["one"](2)
    if which == "alignment":
        loss = alignment_loss(saliency, human, tokens)
    else:
        loss = pyramidal_mse_with_tokens(saliency, human, tokens)
    (grad,) = torch.autograd.grad(loss, saliency, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(grad.square().sum(), saliency)


def test_bad_input_raises():
    saliency, human = _saliency((2, 7, 7), 19), _human((2, 7, 7), 20)
    with pytest.raises(ValueError, match="tokens"):
        alignment_loss(saliency, human, torch.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        alignment_loss(saliency, human[:, :5], torch.ones(2))
    with pytest.raises(ValueError, match="nb_levels"):
        alignment_loss(saliency, human, torch.ones(2), nb_levels=0)
    with pytest.raises(ValueError, match="saliency_max"):
        alignment_loss(saliency, human, torch.ones(2), saliency_max=torch.ones(3))
