"""ImageNet top-1/top-5 on small validation folders the tests write, in both layouts.

The model is a colour classifier whose predictions the test knows: class k's logit is minus the
squared distance between the image's mean (normalised) colour and class k's colour, so each
image is predicted as the class of its colour. A few images are put in the wrong class folder on
purpose, so the expected top-1 is below 100 %.
"""
import csv

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from harmonizer_fast import cli
from harmonizer_fast.evaluation.imagenet import (
    evaluate_imagenet,
    imagenet_samples,
    imagenet_synsets,
    write_accuracy_csv,
)
from harmonizer_fast.zoo.results import load_accuracy_csv

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
#: class index -> solid colour of its images
COLOURS = {3: (230, 30, 30), 207: (30, 200, 40), 511: (40, 60, 220), 999: (240, 240, 40)}


class ColourClassifier(nn.Module):
    """Logit of class k = -|mean colour - colour_k|^2 (normalised with MEAN/STD); others far away."""

    def __init__(self, input_size: int = 40) -> None:
        super().__init__()
        targets = torch.full((1000, 3), 50.0)
        for k, rgb in COLOURS.items():
            targets[k] = (torch.tensor(rgb) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
        self.register_buffer("targets", targets)
        self.scale = nn.Parameter(torch.ones(()))
        # timm's resolve_model_data_config reads this: the test checks it is honoured.
        self.pretrained_cfg = {"input_size": (3, input_size, input_size), "mean": MEAN, "std": STD,
                               "crop_pct": 1.0, "interpolation": "bilinear"}
        self.seen_shapes = []

    def forward(self, x):
        self.seen_shapes.append(tuple(x.shape[1:]))
        colour = x.mean(dim=(2, 3))
        return -self.scale * ((colour[:, None, :] - self.targets[None]) ** 2).sum(-1)


def _write(path, rgb, size=(48, 36)):
    Image.fromarray(np.full((size[1], size[0], 3), rgb, np.uint8)).save(path)


def _class_folders(root, names):
    """3 images per class; class 3's folder also holds one class-207-coloured image (a known miss)."""
    wnids = imagenet_synsets()
    for k, rgb in COLOURS.items():
        folder = root / (wnids[k] if names == "wnid" else str(k))
        folder.mkdir(parents=True)
        for i in range(3):
            _write(folder / f"img{i}.png", rgb)
    _write(root / (wnids[3] if names == "wnid" else "3") / "wrong.jpg", COLOURS[207])
    return 13, 12  # images, right at top-1


@pytest.mark.parametrize("names", ["wnid", "index"])
def test_class_folders_give_the_known_accuracy(tmp_path, names):
    n, right = _class_folders(tmp_path / "val", names)
    samples, layout = imagenet_samples(tmp_path / "val")
    assert layout == "class-folders" and len(samples) == n
    assert sorted({label for _, label in samples}) == sorted(COLOURS)
    model = ColourClassifier()
    result = evaluate_imagenet(model, tmp_path / "val", batch_size=5, num_workers=0, progress=False)
    assert result.top1 == pytest.approx(100.0 * right / n)
    assert result.top5 == 100.0  # the true class is always among the 4 coloured classes
    assert not result.estimate and result.images == result.total == n
    # The model's own data config: 40 px input (crop_pct 1), its mean/std.
    assert set(model.seen_shapes) == {(3, 40, 40)}
    assert result.data_config["mean"] == list(MEAN) and result.data_config["input_size"] == [3, 40, 40]


def test_limit_is_an_estimate_spread_over_the_set(tmp_path):
    n, _ = _class_folders(tmp_path / "val", "index")
    result = evaluate_imagenet(ColourClassifier(), tmp_path / "val", limit=4, num_workers=0, progress=False)
    assert result.images == 4 and result.total == n and result.estimate
    assert "ESTIMATE from 4 of 13 images" in result.describe()


def _flat(root, numbered_colours):
    root.mkdir(parents=True)
    for number, rgb in numbered_colours:
        _write(root / f"ILSVRC2012_val_{number:08d}.JPEG", rgb)


def test_flat_layout_with_devkit_ground_truth_and_meta(tmp_path):
    from scipy.io import savemat

    wnids = imagenet_synsets()
    # devkit IDs are not the sorted order: give classes IDs in another order on purpose.
    devkit_id = {3: 17, 207: 1, 511: 900, 999: 42}
    truth = [3, 207, 207, 511, 999, 3]  # class of val image 1..6
    colours = [COLOURS[k] for k in truth]
    colours[5] = COLOURS[511]  # image 6 is labelled 3 but looks like 511: a known miss
    root = tmp_path / "ILSVRC2012_img_val"
    _flat(root, list(enumerate(colours, start=1)))
    devkit = tmp_path / "devkit" / "data"
    devkit.mkdir(parents=True)
    labels = devkit / "ILSVRC2012_validation_ground_truth.txt"
    labels.write_text("".join(f"{devkit_id[k]}\n" for k in truth))
    synsets = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    for i, k in enumerate(COLOURS):
        synsets[i] = (devkit_id[k], wnids[k])
    savemat(str(devkit / "meta.mat"), {"synsets": synsets})

    samples, layout = imagenet_samples(root, labels)
    assert layout == "flat" and [label for _, label in samples] == truth
    result = evaluate_imagenet(ColourClassifier(), root, labels=labels, num_workers=0, progress=False)
    assert result.top1 == pytest.approx(100.0 * 5 / 6)

    (devkit / "meta.mat").unlink()
    with pytest.raises(FileNotFoundError, match="meta.mat"):
        imagenet_samples(root, labels)


@pytest.mark.parametrize("kind", ["val.txt", "LOC_val_solution.csv"])
def test_flat_layout_with_found_labels_file(tmp_path, kind):
    wnids = imagenet_synsets()
    truth = {1: 999, 2: 3, 3: 511}
    root = tmp_path / "val"
    _flat(root, [(i, COLOURS[k]) for i, k in truth.items()])
    if kind == "val.txt":  # caffe style, 0-based indices; found in the parent folder
        (tmp_path / kind).write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {k}\n" for i, k in truth.items()))
    else:
        (root / kind).write_text("ImageId,PredictionString\n" + "".join(
            f"ILSVRC2012_val_{i:08d},{wnids[k]} 1 2 3 4\n" for i, k in truth.items()))
    samples, layout = imagenet_samples(root)
    assert layout == "flat" and [label for _, label in samples] == list(truth.values())
    result = evaluate_imagenet(ColourClassifier(), root, num_workers=0, progress=False)
    assert result.top1 == 100.0


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        imagenet_samples(tmp_path / "missing")
    _flat(tmp_path / "flat", [(1, COLOURS[3])])
    with pytest.raises(FileNotFoundError, match="no labels file"):
        imagenet_samples(tmp_path / "flat")
    (tmp_path / "odd" / "cats").mkdir(parents=True)
    _write(tmp_path / "odd" / "cats" / "a.png", COLOURS[3])
    with pytest.raises(ValueError, match="'cats' is neither"):
        imagenet_samples(tmp_path / "odd")
    _class_folders(tmp_path / "val", "index")
    with pytest.raises(ValueError, match="`limit`"):
        evaluate_imagenet(ColourClassifier(), tmp_path / "val", limit=0)


def test_accuracy_csv_feeds_the_sweep_and_keeps_other_rows(tmp_path):
    _class_folders(tmp_path / "val", "index")
    result = evaluate_imagenet(ColourClassifier(), tmp_path / "val", num_workers=0, progress=False)
    out = tmp_path / "top1.csv"
    write_accuracy_csv({"colour_a": result}, out, data_dir=tmp_path / "val")
    write_accuracy_csv({"colour_b": result}, out)
    assert load_accuracy_csv(str(out)) == {"colour_a": result.top1, "colour_b": result.top1}
    with pytest.raises(FileExistsError, match="colour_a"):
        write_accuracy_csv({"colour_a": result}, out)
    rows = list(csv.DictReader(open(out)))
    assert rows[0]["estimate"] == "false" and rows[0]["images"] == "13"


def test_cli_writes_the_csv_and_says_estimate(tmp_path, capsys):
    _class_folders(tmp_path / "val", "index")
    out = tmp_path / "acc.csv"
    code = cli.main(["eval-imagenet", "--model", "test_resnet", "--data", str(tmp_path / "val"), "--limit", "5",
                     "--workers", "0", "--batch-size", "4", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "ESTIMATE from 5 of 13 images" in text
    (row,) = csv.DictReader(open(out))
    assert row["model"] == "test_resnet" and row["estimate"] == "true" and 0.0 <= float(row["top1"]) <= 100.0


def test_cli_refuses_an_existing_row_before_evaluating(tmp_path, monkeypatch):
    from harmonizer_fast.zoo import imagenet_cli

    def must_not_run(*args, **kwargs):
        raise AssertionError("the evaluation ran before the CSV was checked")

    monkeypatch.setattr(imagenet_cli, "evaluate_imagenet", must_not_run)
    _class_folders(tmp_path / "val", "index")
    out = tmp_path / "acc.csv"
    out.write_text("model,top1\ntest_resnet,12.5\n")
    argv = ["eval-imagenet", "--model", "test_resnet", "--data", str(tmp_path / "val"), "--out", str(out), "--no-progress"]
    with pytest.raises(SystemExit, match="already has the accuracy of 'test_resnet'.*--overwrite"):
        cli.main(argv)
    assert out.read_text() == "model,top1\ntest_resnet,12.5\n"
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(SystemExit, match="needs columns model, top1"):
        cli.main(argv[:-2] + [str(notes), "--no-progress"])
    with pytest.raises(SystemExit, match="is a folder"):
        cli.main(argv[:-2] + [str(tmp_path), "--no-progress"])
    assert notes.read_text() == "my notes\n"
