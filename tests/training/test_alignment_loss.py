"""alignment_loss (steps 3-5 of the harmonizer loss): the human map rescaled to the saliency,
the stopped gradient of the saliency maximum, gradcheck, constant maps, half precision."""
import pytest
import torch

from _loss_testing import assert_matches
from _reference_net import reference  # noqa: F401  (a pytest fixture, used by name)
from harmonizer_fast.training import (
    alignment_loss,
    pyramidal_mse_with_tokens,
    saliency_standardize_cut,
    standardize_cut,
)


def test_alignment_loss_rescales_the_human_map_to_the_saliency(reference):
    saliency = torch.from_numpy(reference["sa_maps_preprocess"])
    true_heatmaps, tokens = torch.from_numpy(reference["true_heatmaps"]), torch.from_numpy(reference["tokens"])
    human = standardize_cut(true_heatmaps.double())
    peak = human.amax(dim=(1, 2), keepdim=True)
    rescaled = human / (peak + 1e-6) * (saliency.double().amax(dim=(1, 2), keepdim=True) + 1e-6)
    assert_matches(rescaled, reference["heatmaps_preprocess"], what="heatmaps_preprocess")
    assert_matches(alignment_loss(saliency, true_heatmaps, tokens),
                   pyramidal_mse_with_tokens(saliency.double(), rescaled, tokens))


def test_alignment_loss_stops_the_gradient_of_the_saliency_maximum():
    saliency = standardize_cut(torch.randn(2, 12, 11, dtype=torch.float64)).requires_grad_(True)
    true_heatmaps, tokens = torch.rand(2, 12, 11, dtype=torch.float64), torch.tensor([1.0, 0.7], dtype=torch.float64)
    alignment_loss(saliency, true_heatmaps, tokens).backward()
    # Same loss with the rescaled human map built from a detached copy: a plain MSE gradient.
    fixed = saliency.detach().clone().requires_grad_(True)
    human = standardize_cut(true_heatmaps)
    human = human / (human.amax(dim=(1, 2), keepdim=True) + 1e-6) * (fixed.detach().amax(dim=(1, 2), keepdim=True) + 1e-6)
    pyramidal_mse_with_tokens(fixed, human, tokens).backward()
    torch.testing.assert_close(saliency.grad, fixed.grad, rtol=1e-12, atol=1e-15)


def test_alignment_loss_gradcheck_in_the_human_maps():
    saliency = standardize_cut(torch.randn(2, 7, 6, dtype=torch.float64))
    true_heatmaps = torch.rand(2, 7, 6, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, t: alignment_loss(saliency, h, t, nb_levels=3), (true_heatmaps, tokens))


def test_alignment_loss_constant_maps_are_finite():
    saliency = torch.zeros(2, 10, 10, requires_grad=True)  # standardize_cut of a constant map
    # 0.25 sums exactly, so its std is exactly 0 (as in the TF fixture's constant map).
    true_heatmaps = torch.full((2, 10, 10), 0.25, requires_grad=True)
    loss = alignment_loss(saliency, true_heatmaps, torch.ones(2))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(saliency.grad).all() and torch.isfinite(true_heatmaps.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_alignment_loss_half_precision_is_computed_in_float32(reference, dtype):
    gradient = torch.randn(4, 3, 32, 32).to(dtype)
    true_heatmaps, tokens = torch.from_numpy(reference["true_heatmaps"]).to(dtype), torch.from_numpy(reference["tokens"])
    loss = alignment_loss(saliency_standardize_cut(gradient), true_heatmaps, tokens)
    assert loss.dtype == torch.float32
    expected = alignment_loss(saliency_standardize_cut(gradient.float()), true_heatmaps.float(), tokens)
    assert_matches(loss, expected)
