"""evaluate_clickme and its default Saliency explainer on a tiny model and synthetic batches."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import spearmanr

from harmonizer_fast.cli import main
from harmonizer_fast.evaluation import HUMAN_SPEARMAN_CEILING, Saliency, evaluate_clickme

CLASSES = 5


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, CLASSES),
    )
    with torch.no_grad():  # non-trivial BN statistics, so train and eval modes differ
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def synthetic_batches(n_batches=2, batch=3, size=12, seed=1, heatmap_channels=True):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        images = torch.rand(batch, 3, size, size, generator=generator) * 255
        shape = (batch, 1, size, size) if heatmap_channels else (batch, size, size)
        heatmaps = torch.rand(shape, generator=generator)
        labels = nn.functional.one_hot(torch.randint(0, CLASSES, (batch,), generator=generator), CLASSES).float()
        batches.append((images, heatmaps, labels))
    return batches


def manual_saliency(model, images, labels):
    """One image at a time: |d logit[label] / d image|, max over colour channels."""
    model.eval()
    maps = []
    for image, label in zip(images, labels):
        x = image[None].clone().requires_grad_(True)
        logit = model(x)[0, int(label.argmax())]
        (grad,) = torch.autograd.grad(logit, x)
        maps.append(grad[0].abs().max(dim=0).values)
    return torch.stack(maps)


def oracle_scores(saliency, heatmaps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = [spearmanr(s.ravel(), h.ravel())[0] for s, h in zip(saliency.numpy(), heatmaps.numpy())]
    return np.array(rho)


@pytest.mark.parametrize("batch_size", [64, 2])
def test_saliency_matches_per_image_autograd(batch_size):
    model = tiny_model()
    model.train()
    images, _, labels = synthetic_batches(1, batch=5)[0]
    got = Saliency(model, batch_size=batch_size)(images, labels)
    assert model.training  # mode restored
    want = manual_saliency(model, images, labels)
    assert got.shape == (5, 12, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_saliency_integer_labels_equal_one_hot():
    model = tiny_model()
    images, _, labels = synthetic_batches(1)[0]
    torch.testing.assert_close(Saliency(model)(images, labels.argmax(1)), Saliency(model)(images, labels))


def test_evaluate_clickme_scores_and_alignment_math():
    model = tiny_model()
    batches = synthetic_batches(n_batches=2, batch=3)
    scores = evaluate_clickme(model, clickme_val_dataset=batches, progress=False)
    assert sorted(scores) == ["alignment_score", "dice", "iou", "spearman"]
    saliency = torch.cat([manual_saliency(model, images, labels) for images, _, labels in batches])
    human = torch.cat([heatmaps[:, 0] for _, heatmaps, _ in batches])
    rho = oracle_scores(saliency, human)
    assert len(scores["spearman"]) == len(scores["dice"]) == len(scores["iou"]) == 6
    # saliency agrees to float32 rounding, so ranks (hence rho) agree to ~1e-6 at worst
    np.testing.assert_allclose(scores["spearman"], rho, rtol=0, atol=1e-6)
    assert scores["alignment_score"] == pytest.approx(np.mean(scores["spearman"]) / 0.65753, rel=1e-12)
    assert HUMAN_SPEARMAN_CEILING == 0.65753
    for name in ("dice", "iou"):
        assert all(0.0 <= value <= 1.0 for value in scores[name])


def test_evaluate_clickme_preprocess_and_custom_explainer():
    batches = synthetic_batches(n_batches=1, batch=4, heatmap_channels=False)
    seen = []

    def explainer(images, labels):
        seen.append(images)
        # 4-D explanation (N, 2, H, W): averaged over axis 1 before scoring
        return torch.stack([images[:, 0], images[:, 0] * 0 + images[:, 1]], dim=1)

    scores = evaluate_clickme(
        tiny_model(), explainer=explainer, clickme_val_dataset=batches, preprocess_inputs=lambda x: x / 255.0, progress=False
    )
    images, heatmaps, _ = batches[0]
    torch.testing.assert_close(seen[0], images / 255.0)
    expected = oracle_scores((images[:, 0] + images[:, 1]) / 2 / 255.0, heatmaps)
    np.testing.assert_allclose(scores["spearman"], expected, rtol=1e-6)
    assert scores["alignment_score"] == pytest.approx(expected.mean() / HUMAN_SPEARMAN_CEILING, rel=1e-6)


def test_evaluate_clickme_accepts_numpy_batches():
    model = tiny_model()
    batches = synthetic_batches(n_batches=1)
    as_numpy = [tuple(x.numpy() for x in batch) for batch in batches]
    # uint8 heatmaps (N, 1, H, W) as stored: averaged in float32 like float heatmaps
    as_uint8 = [(images, (heatmaps * 255).round().to(torch.uint8), labels) for images, heatmaps, labels in batches]
    np.testing.assert_allclose(
        evaluate_clickme(model, clickme_val_dataset=as_uint8, progress=False)["spearman"],
        evaluate_clickme(model, clickme_val_dataset=[(i, h.float(), l) for i, h, l in as_uint8], progress=False)["spearman"],
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        evaluate_clickme(model, clickme_val_dataset=as_numpy, progress=False)["spearman"],
        evaluate_clickme(model, clickme_val_dataset=batches, progress=False)["spearman"],
        rtol=1e-12,
    )


def test_evaluate_clickme_runs_float64_models_in_float64():
    batches = synthetic_batches(n_batches=1)
    model64 = tiny_model().double()
    scores = evaluate_clickme(model64, clickme_val_dataset=batches, progress=False)
    images, heatmaps, labels = batches[0]
    expected = oracle_scores(manual_saliency(model64, images.double(), labels), heatmaps[:, 0].double())
    np.testing.assert_allclose(scores["spearman"], expected, rtol=1e-12)


def test_evaluate_clickme_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="load_clickme_val"):
        evaluate_clickme(model)
    with pytest.raises(ValueError, match="no batches"):
        evaluate_clickme(model, clickme_val_dataset=[], progress=False)
    images, heatmaps, labels = synthetic_batches(1)[0]
    with pytest.raises(ValueError, match="triple"):
        evaluate_clickme(model, clickme_val_dataset=[(images, heatmaps)], progress=False)
    with pytest.raises(ValueError, match=r"`labels` must be one-hot rows of shape \(3, 5\)"):
        evaluate_clickme(model, clickme_val_dataset=[(images, heatmaps, labels[:, :4])], progress=False)
    with pytest.raises(ValueError, match="same shape"):
        evaluate_clickme(model, clickme_val_dataset=[(images, heatmaps[..., :-1], labels)], progress=False)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        evaluate_clickme(lambda x: x, clickme_val_dataset=[(images, heatmaps, labels)])


def test_evaluate_clickme_on_a_local_clickme_shard(tmp_path):
    # The loader's real batches: (N, 3, 224, 224) images 0..255, blurred human maps, one-hot labels.
    from harmonizer_fast.common import load_clickme_val
    from harmonizer_fast.common.clickme import write_clickme_shard

    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    heatmaps = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
    write_clickme_shard(tmp_path / "val-0.tfrecords", images, heatmaps, labels=[0, 1, 2, 3])
    loader = load_clickme_val(tmp_path, batch_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 1000))
    scores = evaluate_clickme(model, clickme_val_dataset=loader, preprocess_inputs=lambda x: x / 255.0, progress=False)
    expected = []
    for batch_images, batch_heatmaps, batch_labels in loader:
        human = batch_heatmaps.mean(dim=1) if batch_heatmaps.ndim == 4 else batch_heatmaps
        expected += list(oracle_scores(manual_saliency(model, batch_images / 255.0, batch_labels), human))
    assert len(scores["spearman"]) == 4
    np.testing.assert_allclose(scores["spearman"], expected, rtol=0, atol=1e-6)
    assert scores["alignment_score"] == pytest.approx(np.mean(expected) / HUMAN_SPEARMAN_CEILING, abs=1e-6)


def test_eval_cli_refuses_an_out_folder_with_earlier_results(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval-clickme", "--model", "test_resnet", "--sample", "--batch-size", "2", "--max-batches", "1",
            "--figure-images", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["alignment.png", "scores.csv", "summary.json"]
    with pytest.raises(SystemExit, match="already holds.*--overwrite"):
        main(argv)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite replaces them; without a figure the earlier one goes too (it showed another run)
    assert main(argv[:-5] + ["--figure-images", "0", "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scores.csv", "summary.json"]
    with pytest.raises(SystemExit, match="is a file"):
        main(argv[:-2] + [str(out / "scores.csv"), "--no-progress"])


@pytest.mark.parametrize("option", ["--max-batches", "--figure-images"])
def test_eval_cli_refuses_negative_counts(option, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:  # refused by the argument parser, before any work
        main(["eval-clickme", "--model", "test_resnet", "--sample", "--out", str(tmp_path / "unused"), option, "-1"])
    assert info.value.code == 2 and option in capsys.readouterr().err


def test_eval_cli_scores_an_untrained_model_the_same_every_run(tmp_path):
    argv = ["eval-clickme", "--model", "test_resnet", "--sample", "--batch-size", "2", "--max-batches", "1",
            "--figure-images", "0", "--no-progress", "--out"]
    torch.manual_seed(1)
    assert main(argv + [str(tmp_path / "a")]) == 0
    torch.manual_seed(2)  # whatever the caller's RNG state
    assert main(argv + [str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "scores.csv").read_text() == (tmp_path / "b" / "scores.csv").read_text()


def test_nan_images_and_mismatched_heatmaps_are_refused_in_the_batch_terms():
    model = tiny_model()
    images = torch.rand(2, 3, 16, 16) * 255
    labels = torch.eye(CLASSES)[:2]
    nan_images = images.clone()
    nan_images[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"`images` \(shape \(2, 3, 16, 16\)\) contains 1 non-finite"):
        evaluate_clickme(model, clickme_val_dataset=[(nan_images, torch.rand(2, 16, 16), labels)], progress=False)
    for heatmaps in (torch.rand(2, 8, 16), torch.rand(1, 16, 16)):
        with pytest.raises(ValueError, match=r"`heatmaps` must have the same shape as `images` \(2, 3, 16, 16\)"):
            evaluate_clickme(model, clickme_val_dataset=[(images, heatmaps, labels)], progress=False)


def test_eval_cli_reads_a_shard_folder(tmp_path):
    from harmonizer_fast.sample_data import SAMPLE_DIR

    out = tmp_path / "eval"
    assert main(["eval-clickme", "--model", "test_resnet", "--shards", str(SAMPLE_DIR / "val"), "--batch-size", "5",
                 "--figure-images", "0", "--out", str(out), "--no-progress"]) == 0  # as in the README
    assert len((out / "scores.csv").read_text().splitlines()) == 1 + 10


def test_a_preprocess_that_resizes_is_named_not_a_metric_shape_clash():
    # e.g. a timm transform resizing 224-px ClickMe images to a 299-px model's input size
    model = tiny_model()
    resize = lambda x: nn.functional.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    with pytest.raises(ValueError, match=r"explanations are 24 x 24 but the ClickMe maps 12 x 12: `preprocess_inputs`"):
        evaluate_clickme(model, clickme_val_dataset=synthetic_batches(n_batches=1), preprocess_inputs=resize,
                         progress=False)


def test_a_model_that_cannot_take_the_maps_size_is_named():
    # timm's fixed-size models assert their input size (BoTNet's assertion has no message at all)
    class FixedSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model()

        def forward(self, x):
            if x.shape[-1] != 256:
                raise AssertionError()
            return self.inner(x)

    with pytest.raises(ValueError, match=r"explaining a batch of images \(3, 3, 12, 12\) failed: "
                                         r"AssertionError: \(no message\); a model built for another input size"):
        evaluate_clickme(FixedSize(), clickme_val_dataset=synthetic_batches(n_batches=1), progress=False)
