"""Object-recognition stimuli from skimage.data and neurons read out from a held-out network."""
import numpy as np
import pytest
import torch

from harmonizer_fast.neural.image_level import score_image_level, split_half_ceiling
from harmonizer_fast.neural.object_stimuli import (
    OBJECT_NAMES,
    object_features,
    render_object_stimuli,
    simulate_readout_neurons,
)


def test_stimuli_are_seeded_balanced_and_vary():
    a = render_object_stimuli(n_images=40, size=32, seed=3)
    b = render_object_stimuli(n_images=40, size=32, seed=3)
    c = render_object_stimuli(n_images=40, size=32, seed=4)
    assert a.images.dtype == torch.uint8 and tuple(a.images.shape) == (40, 3, 32, 32)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert np.bincount(a.labels, minlength=8).tolist() == [5] * 8
    assert set(a.object_names) == set(OBJECT_NAMES)
    assert a.scale.min() >= 0.45 and a.scale.max() <= 0.9 and np.ptp(a.rotation) > 0.5
    assert len(set(a.background.tolist())) > 3 and float(a.images.float().std()) > 20


def test_object_is_drawn_where_and_as_large_as_planted():
    """Same seed, two object sizes: every other draw (background, position direction) is the same,
    so the pixels that change are the objects', around the planted centre, within their squares."""
    big = render_object_stimuli(n_images=16, size=64, scale_range=(0.6, 0.6), max_rotation_deg=0.0, seed=0)
    small = render_object_stimuli(n_images=16, size=64, scale_range=(0.3, 0.3), max_rotation_deg=0.0, seed=0)
    grid = (np.arange(64) + 0.5) / 32 - 1
    for i in range(16):
        changed = (big.images[i].int() - small.images[i].int()).abs().amax(0).numpy() > 8
        assert 0.02 < changed.mean() <= 0.6 ** 2 + 0.02, (i, changed.mean())
        rows, cols = np.nonzero(changed)
        centroid = np.array([grid[cols].mean(), grid[rows].mean()])
        assert np.abs(centroid - big.position[i]).max() < 0.25, (i, centroid, big.position[i])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`n_images`"):
        render_object_stimuli(n_images=3)
    with pytest.raises(ValueError, match="`size`"):
        render_object_stimuli(n_images=8, size=4)
    with pytest.raises(ValueError, match="`scale_range`"):
        render_object_stimuli(n_images=8, scale_range=(0.5, 0.1))
    with pytest.raises(ValueError, match=r"`features` must be \(images >= 2, d\)"):
        simulate_readout_neurons(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="constant"):
        simulate_readout_neurons(np.ones((6, 3)), np.zeros(6))
    with pytest.raises(ValueError, match="`object_labels`"):
        simulate_readout_neurons(np.random.default_rng(0).normal(size=(6, 3)), np.zeros(5))


def test_neurons_are_a_noisy_readout_with_the_planted_reliability():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 100)
    features = rng.normal(size=(400, 12)) + rng.normal(size=(4, 12))[labels]
    neurons = simulate_readout_neurons(features, labels, n_neuroids=20, n_repetitions=8, reliability=0.7, seed=1)
    assert neurons.assembly.responses.shape == (400, 20, 8)
    ceiling, _ = split_half_ceiling(neurons.assembly.responses)
    assert ceiling == pytest.approx(0.7, abs=0.06)
    # The true features predict the neurons near the best possible r = sqrt(rho); noise does not.
    true = score_image_level(features, neurons.assembly, readout="ridge", n_splits=3, seed=0)
    noise = score_image_level(rng.normal(size=(400, 12)), neurons.assembly, readout="ridge", n_splits=3, seed=0)
    assert true.score > 0.7 and noise.score < 0.2


def test_object_features_pool_the_held_out_layer():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(5, 7, 3))
    images = render_object_stimuli(n_images=8, size=32).images
    features = object_features(net, images, "2", lambda x: x / 255.0, grid=2, batch_size=3)
    assert features.shape == (8, 7 * 4)
    with pytest.raises(ValueError, match="is not a module"):
        object_features(net, images, "nope", lambda x: x)
