"""The multi-block paths (per-block partial moments combined per map), as the GPU runs them.

The interpreter normally covers a whole map with one block; here the block is forced small
so that every map spans many programs and the partial sums are combined.
"""
import pytest
import torch

import harmonizer_fast.ops._launch as launch
from _ops_helpers import assert_matches, make_input, randn
from harmonizer_fast.ops.alignment_loss import alignment_loss, harmonization_term
from harmonizer_fast.ops.pyramid import pyramid
from harmonizer_fast.ops.saliency_cut import saliency_cut
from harmonizer_fast.training import loss as reference
from harmonizer_fast.training.pyramid import pyramidal_representation


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(launch, "INTERPRETER_BLOCK", 64)
    monkeypatch.setattr(launch, "GPU_BLOCK", 64)
    assert launch.block_size(17 * 23) == 64


def test_saliency_cut_many_blocks_per_map():
    x = make_input((2, 3, 17, 23), seed=21)
    expected = reference.saliency_standardize_cut(x, backend="torch")
    got, got_max = saliency_cut(x)
    upstream = randn(expected.shape, 22)
    (grad_expected,) = torch.autograd.grad((expected * upstream).sum(), x)
    (grad_got,) = torch.autograd.grad((got * upstream).sum(), x)
    assert_matches(got, expected)
    assert_matches(got_max, expected.amax(dim=(1, 2)))
    assert_matches(grad_got, grad_expected)


def test_shifted_moments_do_not_cancel_on_a_large_offset():
    """Maps at 40 +- 1: raw moments (E[x^2] - E[x]^2 in float32) would lose ~3 digits of the
    variance; the shifted partial moments stay within float32 rounding of a float64 run."""
    x = (make_input((2, 3, 17, 23), seed=25, requires_grad=False) + 40.0).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    expected = reference.saliency_standardize_cut(x64, backend="torch")
    got, _ = saliency_cut(x)
    upstream = randn(expected.shape, 26)
    (grad_expected,) = torch.autograd.grad((expected * upstream.double()).sum(), x64)
    (grad_got,) = torch.autograd.grad((got * upstream).sum(), x)
    # The inputs themselves carry float32 rounding of ~40 * 2**-24 = 2.4e-6 per value.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_got.double(), grad_expected, rtol=1e-5, atol=1e-5 * float(grad_expected.abs().max()))


def test_alignment_loss_and_pyramid_many_blocks():
    saliency = make_input((3, 17, 23), seed=23, requires_grad=False).relu().requires_grad_(True)
    human = make_input((3, 17, 23), seed=24, requires_grad=False).abs()
    tokens = torch.tensor([1.0, 0.3, 0.0], device=saliency.device)
    expected = reference.alignment_loss(saliency, human, tokens, backend="torch")
    got = alignment_loss(saliency, human, tokens)
    (grad_expected,) = torch.autograd.grad(expected, saliency)
    (grad_got,) = torch.autograd.grad(got, saliency)
    assert_matches(got, expected)
    assert_matches(grad_got, grad_expected)
    for a, b in zip(pyramid(human, 5), pyramidal_representation(human, 5, backend="torch")):
        assert_matches(a, b)


def test_harmonization_term_many_blocks():
    gradient = make_input((2, 3, 17, 23), seed=29)
    human = make_input((2, 17, 23), seed=30, requires_grad=False).abs()
    tokens = torch.tensor([1.0, 0.6], device=gradient.device)
    expected = reference.alignment_loss(
        reference.saliency_standardize_cut(gradient, backend="torch"), human, tokens, backend="torch")
    got = harmonization_term(gradient, human, tokens)
    (grad_expected,) = torch.autograd.grad(expected, gradient)
    (grad_got,) = torch.autograd.grad(got, gradient)
    assert_matches(got, expected)
    assert_matches(grad_got, grad_expected)
