"""The simulators plant a known signal and ceiling; the readouts and ceilings must recover them."""
import numpy as np
import pytest

from harmonizer_fast.neural.image_level import CEILING_CONVENTIONS, score_image_level
from harmonizer_fast.neural.metrics import ceiling_score
from harmonizer_fast.neural.neural_benchmark import score_model
from harmonizer_fast.neural.simulate import simulate_image_level, simulate_spatial_dataset


@pytest.mark.parametrize("readout", ["pls", "ridge"])
def test_image_level_readouts_reach_the_planted_ceiling(readout):
    sim = simulate_image_level(n_images=400, n_neuroids=30, n_features=20, reliability=(0.5, 0.9), seed=0)
    result = score_image_level(sim.features, sim.assembly, readout=readout, n_splits=10)
    best = float(np.median(sim.best_correlation))
    assert best - 0.06 < result.score <= best + 0.03
    assert result.ceiling == pytest.approx(float(np.median(sim.reliability)), abs=0.04)
    np.testing.assert_allclose(result.ceiling_per_neuroid, sim.reliability, atol=0.12)
    # Explained over explainable variance: a near-perfect model scores about 1.
    assert CEILING_CONVENTIONS["r^2/c"](result.score, result.ceiling) == pytest.approx(1.0, abs=0.12)


def test_image_level_signal_is_planted_exactly():
    sim = simulate_image_level(n_images=200, n_neuroids=5, n_repetitions=2000, reliability=0.6, seed=1)
    mean = sim.assembly.mean_responses()
    r = [np.corrcoef(mean[:, j], sim.signal[:, j])[0, 1] for j in range(5)]
    np.testing.assert_allclose(r, np.sqrt(0.6), atol=0.04)
    np.testing.assert_allclose(sim.signal.std(0), 1.0)
    a = simulate_image_level(n_images=50, n_neuroids=3, seed=7, nonlinearity="softplus")
    b = simulate_image_level(n_images=50, n_neuroids=3, seed=7, nonlinearity="softplus")
    np.testing.assert_array_equal(a.assembly.responses, b.assembly.responses)
    with pytest.raises(ValueError, match="reliability"):
        simulate_image_level(reliability=1.2)
    with pytest.raises(ValueError, match="nonlinearity"):
        simulate_image_level(nonlinearity="tanh")


def test_spatial_dataset_layout_and_recovery():
    sim = simulate_spatial_dataset(n_images=5, n_channels=10, n_neurons=6, reliability=0.8, seed=0)
    a, b = sim.time_window
    as_loaded = np.transpose(sim.image_rf, (4, 0, 1, 2, 3))[:, ::-1, ::-1, a:b].mean(3)
    np.testing.assert_allclose(as_loaded, sim.responses, rtol=1e-12)
    assert sim.image_rf.shape == (17, 17, 60, 6, 5)
    (score, _), _ = score_model(sim.activity, sim.responses, grid_size=17)
    best = float(np.median(sim.best_correlation))
    assert best - 0.05 < score <= best + 0.03


def test_spatial_ceiling_recovers_planted_reliability():
    sim = simulate_spatial_dataset(n_images=4, n_channels=6, n_neurons=3, channels_per_site=2, reliability=0.7,
                                   time_window=(10, 50), seed=3)
    recordings = np.transpose(sim.image_rf, (4, 0, 1, 2, 3))
    a, b = sim.time_window
    assert recordings.shape[-1] == 6
    assert ceiling_score(recordings, a, b) == pytest.approx(0.7, abs=0.06)
