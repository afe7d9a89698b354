"""Image-level (Brain-Score style) scoring against independent sklearn/numpy computations."""
import numpy as np
import pytest
from sklearn.cross_decomposition import PLSRegression as SkPLS

from harmonizer_fast.neural.assemblies import NeuralAssembly
from harmonizer_fast.neural.image_level import (
    CEILING_CONVENTIONS,
    score_image_level,
    split_half_ceiling,
    stratified_splits,
)
from harmonizer_fast.neural.simulate import simulate_image_level


def test_stratified_splits():
    labels = np.repeat(np.arange(5), [20, 20, 30, 10, 1])
    splits = stratified_splits(labels, n_splits=10, test_size=0.1, seed=3)
    assert len(splits) == 10
    for train, test in splits:
        assert np.intersect1d(train, test).size == 0 and np.union1d(train, test).size == len(labels)
        counts = np.bincount(labels[test], minlength=5)
        np.testing.assert_array_equal(counts, [2, 2, 3, 1, 0])
    assert not np.array_equal(splits[0][1], splits[1][1])
    again = stratified_splits(labels, n_splits=10, test_size=0.1, seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again))
    with pytest.raises(ValueError, match="test_size"):
        stratified_splits(labels, test_size=1.5)


def test_score_matches_independent_pls_loop():
    sim = simulate_image_level(n_images=150, n_neuroids=7, n_features=30, seed=1)
    result = score_image_level(sim.features, sim.assembly, readout="pls", n_splits=4, seed=5)
    targets = sim.assembly.responses.mean(2)
    medians = []
    for train, test in stratified_splits(sim.assembly.object_labels, 4, 0.1, 5):
        pred = SkPLS(25, scale=False, tol=1e-4).fit(sim.features[train], targets[train]).predict(sim.features[test])
        medians.append(np.median([np.corrcoef(pred[:, j], targets[test, j])[0, 1] for j in range(7)]))
    np.testing.assert_allclose(result.split_scores, medians, rtol=1e-5)
    assert result.score == pytest.approx(np.mean(medians), rel=1e-5)
    assert result.score_sem == pytest.approx(np.std(medians, ddof=1) / 2, rel=1e-4)
    assert result.ceiled_score == pytest.approx(result.score / result.ceiling)
    assert result.ceiled_score_sem == pytest.approx(result.score_sem / result.ceiling, rel=1e-5)


def test_split_half_ceiling_two_repetitions_is_spearman_brown():
    rng = np.random.default_rng(0)
    responses = rng.normal(size=(50, 4, 1)) + 0.8 * rng.normal(size=(50, 4, 2))
    r = np.array([np.corrcoef(responses[:, j, 0], responses[:, j, 1])[0, 1] for j in range(4)])
    median, per_neuroid = split_half_ceiling(responses, n_splits=3)
    np.testing.assert_allclose(per_neuroid, 2 * r / (1 + r), rtol=1e-10)
    assert median == pytest.approx(np.median(2 * r / (1 + r)))
    with pytest.raises(ValueError, match="repetitions"):
        split_half_ceiling(responses[:, :, :1])


def test_ceiling_conventions_and_errors():
    sim = simulate_image_level(n_images=80, n_neuroids=5, n_features=10, seed=2)
    scores = {c: score_image_level(sim.features, sim.assembly, n_splits=2, ceiling_convention=c) for c in CEILING_CONVENTIONS}
    r, c = scores["r/c"].score, scores["r/c"].ceiling
    assert scores["(r/c)^2"].ceiled_score == pytest.approx((r / c) ** 2)
    assert scores["r^2/c"].ceiled_score == pytest.approx(r * r / c)
    with pytest.raises(ValueError, match="readout"):
        score_image_level(sim.features, sim.assembly, readout="svm")
    with pytest.raises(ValueError, match="ceiling_convention"):
        score_image_level(sim.features, sim.assembly, ceiling_convention="r")
    with pytest.raises(ValueError, match="features"):
        score_image_level(sim.features[:-1], sim.assembly)
    # Plain arrays work too (labels optional).
    plain = score_image_level(sim.features, sim.assembly.responses, n_splits=2,
                              object_labels=sim.assembly.object_labels)
    assert plain.score == pytest.approx(scores["r/c"].score)
    assert isinstance(sim.assembly, NeuralAssembly)
