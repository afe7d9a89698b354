"""The sweep's benchmarks scored through run_unit: each row recomputed by hand (full features,
layer choice without selection leakage, disjoint halves and sites), and the loaders of local
Brain-Score, netCDF and Arcaro files."""
import numpy as np
import pytest
import timm
import torch

from harmonizer_fast.neural.image_level import score_image_level
from harmonizer_fast.neural.neural_benchmark import score_model
from harmonizer_fast.zoo.benchmarks import get_benchmark, render_stimuli
from harmonizer_fast.zoo.sweep import ModelSpec, SweepUnit, run_unit

from zoo_settings import TINY_IMAGE_LEVEL, TINY_SPATIAL


def _unit(benchmark, options, model="resnet10t", **kw):
    # Models see the simulated stimuli at their stored size (fast), not their 224-pixel input size.
    image_size = kw.pop("image_size", options.get("image_size"))
    return SweepUnit(model=ModelSpec(model, model), benchmark=benchmark, image_size=image_size,
                     benchmark_options=tuple(sorted({"seed": 0, **options}.items())), batch_size=40, **kw)


def _manual_features(model_name, seed, images):
    """Independent path: timm model from the same seed, normalised by hand, all images at once."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False).eval()
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.forward_intermediates((images.float() / 255 - mean) / std, intermediates_only=True)


def _flat(output):
    return output.reshape(output.shape[0], -1).numpy()


def test_image_level_rows_are_full_feature_scores_and_the_pca_choice():
    """Brain-Score's rule: each row's score is score_image_level on the layer's unprojected
    features (all images); the layer is chosen by the score of its PCA-1000 features."""
    from sklearn.decomposition import PCA

    unit = _unit("image-level-sim", TINY_IMAGE_LEVEL)
    rows = run_unit(unit)
    bench = get_benchmark("image-level-sim", seed=0, **TINY_IMAGE_LEVEL)
    outputs = _manual_features("resnet10t", unit.model_seed(), bench.images)
    assert [r.layer for r in rows] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    for index, row in enumerate(rows):
        features = _flat(outputs[index])
        assert row.n_features == features.shape[1] and row.choice_rule == "pca1000-own-stimuli"
        ref = score_image_level(features, bench.assembly, readout="pls", n_splits=3)
        assert row.score == pytest.approx(ref.score, rel=1e-6, abs=1e-9)
        assert row.score_error == pytest.approx(ref.score_sem, rel=1e-5, abs=1e-9)
        assert row.ceiling == pytest.approx(ref.ceiling, rel=1e-12)
        assert row.ceiled_score == pytest.approx(ref.ceiled_score, rel=1e-6, abs=1e-9)
        # The choice: principal components fitted on the benchmark's own stimuli (96 < 1,000 of them:
        # the 95 with variance on them).
        reduced = PCA(n_components=95, random_state=0).fit(features).transform(features) if features.shape[1] > 1000 \
            else features
        choice = score_image_level(reduced, bench.assembly, readout="pls", n_splits=3)
        assert row.selection_score == pytest.approx(choice.score, rel=1e-5, abs=1e-6)
    selection = [r.selection_score for r in rows]
    assert [r.selected for r in rows] == [i == int(np.argmax(selection)) for i in range(len(rows))]


def test_image_level_disjoint_choice_scores_full_features_on_each_half():
    options = {**TINY_IMAGE_LEVEL, "layer_choice": "disjoint"}
    unit = _unit("image-level-sim", options, layers=("layer1", "layer3"))
    rows = run_unit(unit)
    bench = get_benchmark("image-level-sim", seed=0, **options)
    sel, rep = bench.selection_images, bench.report_images
    assert len(np.intersect1d(sel, rep)) == 0 and len(sel) + len(rep) == 96
    labels = bench.assembly.object_labels
    assert set(labels[sel]) == set(labels[rep]) == set(labels)
    outputs = _manual_features("resnet10t", unit.model_seed(), bench.images)
    for row, out in zip(rows, (outputs[1], outputs[3])):
        features = _flat(out)
        assert row.choice_rule == "disjoint-halves"
        for half, expected, splits in ((rep, row.score, 3), (sel, row.selection_score, 2)):
            assembly = bench.assembly.select_images(bench.assembly.image_ids[half].tolist())
            ref = score_image_level(features[half], assembly, readout="pls", n_splits=splits)
            assert expected == pytest.approx(ref.score, rel=1e-6, abs=1e-9)


def test_image_level_pca_images_folder_and_spooled_features(tmp_path):
    """PCA fitted on a separate folder of images (--pca-images), features spooled to disk
    (memory budget 0): the same numbers as by hand."""
    from PIL import Image
    from sklearn.decomposition import PCA

    from harmonizer_fast.zoo.benchmarks import load_image_folder

    rng = np.random.default_rng(1)
    folder = tmp_path / "pca"
    folder.mkdir()
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    options = {**TINY_IMAGE_LEVEL, "pca_images": str(folder), "memory_budget_gib": 0.0,
               "spool_dir": str(tmp_path / "spool")}
    (tmp_path / "spool").mkdir()
    unit = _unit("image-level-sim", options, layers=("layer2",))
    rows = run_unit(unit)
    assert list((tmp_path / "spool").iterdir()) == []  # spool files removed
    bench = get_benchmark("image-level-sim", seed=0, **options)
    pca_images = load_image_folder(str(folder))
    assert pca_images.shape == (20, 3, 224, 224) and torch.equal(bench.pca_images, pca_images)
    torch.manual_seed(unit.model_seed())
    model = timm.create_model("resnet10t", pretrained=False).eval()
    from harmonizer_fast.models.pretrained import stimulus_transform

    transform = stimulus_transform(model, 32)
    with torch.no_grad():
        features = _flat(model.forward_intermediates(transform(bench.images), indices=[2], intermediates_only=True)[0])
        reference = _flat(model.forward_intermediates(transform(pca_images), indices=[2], intermediates_only=True)[0])
    reduced = PCA(n_components=19, random_state=0).fit(reference).transform(features)  # 20 images: 19 with variance
    assert rows[0].choice_rule == "pca1000-pca-images"
    assert rows[0].selection_score == pytest.approx(
        score_image_level(reduced, bench.assembly, readout="pls", n_splits=3).score, rel=1e-5, abs=1e-6)
    assert rows[0].score == pytest.approx(
        score_image_level(features, bench.assembly, readout="pls", n_splits=3).score, rel=1e-6, abs=1e-9)


def test_spatial_rows_match_score_model_on_disjoint_sites():
    rows = run_unit(_unit("spatial-sim", TINY_SPATIAL, layers=("layer1", "layer3")))
    bench = get_benchmark("spatial-sim", seed=0, **TINY_SPATIAL)
    assert len(np.intersect1d(bench.selection_sites, bench.report_sites)) == 0
    assert len(bench.selection_sites) + len(bench.report_sites) == 6
    outputs = _manual_features("resnet10t", _unit("spatial-sim", {}).model_seed(), bench.images)
    for row, out in zip(rows, (outputs[1], outputs[3])):
        act = out.permute(0, 2, 3, 1)
        (score, spread), _ = score_model(act, bench.responses[..., bench.report_sites], grid_size=None)
        (selection, _), _ = score_model(act, bench.responses[..., bench.selection_sites], grid_size=None)
        assert row.score == pytest.approx(score, rel=1e-5, abs=1e-6)
        assert row.score_error == pytest.approx(spread, rel=1e-5, abs=1e-6)
        assert row.selection_score == pytest.approx(selection, rel=1e-5, abs=1e-6)
        assert row.ceiled_score == pytest.approx(row.score / row.ceiling, rel=1e-12)
        assert row.layer_method == "forward_intermediates"


def test_render_stimuli_is_seeded_and_follows_the_amplitudes():
    amps = np.random.default_rng(0).normal(size=(3, 1, 1, 5))
    a, b = render_stimuli(amps, 16, seed=1), render_stimuli(amps, 16, seed=1)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 16, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, render_stimuli(amps, 16, seed=2))
    flat = render_stimuli(np.zeros((1, 1, 1, 5)), 8)
    assert int(flat.min()) == int(flat.max()) == 128  # sigmoid(0) * 255, rounded
    with pytest.raises(ValueError, match=r"\(n, h, w, K\)"):
        render_stimuli(np.zeros((2, 3)), 8)


def test_render_stimuli_in_blocks_gives_the_same_pixels(monkeypatch):
    # memory stays bounded (blocks of RENDER_BLOCK_BYTES of resized maps) and the pixels do not
    # depend on the block size: rendering one image per block equals rendering all at once
    from harmonizer_fast.zoo import benchmarks as zoo_benchmarks

    amps = np.random.default_rng(4).normal(size=(7, 2, 3, 6)).astype(np.float32)
    whole = render_stimuli(amps, 24, seed=5)
    per_image_bytes = 4 * 6 * 24 * 24
    for images_per_block in (1, 3):
        monkeypatch.setattr(zoo_benchmarks, "RENDER_BLOCK_BYTES", images_per_block * per_image_bytes)
        assert torch.equal(render_stimuli(amps, 24, seed=5), whole)


def _write_arcaro_george(root, rng, n_images=4, grid=8, n_time=10, n_channels=36):
    import scipy.io
    from PIL import Image

    (root / "George" / "natural_test").mkdir(parents=True)
    names = np.empty((1, n_images), dtype=object)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)).save(
            root / "George" / "natural_test" / f"stim_{i}.png")
        names[0, i] = f"C:\\data\\natural_test\\stim_{i}.png"
    image_rf = rng.normal(size=(1, 1, 1, 1, n_images)) + rng.normal(size=(grid, grid, n_time, n_channels, n_images))
    scipy.io.savemat(root / "George" / "george_060118_data.mat", {"imageRF": image_rf, "UniqueNames": names})


def test_spatial_benchmark_reads_an_arcaro_folder(tmp_path):
    from harmonizer_fast.neural.data import Neural_dataset
    from harmonizer_fast.neural.metrics import ceiling_score

    _write_arcaro_george(tmp_path, np.random.default_rng(0))
    options = {"path": str(tmp_path), "stimuli": "george_posterior_it", "time_a": 2, "time_b": 8}
    rows = run_unit(_unit("spatial", options, layers=("layer2",), image_size=224))
    bench = get_benchmark("spatial", seed=0, **options)
    ds = Neural_dataset(tmp_path)
    images, _, responses = ds.load_data("george_posterior_it", 2, 8)
    assert torch.equal(bench.images, images) and len(bench.report_sites) + len(bench.selection_sites) == 33
    out = _manual_features("resnet10t", _unit("spatial", {}).model_seed(), images)[2].permute(0, 2, 3, 1)
    (score, _), _ = score_model(out, responses[..., bench.report_sites], grid_size=None)
    ceiling = ceiling_score(ds.raw_recordings("george_posterior_it")[..., bench.report_sites], 2, 8)
    assert rows[0].score == pytest.approx(score, rel=1e-5, abs=1e-6)
    assert rows[0].ceiling == pytest.approx(ceiling, rel=1e-12)


def test_image_level_benchmark_reads_netcdf_and_stimuli(tmp_path):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    from PIL import Image

    from harmonizer_fast.neural.assemblies import load_netcdf_assembly

    rng = np.random.default_rng(0)
    n_images, n_reps = 24, 3
    ids = [f"im{i:02d}" for i in range(n_images)]
    stimuli = tmp_path / "stimuli"
    stimuli.mkdir()
    for image_id in ids:
        Image.fromarray(rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)).save(stimuli / f"{image_id}.png")
    rows = [(image_id, f"obj{i % 3}", rep) for i, image_id in enumerate(ids) for rep in range(n_reps)]
    da = xr.DataArray(rng.normal(size=(len(rows), 6)), dims=("presentation", "neuroid"), coords={
        "image_id": ("presentation", [r[0] for r in rows]), "object_name": ("presentation", [r[1] for r in rows]),
        "repetition": ("presentation", [r[2] for r in rows])})
    da.to_netcdf(tmp_path / "it.nc", engine="h5netcdf")
    options = {"path": str(tmp_path / "it.nc"), "stimuli_dir": str(stimuli), "n_splits": 2, "selection_splits": 2}
    bench = get_benchmark("image-level", seed=0, **options)
    assembly = load_netcdf_assembly(tmp_path / "it.nc")
    np.testing.assert_array_equal(bench.assembly.responses, assembly.responses)
    assert bench.images.shape == (n_images, 3, 224, 224) and bench.images.dtype == torch.uint8
    # Stimuli in assembly order, resized like the Arcaro loader (half-pixel bilinear, no antialias).
    pixels = np.asarray(Image.open(stimuli / f"{assembly.image_ids[5]}.png").convert("RGB"), dtype=np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None], size=(224, 224),
                                               mode="bilinear", align_corners=False)[0].round()
    assert (bench.images[5].float() - expected).abs().max() <= 1
    rows = run_unit(_unit("image-level", options, layers=("layer1", "layer3"), image_size=32))
    assert [r.layer for r in rows] == ["layer1", "layer3"] and sum(r.selected for r in rows) == 1
    missing = tmp_path / "missing"
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="<image_id>"):
        get_benchmark("image-level", seed=0, **{**options, "stimuli_dir": str(missing)})


def test_the_ceiling_is_computed_once_per_half(monkeypatch):
    """Every layer of a unit shares its half's ceiling (the ceiling depends on the responses only)."""
    from harmonizer_fast.neural import image_level

    calls = []
    original = image_level._ceiling
    monkeypatch.setattr(image_level, "_ceiling", lambda *a, **k: calls.append(1) or original(*a, **k))
    rows = run_unit(_unit("image-level-sim", {**TINY_IMAGE_LEVEL, "layer_choice": "disjoint"},
                          layers=("layer1", "layer2", "layer3")))
    assert len(rows) == 3 and len(calls) == 2  # the selection half and the report half
    assert len({r.ceiling for r in rows}) == 1
    bench = get_benchmark("image-level-sim", seed=0, **TINY_IMAGE_LEVEL)
    with pytest.raises(ValueError, match="`ceiling` must be the assembly_ceiling"):
        score_image_level(np.zeros((bench.assembly.n_images, 3)), bench.assembly, ceiling=(0.5, np.ones(2), None))


def test_image_level_benchmark_reads_a_brainscore_stimulus_set(tmp_path):
    """Brain-Score 2.x files: an assembly keyed by stimulus_id, a stimulus-set CSV and a zip of
    images; stimuli placed on the model's 8 degrees (a 4-degree stimulus is padded with grey)."""
    import io
    import zipfile

    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    from PIL import Image

    from harmonizer_fast.neural.stimuli import SCREEN_GREY

    rng = np.random.default_rng(1)
    ids = [f"s{i:02d}" for i in range(40)]
    with zipfile.ZipFile(tmp_path / "stimuli.zip", "w") as archive:
        for sid in ids:
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8)).save(buffer, format="PNG")  # grey
            archive.writestr(f"{sid}.png", buffer.getvalue())
    (tmp_path / "set.csv").write_text("stimulus_id,filename,object_name\n"
                                      + "".join(f"{sid},{sid}.png,obj{i % 4}\n" for i, sid in enumerate(ids)))
    rows = [(sid, rep) for sid in ids for rep in range(4)]
    da = xr.DataArray(rng.normal(size=(len(rows), 5)), dims=("presentation", "neuroid"), coords={
        "stimulus_id": ("presentation", [r[0] for r in rows]), "repetition": ("presentation", [r[1] for r in rows])})
    da.to_netcdf(tmp_path / "it.nc", engine="h5netcdf")
    options = dict(path=str(tmp_path / "it.nc"), stimulus_set=str(tmp_path / "set.csv"),
                   stimuli=str(tmp_path / "stimuli.zip"), stimulus_degrees=4.0)
    bench = get_benchmark("image-level", seed=0, **options)
    assert bench.images.shape == (40, 3, 32, 32) and bench.images.dtype == torch.uint8
    assert sorted(set(bench.assembly.object_labels.tolist())) == ["obj0", "obj1", "obj2", "obj3"]
    first = bench.assembly.image_ids[0]
    with zipfile.ZipFile(tmp_path / "stimuli.zip") as archive:
        original = np.asarray(Image.open(io.BytesIO(archive.read(f"{first}.png"))))
    np.testing.assert_array_equal(bench.images[0, 0, 8:24, 8:24].numpy(), original)  # grey -> RGB, centred
    assert (bench.images[0, :, :8] == torch.tensor(SCREEN_GREY, dtype=torch.uint8).view(3, 1, 1)).all()
    with pytest.raises(ValueError, match="exactly one of `stimulus_set`"):
        get_benchmark("image-level", path=str(tmp_path / "it.nc"))
