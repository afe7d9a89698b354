"""NeuralAssembly from arrays and from a Brain-Score-layout netCDF written here."""
import numpy as np
import pytest

from harmonizer_fast.neural.assemblies import NeuralAssembly, load_netcdf_assembly


def test_from_arrays_and_validation():
    rng = np.random.default_rng(0)
    asm = NeuralAssembly.from_arrays(rng.normal(size=(6, 3, 4)), object_labels=list("aabbcc"))
    assert (asm.n_images, asm.n_neuroids, asm.n_repetitions) == (6, 3, 4)
    np.testing.assert_allclose(asm.mean_responses(), asm.responses.mean(2))
    sub = asm.select_images([4, 0])
    np.testing.assert_array_equal(sub.responses, asm.responses[[4, 0]])
    np.testing.assert_array_equal(sub.object_labels, ["c", "a"])
    with pytest.raises(KeyError):
        asm.select_images([9])
    with pytest.raises(ValueError, match="object_labels"):
        NeuralAssembly.from_arrays(np.zeros((6, 3, 2)), object_labels=list("abc"))
    with pytest.raises(ValueError, match="NaN"):
        NeuralAssembly.from_arrays(np.full((2, 2, 2), np.nan))
    with pytest.raises(ValueError, match="unique"):
        NeuralAssembly.from_arrays(np.zeros((2, 2, 2)), image_ids=["x", "x"])


def _brainscore_file(path, rng, reps_per_image, n_time_bins=2):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    pytest.importorskip("h5py")
    images = [f"im{i}" for i in range(len(reps_per_image))]
    objects = ["car", "dog", "car", "face", "dog"][: len(images)]
    rows = [(img, obj, rep) for img, obj, n in zip(images, objects, reps_per_image) for rep in range(n)]
    order = rng.permutation(len(rows))  # presentations are not grouped by image in real files
    rows = [rows[i] for i in order]
    values = rng.normal(size=(len(rows), 3, n_time_bins))
    da = xr.DataArray(
        values,
        dims=("presentation", "neuroid", "time_bin"),
        coords={
            "image_id": ("presentation", [r[0] for r in rows]),
            "object_name": ("presentation", [r[1] for r in rows]),
            "repetition": ("presentation", [r[2] for r in rows]),
            "neuroid_id": ("neuroid", ["A-1", "A-2", "B-7"]),
        },
    )
    da.to_netcdf(path, engine="h5netcdf")
    return rows, values


def test_netcdf_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    rows, values = _brainscore_file(tmp_path / "asm.nc", rng, [3, 3, 3, 3])
    asm = load_netcdf_assembly(tmp_path / "asm.nc")
    assert asm.responses.shape == (4, 3, 3)
    np.testing.assert_array_equal(asm.neuroid_ids, ["A-1", "A-2", "B-7"])
    for i, img in enumerate(asm.image_ids):
        for rep in range(3):
            row = rows.index(next(r for r in rows if r[0] == img and r[2] == rep))
            np.testing.assert_allclose(asm.responses[i, :, rep], values[row].mean(1))
        assert asm.object_labels[i] == next(r[1] for r in rows if r[0] == img)
    one_bin = load_netcdf_assembly(tmp_path / "asm.nc", time_bin=1)
    row = rows.index(next(r for r in rows if r[0] == one_bin.image_ids[0] and r[2] == 2))
    np.testing.assert_allclose(one_bin.responses[0, :, 2], values[row, :, 1])


def test_netcdf_unequal_repetitions_truncated(tmp_path):
    rng = np.random.default_rng(2)
    _brainscore_file(tmp_path / "asm.nc", rng, [2, 4, 3])
    with pytest.warns(UserWarning, match="keeping the first 2"):
        asm = load_netcdf_assembly(tmp_path / "asm.nc")
    assert asm.responses.shape == (3, 3, 2)
