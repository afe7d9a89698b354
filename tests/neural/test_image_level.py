"""Image-level (Brain-Score style) scoring against independent sklearn/numpy computations."""
import numpy as np
import pytest
from sklearn.cross_decomposition import PLSRegression as SkPLS
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

from harmonizer_fast.neural.assemblies import NeuralAssembly
from harmonizer_fast.neural.image_level import (
    CEILING_CONVENTIONS,
    score_image_level,
    split_half_ceiling,
    stratified_splits,
)
from harmonizer_fast.neural.simulate import simulate_image_level


def test_stratified_splits_are_sklearns_as_brainscore_builds_them():
    labels = np.repeat(np.arange(5), [20, 20, 30, 10, 2])
    splits = stratified_splits(labels, n_splits=10, test_size=0.1)
    reference = StratifiedShuffleSplit(n_splits=10, train_size=0.9, random_state=1).split(np.zeros(len(labels)), labels)
    for (train, test), (ref_train, ref_test) in zip(splits, reference):
        np.testing.assert_array_equal(train, np.sort(ref_train))
        np.testing.assert_array_equal(test, np.sort(ref_test))
        assert np.intersect1d(train, test).size == 0 and np.union1d(train, test).size == len(labels)
    assert len(splits) == 10 and not np.array_equal(splits[0][1], splits[1][1])
    with pytest.raises(ValueError, match="test_size"):
        stratified_splits(labels, test_size=1.5)
    with pytest.raises(ValueError, match=r"\['4'\] have 1"):
        stratified_splits(np.repeat(np.arange(5), [20, 20, 30, 10, 1]))


def test_score_matches_independent_sklearn_loop():
    sim = simulate_image_level(n_images=150, n_neuroids=7, n_features=30, seed=1)
    result = score_image_level(sim.features, sim.assembly, readout="pls", n_splits=4, seed=5)
    targets = sim.assembly.responses.mean(2)
    order = np.argsort(sim.assembly.image_ids)
    medians = []
    splitter = StratifiedShuffleSplit(n_splits=4, train_size=0.9, random_state=5)
    for train, test in splitter.split(np.zeros(150), sim.assembly.object_labels[order]):
        train, test = order[np.sort(train)], order[np.sort(test)]
        pred = SkPLS(25, scale=False).fit(sim.features[train], targets[train]).predict(sim.features[test])
        medians.append(np.median([np.corrcoef(pred[:, j], targets[test, j])[0, 1] for j in range(7)]))
    np.testing.assert_allclose(result.split_scores, medians, rtol=1e-10)
    assert result.score == pytest.approx(np.mean(medians), rel=1e-10)
    # Brain-Score's error: xarray's std (ddof=0) over splits / sqrt(n_splits).
    assert result.score_sem == pytest.approx(np.std(medians) / 2, rel=1e-10)
    assert result.ceiled_score == pytest.approx(result.score**2 / result.ceiling)
    assert result.ceiled_score_sem == pytest.approx(2 * result.score * result.score_sem / result.ceiling, rel=1e-5)


def _independent_ceiling(responses, n_splits=10, seed=1):
    """Brain-Score's procedure written out: halves of repetition values, median per halving, mean."""
    medians, per = [], []
    for a, b in ShuffleSplit(n_splits=n_splits, train_size=0.5, random_state=seed).split(np.zeros(responses.shape[2])):
        ma, mb = np.nanmean(responses[:, :, a], 2), np.nanmean(responses[:, :, b], 2)
        r = np.array([np.corrcoef(ma[:, j], mb[:, j])[0, 1] for j in range(responses.shape[1])])
        per.append(2 * r / (1 + r))
        medians.append(np.median(per[-1]))
    return np.mean(medians), np.mean(per, axis=0)


def test_split_half_ceiling_two_repetitions_is_spearman_brown():
    rng = np.random.default_rng(0)
    responses = rng.normal(size=(50, 4, 1)) + 0.8 * rng.normal(size=(50, 4, 2))
    r = np.array([np.corrcoef(responses[:, j, 0], responses[:, j, 1])[0, 1] for j in range(4)])
    median, per_neuroid = split_half_ceiling(responses, n_splits=3)
    np.testing.assert_allclose(per_neuroid, 2 * r / (1 + r), rtol=1e-10)
    assert median == pytest.approx(np.median(2 * r / (1 + r)))
    with pytest.raises(ValueError, match="repetitions"):
        split_half_ceiling(responses[:, :, :1])


@pytest.mark.parametrize("n_rep", [5, 7])
def test_split_half_ceiling_odd_and_uneven_counts_keep_every_repetition(n_rep):
    rng = np.random.default_rng(n_rep)
    responses = rng.normal(size=(60, 6, 1)) + rng.normal(size=(60, 6, n_rep))
    expected, expected_per = _independent_ceiling(responses)
    ceiling, per_neuroid = split_half_ceiling(responses)
    assert ceiling == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(per_neuroid, expected_per, rtol=1e-12)
    # Uneven: some images lack their last repetition (NaN slot); halves average what each image has.
    uneven = responses.copy()
    uneven[::3, :, -1] = np.nan
    assembly = NeuralAssembly.from_arrays(uneven)
    np.testing.assert_array_equal(assembly.repetition_counts, np.where(np.arange(60) % 3 == 0, n_rep - 1, n_rep))
    np.testing.assert_allclose(assembly.mean_responses(), np.nanmean(uneven, 2), rtol=1e-14)
    assert split_half_ceiling(uneven)[0] == pytest.approx(_independent_ceiling(uneven)[0], rel=1e-12)


def test_ceiling_refuses_an_image_with_no_repetition_in_a_half():
    rng = np.random.default_rng(0)
    responses = rng.normal(size=(20, 3, 4))
    responses[0, :, 1:] = np.nan  # image 0 has one repetition: some half has none of it
    with pytest.raises(ValueError, match="image 0 has no repetition in half"):
        split_half_ceiling(responses)


def test_ceiling_conventions_and_errors():
    sim = simulate_image_level(n_images=80, n_neuroids=5, n_features=10, seed=2)
    scores = {c: score_image_level(sim.features, sim.assembly, n_splits=2, ceiling_convention=c) for c in CEILING_CONVENTIONS}
    r, c = scores["r/c"].score, scores["r/c"].ceiling
    assert scores["r/c"].ceiled_score == pytest.approx(r / c)
    assert scores["(r/c)^2"].ceiled_score == pytest.approx((r / c) ** 2)
    assert scores["r^2/c"].ceiled_score == pytest.approx(r * r / c)
    default = score_image_level(sim.features, sim.assembly, n_splits=2)
    assert default.ceiling_convention == "r^2/c" and default.ceiled_score == scores["r^2/c"].ceiled_score
    for alias, name in (("(r/c)**2", "(r/c)^2"), ("r**2/c", "r^2/c")):
        aliased = score_image_level(sim.features, sim.assembly, n_splits=2, ceiling_convention=alias)
        assert aliased.ceiling_convention == name and aliased.ceiled_score == scores[name].ceiled_score
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
    with pytest.raises(ValueError, match="NaN or inf"):
        score_image_level(np.full_like(sim.features, np.nan), sim.assembly)
    assert isinstance(sim.assembly, NeuralAssembly)
