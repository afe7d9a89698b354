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
    with pytest.raises(ValueError, match="no repetition"):
        NeuralAssembly.from_arrays(np.full((2, 2, 2), np.nan))
    partly = np.zeros((2, 2, 2))
    partly[0, 1, 0] = np.nan  # one neuroid of a repetition: not a missing repetition
    with pytest.raises(ValueError, match="not a whole missing repetition"):
        NeuralAssembly.from_arrays(partly)
    with pytest.raises(ValueError, match="unique"):
        NeuralAssembly.from_arrays(np.zeros((2, 2, 2)), image_ids=["x", "x"])


def _brainscore_file(path, rng, reps_per_image, n_time_bins=2, layout="1.x", times=None, regions=None):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    pytest.importorskip("h5py")
    images = [f"im{i}" for i in range(len(reps_per_image))]
    objects = ["car", "dog", "car", "face", "dog"][: len(images)]
    rows = [(img, obj, rep) for img, obj, n in zip(images, objects, reps_per_image) for rep in range(n)]
    order = rng.permutation(len(rows))  # presentations are not grouped by image in real files
    rows = [rows[i] for i in order]
    values = rng.normal(size=(len(rows), 3, n_time_bins))
    coords = {
        ("stimulus_id" if layout == "2.x" else "image_id"): ("presentation", [r[0] for r in rows]),
        "repetition": ("presentation", [r[2] for r in rows]),
        "neuroid_id": ("neuroid", ["A-1", "A-2", "B-7"]),
    }
    if layout == "1.x":
        coords["object_name"] = ("presentation", [r[1] for r in rows])
    if times is not None:
        coords["time_bin_start"] = ("time_bin", [t[0] for t in times])
        coords["time_bin_end"] = ("time_bin", [t[1] for t in times])
    if regions is not None:
        coords["region"] = ("neuroid", regions)
    da = xr.DataArray(values, dims=("presentation", "neuroid", "time_bin"), coords=coords)
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


def test_netcdf_uneven_repetitions_keep_every_presentation(tmp_path):
    rng = np.random.default_rng(2)
    rows, values = _brainscore_file(tmp_path / "asm.nc", rng, [2, 4, 3])
    asm = load_netcdf_assembly(tmp_path / "asm.nc")
    assert asm.responses.shape == (3, 3, 4)
    counts = dict(zip(asm.image_ids, asm.repetition_counts))
    assert counts == {"im0": 2, "im1": 4, "im2": 3}
    for i, img in enumerate(asm.image_ids):
        mine = [values[k].mean(1) for k, r in enumerate(rows) if r[0] == img]
        np.testing.assert_allclose(asm.mean_responses()[i], np.mean(mine, axis=0), rtol=1e-14)
    i0, i1 = list(asm.image_ids).index("im0"), list(asm.image_ids).index("im1")
    assert np.isnan(asm.responses[i0, :, 2:]).all() and not np.isnan(asm.responses[i1]).any()


def test_netcdf_brainscore2_layout_with_stimulus_set_objects(tmp_path):
    rng = np.random.default_rng(3)
    rows, _ = _brainscore_file(tmp_path / "asm.nc", rng, [2, 2, 3, 2], layout="2.x")
    with pytest.raises(ValueError, match="object_name.*stimulus_set"):
        load_netcdf_assembly(tmp_path / "asm.nc")
    (tmp_path / "stimuli").mkdir()
    from PIL import Image

    lines = ["stimulus_id,object_name,filename"]
    for img, obj in sorted({(r[0], r[1]) for r in rows}):
        Image.new("RGB", (4, 4)).save(tmp_path / "stimuli" / f"{img}.png")
        lines.append(f"{img},{obj},{img}.png")
    (tmp_path / "stimuli.csv").write_text("\n".join(lines) + "\n")
    asm = load_netcdf_assembly(tmp_path / "asm.nc", stimulus_set=tmp_path / "stimuli.csv")
    assert asm.responses.shape == (4, 3, 3)
    for img, label in zip(asm.image_ids, asm.object_labels):
        assert label == next(r[1] for r in rows if r[0] == img)


def test_netcdf_time_range_and_region(tmp_path):
    rng = np.random.default_rng(4)
    times = [(50, 70), (70, 120), (120, 170), (170, 220)]
    rows, values = _brainscore_file(tmp_path / "t.nc", rng, [2, 2, 2], n_time_bins=4, times=times,
                                    regions=["IT", "V4", "IT"])
    with pytest.raises(ValueError, match="several regions.*region="):
        load_netcdf_assembly(tmp_path / "t.nc")
    asm = load_netcdf_assembly(tmp_path / "t.nc", region="IT")  # default: the bins inside 70-170 ms
    np.testing.assert_array_equal(asm.neuroid_ids, ["A-1", "B-7"])
    k = rows.index(next(r for r in rows if r[0] == asm.image_ids[0] and r[2] == 1))
    np.testing.assert_allclose(asm.responses[0, :, 1], values[k][[0, 2]][:, 1:3].mean(1))
    late = load_netcdf_assembly(tmp_path / "t.nc", region="IT", time_range=(120, 220))
    np.testing.assert_allclose(late.responses[0, :, 1], values[k][[0, 2]][:, 2:4].mean(1))
    with pytest.raises(ValueError, match="no time bin lies inside 300-400 ms"):
        load_netcdf_assembly(tmp_path / "t.nc", region="IT", time_range=(300, 400))
    with pytest.raises(ValueError, match="no neuroid in region 'V1'"):
        load_netcdf_assembly(tmp_path / "t.nc", region="V1")
    with pytest.raises(ValueError, match="not both"):
        load_netcdf_assembly(tmp_path / "t.nc", region="IT", time_bin=0, time_range=(70, 170))


def test_netcdf_clear_errors(tmp_path):
    xr = pytest.importorskip("xarray")
    rng = np.random.default_rng(5)
    _brainscore_file(tmp_path / "good.nc", rng, [2, 2, 2])
    data = (tmp_path / "good.nc").read_bytes()
    (tmp_path / "truncated.nc").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.nc").write_bytes(b"")
    (tmp_path / "text.nc").write_text("presentation,neuroid\n1,2\n")
    for name, message in (("truncated.nc", "not a readable netCDF"), ("empty.nc", "is empty"),
                          ("text.nc", "not a readable netCDF")):
        with pytest.raises(ValueError, match=message) as err:
            load_netcdf_assembly(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.nc"):
        load_netcdf_assembly(tmp_path / "missing.nc")
    # time_bin for a file without a time dimension.
    flat = xr.DataArray(rng.normal(size=(4, 2)), dims=("presentation", "neuroid"), coords={
        "image_id": ("presentation", ["a", "a", "b", "b"]), "object_name": ("presentation", ["x", "x", "y", "y"])})
    flat.to_netcdf(tmp_path / "flat.nc", engine="h5netcdf")
    assert load_netcdf_assembly(tmp_path / "flat.nc").responses.shape == (2, 2, 2)
    with pytest.raises(ValueError, match="`time_bin`=0 given, but .*flat.nc has no time_bin dimension"):
        load_netcdf_assembly(tmp_path / "flat.nc", time_bin=0)
    with pytest.raises(ValueError, match="no time_bin_start"):
        load_netcdf_assembly(tmp_path / "flat.nc", time_range=(70, 170))
    # An image listed with two object names.
    flat.assign_coords(object_name=("presentation", ["x", "z", "y", "y"])).to_netcdf(tmp_path / "two.nc", engine="h5netcdf")
    with pytest.raises(ValueError, match=r"image 'a' is listed with 2 object_names: \['x', 'z'\]"):
        load_netcdf_assembly(tmp_path / "two.nc")
    # The same repetition twice.
    flat.assign_coords(repetition=("presentation", [0, 0, 0, 1])).to_netcdf(tmp_path / "dup.nc", engine="h5netcdf")
    with pytest.raises(ValueError, match="image 'a' has repetition 0 more than once"):
        load_netcdf_assembly(tmp_path / "dup.nc")
