"""The package's defaults against numbers brainscore-vision 2.4.2 computed itself.

tests/fixtures/brainscore/ was written by scripts/brainscore_fixtures/generate.py: brainio wrote
the assemblies (1.x and 2.x layouts, even, odd and uneven repetition counts) and Brain-Score's
`pls` metric, `internal_consistency` ceiling and `explained_variance` scored them.
"""
from pathlib import Path

import numpy as np
import pytest

from harmonizer_fast.neural.assemblies import NeuralAssembly, load_netcdf_assembly
from harmonizer_fast.neural.image_level import score_image_level, split_half_ceiling
from harmonizer_fast.neural.stimuli import place_on_screen

pytest.importorskip("xarray")
pytest.importorskip("h5netcdf")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "brainscore"
CASES = ["even_reps", "uneven_odd_reps", "odd_reps"]


def _load(case):
    expected = np.load(FIXTURES / f"{case}.npz")
    stimulus_set = FIXTURES / f"{case}_stimuli.csv"
    assembly = load_netcdf_assembly(
        FIXTURES / f"{case}.nc", stimulus_set=stimulus_set if stimulus_set.exists() else None
    )
    # Features are in stimulus-set order; put the assembly in that order too.
    return expected, assembly.select_images(expected["stimulus_ids"].tolist())


@pytest.mark.parametrize("case", CASES)
def test_defaults_reproduce_brainscore(case):
    expected, assembly = _load(case)
    result = score_image_level(expected["features"], assembly)
    tol = dict(rel=1e-12, abs=1e-14)
    assert result.score == pytest.approx(float(expected["raw"]), **tol)
    assert result.score_sem == pytest.approx(float(expected["error"]), **tol)
    assert result.ceiling == pytest.approx(float(expected["ceiling"]), **tol)
    assert result.ceiling_sem == pytest.approx(float(expected["ceiling_error"]), **tol)
    assert result.ceiled_score == pytest.approx(float(expected["ceiled"]), **tol)
    np.testing.assert_allclose(result.split_scores, expected["split_medians"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result.ceiling_splits, expected["ceiling_splits"], rtol=1e-12, atol=1e-14)
    # Brain-Score's ceiled score carries the raw error over unchanged.
    assert float(expected["ceiled_error"]) == float(expected["error"])


@pytest.mark.parametrize("case", CASES)
def test_repetition_average_and_order_match_brainscore(case):
    expected, assembly = _load(case)
    order = np.argsort(assembly.image_ids.astype(str))
    np.testing.assert_array_equal(assembly.image_ids[order].astype(str), expected["averaged_order"])
    np.testing.assert_allclose(assembly.mean_responses()[order], expected["averaged_mean"], rtol=1e-14, atol=1e-14)
    _, per_neuroid = split_half_ceiling(assembly.responses)
    ceiling_neuroids = list(expected["ceiling_neuroid_ids"])
    position = [ceiling_neuroids.index(str(n)) for n in assembly.neuroid_ids]
    np.testing.assert_allclose(per_neuroid, expected["ceiling_per_split_neuroid"].mean(0)[position], rtol=1e-12)


def test_fixtures_cover_uneven_and_odd_repetitions():
    _, uneven = _load("uneven_odd_reps")
    counts = uneven.repetition_counts
    assert counts.min() < counts.max() and uneven.n_repetitions % 2 == 1
    _, odd = _load("odd_reps")
    assert set(odd.repetition_counts) == {5} and odd.n_images % 2 == 1


def test_result_does_not_depend_on_image_order():
    expected, assembly = _load("uneven_odd_reps")
    perm = np.random.default_rng(0).permutation(assembly.n_images)
    shuffled = NeuralAssembly(assembly.responses[perm], assembly.image_ids[perm], assembly.object_labels[perm],
                              assembly.neuroid_ids)
    result = score_image_level(expected["features"][perm], shuffled)
    assert result.score == pytest.approx(float(expected["raw"]), rel=1e-12)
    assert result.ceiling == pytest.approx(float(expected["ceiling"]), rel=1e-12)


def test_place_on_screen_matches_brainscore_image_converter():
    expected = np.load(FIXTURES / "screen.npz")
    from PIL import Image

    names = sorted({k.split("__")[0] for k in expected.files})
    checked = 0
    for name in names:
        image = Image.fromarray(expected[f"{name}__input"])
        for key in (k for k in expected.files if k.startswith(name + "__") and not k.endswith("__input")):
            model_deg, stim_deg = (float(v) for v in key.split("__")[1].split("_"))
            np.testing.assert_array_equal(np.asarray(place_on_screen(image, model_deg, stim_deg)), expected[key])
            checked += 1
    assert checked == 8
