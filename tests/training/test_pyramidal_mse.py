"""pyramidal_mse_with_tokens against the TensorFlow fixture and a level-by-level recomputation."""
import numpy as np
import pytest
import torch

from _loss_testing import assert_matches
from harmonizer_fast.training import pyramidal_mse_with_tokens, pyramidal_representation

CASES = {"a": "224", "b": "224", "c": "224", "d": "37x53"}


def per_level_mse(true, pred, tokens, num_levels):
    """The reference's own route: two separate pyramids, token-weighted mean at each level."""
    weights = tokens.view(-1, 1, 1)
    return torch.stack([
        ((a - b).square() * weights).mean()
        for a, b in zip(pyramidal_representation(true, num_levels), pyramidal_representation(pred, num_levels))
    ])


def fixture_inputs(data, case):
    size = CASES[case]
    return (torch.from_numpy(data[f"true_{size}"]), torch.from_numpy(data[f"pred_{size}"]),
            torch.from_numpy(data[f"tokens_{case}"]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_tensorflow(fixtures_dir, case):
    data = np.load(fixtures_dir / "pyramidal_mse.npz")
    loss = pyramidal_mse_with_tokens(*fixture_inputs(data, case))
    assert loss.shape == () and loss.dtype == torch.float32
    assert_matches(loss, data[f"loss_{case}"], what=f"loss_{case}")


def test_per_level_values_and_nb_levels(fixtures_dir):
    data = np.load(fixtures_dir / "pyramidal_mse.npz")
    true, pred, tokens = fixture_inputs(data, "a")
    assert_matches(per_level_mse(true, pred, tokens, 5), data["per_level_mse_a"])
    # The default averages levels 0..4 only; nb_levels=6 also averages the coarsest level.
    for nb_levels in (1, 3, 6):
        expected = data["per_level_mse_a"][:nb_levels].astype(np.float64).mean()
        assert_matches(pyramidal_mse_with_tokens(true, pred, tokens, nb_levels=nb_levels), expected)


def test_all_zero_tokens_give_exactly_zero_and_zero_gradient(fixtures_dir):
    data = np.load(fixtures_dir / "pyramidal_mse.npz")
    true, pred, tokens = fixture_inputs(data, "c")
    pred = pred.clone().requires_grad_(True)
    loss = pyramidal_mse_with_tokens(true, pred, tokens)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred.grad))


def test_token_zero_maps_do_not_matter():
    true, pred = torch.rand(3, 12, 10), torch.rand(3, 12, 10)
    tokens = torch.tensor([1.0, 0.0, 1.0])
    changed = pred.clone()
    changed[1] = 100.0
    assert pyramidal_mse_with_tokens(true, pred, tokens) == pyramidal_mse_with_tokens(true, changed, tokens)
    # Divided by N = 3 (all maps), not by the token sum 2.
    assert_matches(pyramidal_mse_with_tokens(true, pred, tokens),
                   per_level_mse(true, pred, tokens, 4).mean())


@pytest.mark.parametrize("shape", [(1, 37, 53), (2, 7, 7), (1, 1, 1), (3, 5, 2)])
def test_odd_and_tiny_sizes(shape):
    gen = torch.Generator().manual_seed(0)
    true, pred = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    tokens = torch.rand(shape[0], generator=gen)
    assert_matches(pyramidal_mse_with_tokens(true, pred, tokens), per_level_mse(true, pred, tokens, 4).mean())


def test_symmetric_in_its_maps():
    true, pred, tokens = torch.rand(2, 15, 16), torch.rand(2, 15, 16), torch.rand(2)
    assert_matches(pyramidal_mse_with_tokens(true, pred, tokens), pyramidal_mse_with_tokens(pred, true, tokens))


def test_constant_maps_are_finite():
    true = torch.full((2, 9, 9), 0.5, requires_grad=True)
    pred = torch.full((2, 9, 9), 0.25, requires_grad=True)
    loss = pyramidal_mse_with_tokens(true, pred, torch.ones(2))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(true.grad).all() and torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    true, pred, tokens = torch.rand(2, 32, 24), torch.rand(2, 32, 24), torch.tensor([1.0, 0.5])
    loss = pyramidal_mse_with_tokens(true.to(dtype), pred.to(dtype), tokens.to(dtype))
    assert loss.dtype == torch.float32
    # Equal to the float32 computation on the same (rounded) values ...
    same_values = pyramidal_mse_with_tokens(true.to(dtype).float(), pred.to(dtype).float(), tokens.to(dtype).float())
    assert_matches(loss, same_values)
    # ... and close to full precision up to the input rounding (bfloat16 keeps 8 bits).
    assert_matches(loss, pyramidal_mse_with_tokens(true, pred, tokens), rtol=2e-2)


def test_float64_and_non_contiguous():
    true = torch.rand(2, 20, 18, dtype=torch.float64).transpose(1, 2)
    pred = torch.rand(2, 18, 20, dtype=torch.float64)
    tokens = torch.rand(4, dtype=torch.float64)[::2]
    assert not true.is_contiguous() and not tokens.is_contiguous()
    loss = pyramidal_mse_with_tokens(true, pred, tokens)
    assert loss.dtype == torch.float64
    expected = per_level_mse(true.contiguous(), pred, tokens.contiguous(), 4).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)


def test_gradcheck_float64():
    true = torch.rand(2, 9, 7, dtype=torch.float64, requires_grad=True)
    pred = torch.rand(2, 9, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.rand(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, t: pyramidal_mse_with_tokens(a, b, t, nb_levels=3),
                                    (true, pred, tokens))


def test_bad_inputs():
    maps = torch.rand(2, 8, 8)
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(2, 8, 9\)"):
        pyramidal_mse_with_tokens(maps, torch.rand(2, 8, 9), torch.ones(2))
    with pytest.raises(ValueError, match=r"true_heatmaps.*\(2, 1, 8, 8\)"):
        pyramidal_mse_with_tokens(maps[:, None], maps, torch.ones(2))
    with pytest.raises(ValueError, match=r"predicted_heatmaps.*\(8, 8\)"):
        pyramidal_mse_with_tokens(maps, maps[0], torch.ones(2))
    with pytest.raises(ValueError, match=r"tokens.*\(2,\).*\(3,\)"):
        pyramidal_mse_with_tokens(maps, maps, torch.ones(3))
    with pytest.raises(ValueError, match=r"tokens.*\(2, 1\)"):
        pyramidal_mse_with_tokens(maps, maps, torch.ones(2, 1))
    with pytest.raises(TypeError, match="tokens.*list"):
        pyramidal_mse_with_tokens(maps, maps, [1.0, 1.0])
    with pytest.raises(TypeError, match="true_heatmaps.*ndarray"):
        pyramidal_mse_with_tokens(maps.numpy(), maps, torch.ones(2))
    with pytest.raises(ValueError, match="nb_levels"):
        pyramidal_mse_with_tokens(maps, maps, torch.ones(2), nb_levels=0)
