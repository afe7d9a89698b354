"""Arcaro-layout .mat files written here with scipy.io.savemat, read back through Neural_dataset."""
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from harmonizer_fast.neural.data import DATA_ENV_VAR, Neural_dataset
from harmonizer_fast.neural.metrics import ceiling_score
from harmonizer_fast.neural.neural_benchmark import extract_activations, neural_benchmark_score, score_model
from tests.neural.conftest import tf_resize


def _write_monkey(root, folder, mat_name, image_dir, image_rf, rng):
    (root / folder / image_dir).mkdir(parents=True)
    n_images = image_rf.shape[-1]
    names = np.empty((1, n_images), dtype=object)
    pixels = []
    for i in range(n_images):
        img = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / folder / image_dir / f"stim_{i}.png")
        names[0, i] = f"C:\\Users\\lab\\{image_dir}\\stim_{i}.png"
        pixels.append(img)
    scipy.io.savemat(root / folder / mat_name, {"imageRF": image_rf, "UniqueNames": names})
    return pixels


@pytest.fixture
def arcaro_root(tmp_path, rng):
    """George: 8x8 grid, 10 ms, 36 channels (33 posterior + 3 central), 4 images; Red: 5x5, 3 channels, 3 images."""
    shared = rng.normal(size=(8, 8, 1, 1, 4))
    george = shared + 0.5 * rng.normal(size=(8, 8, 10, 36, 4))
    red = rng.normal(size=(5, 5, 10, 3, 3))
    g_pix = _write_monkey(tmp_path, "George", "george_060118_data.mat", "natural_test", george, rng)
    r_pix = _write_monkey(tmp_path, "Red", "red_062419_data.mat", "red_naturalface", red, rng)
    return tmp_path, george, red, g_pix, r_pix


def test_load_data_real_layout(arcaro_root):
    root, george, red, g_pix, r_pix = arcaro_root
    ds = Neural_dataset(root)
    x, x_pre, y = ds.load_data("george_central_it", time_a=2, time_b=7)
    expected = np.transpose(george[::-1, ::-1, 2:7, 33:, :].mean(2), (3, 0, 1, 2))
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12)
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.uint8
    resized = tf_resize(g_pix[1].astype(np.float64), (224, 224, 3))
    np.testing.assert_allclose(x[1].permute(1, 2, 0).numpy().astype(float), resized, atol=0.5 + 1e-3)  # float32 interpolation, then rounding
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected_pre = (x.numpy().astype(np.float64) / 255 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(x_pre.numpy(), expected_pre, rtol=1e-5, atol=1e-6)

    _, _, y_post = ds.load_data("george_posterior_it", 0, 10)
    np.testing.assert_allclose(y_post.numpy(), np.transpose(george[::-1, ::-1, :, :33].mean(2), (3, 0, 1, 2)))
    x_red, _, y_red = ds.load_data("red_central_it", 3, 4)
    np.testing.assert_allclose(y_red.numpy(), np.transpose(red[::-1, ::-1, 3], (3, 0, 1, 2)))
    assert x_red.shape == (3, 3, 224, 224)
    np.testing.assert_array_equal(ds.raw_recordings("red_central_it"), np.transpose(red, (4, 0, 1, 2, 3)))
    np.testing.assert_array_equal(ds.george_central_it, np.transpose(george, (4, 0, 1, 2, 3))[..., 33:])
    np.testing.assert_array_equal(ds.george_posterior_it.shape, (4, 8, 8, 10, 33))
    np.testing.assert_allclose(ds.get_george_central_it_temp(2, 7).numpy(), expected)


def test_errors_name_what_is_missing(tmp_path, monkeypatch, arcaro_root):
    with pytest.raises(FileNotFoundError, match=DATA_ENV_VAR):
        Neural_dataset(tmp_path / "nowhere").load_data()
    root = arcaro_root[0]
    monkeypatch.setenv(DATA_ENV_VAR, str(root))
    ds = Neural_dataset()
    assert ds.data_root == root
    with pytest.raises(ValueError, match="stimuli"):
        ds.load_data("george_v4")
    with pytest.raises(ValueError, match="time_b"):
        ds.load_data("george_central_it", 5, 50)
    (root / "Red" / "red_naturalface" / "stim_2.png").unlink()
    with pytest.raises(FileNotFoundError, match="stim_2.png"):
        ds.load_data("red_central_it")


def test_neural_benchmark_score_end_to_end(arcaro_root):
    root = arcaro_root[0]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 8, stride=8), torch.nn.ReLU(), torch.nn.Conv2d(6, 10, 3, stride=2), torch.nn.ReLU()
    )
    ds = Neural_dataset(root)
    result = neural_benchmark_score(model, layers=["1", "3"], dataset=ds, time_a=1, time_b=9, progress=False)
    assert set(result.layer_scores) == {"1", "3"} and not result.failed_layers
    assert result.best_layer == max(result.layer_scores, key=result.layer_scores.get)
    assert result.score == result.layer_scores[result.best_layer]
    assert result.ceiling == pytest.approx(ceiling_score(ds.raw_recordings("george_central_it"), 1, 9))
    assert result.ceiled_score == pytest.approx(result.score / result.ceiling)
    _, x_pre, y = ds.load_data("george_central_it", 1, 9)
    acts = extract_activations(model, x_pre, ["3"])
    (expected, _), _ = score_model(acts["3"], y, grid_size=8)
    assert result.layer_scores["3"] == pytest.approx(expected, rel=1e-12)


def test_truncated_mat_names_the_file(arcaro_root):
    root = arcaro_root[0]
    mat = root / "Red" / "red_062419_data.mat"
    data = mat.read_bytes()
    for size in (len(data) // 2, 100, 10):
        mat.write_bytes(data[:size])
        with pytest.raises(ValueError, match="red_062419_data.mat is not a readable MATLAB file"):
            Neural_dataset(root).load_data("red_central_it")


@pytest.mark.parametrize("entry", ["absolute", "dotdot", "parent"])
def test_unique_names_stay_inside_data_root(tmp_path, rng, entry):
    root = tmp_path / "data"
    _write_monkey(root, "Red", "red_062419_data.mat", "red_naturalface", rng.normal(size=(5, 5, 10, 3, 2)), rng)
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "secret.png")
    names = np.empty((1, 2), dtype=object)
    names[0, 0] = "C:\\Users\\lab\\red_naturalface\\stim_0.png"
    names[0, 1] = {"absolute": str(outside / "secret.png"), "dotdot": "../../../outside/secret.png",
                   "parent": "C:\\Users\\lab\\.."}[entry]
    mat = root / "Red" / "red_062419_data.mat"
    scipy.io.savemat(mat, {"imageRF": rng.normal(size=(5, 5, 10, 3, 2)), "UniqueNames": names})
    if entry == "parent":
        with pytest.raises(ValueError, match="names no stimulus file"):
            Neural_dataset(root).load_data("red_central_it")
    else:  # only the file name counts: looked for in the monkey's image folder, never outside
        with pytest.raises(FileNotFoundError, match="red_naturalface/secret.png"):
            Neural_dataset(root).load_data("red_central_it")


@pytest.mark.parametrize("option", [dict(reducer="max"), dict(correlation_fn="kendall")])
def test_a_bad_reducer_or_correlation_is_refused_before_any_work(arcaro_root, option, monkeypatch):
    import harmonizer_fast.neural.neural_benchmark as nb

    monkeypatch.setattr(nb, "extract_activations", lambda *a, **k: pytest.fail("ran the model first"))
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"`{name}` must be one of"):
        neural_benchmark_score(torch.nn.Conv2d(3, 2, 8, stride=8), layers=[""], dataset=Neural_dataset(arcaro_root[0]),
                               progress=False, **option)
