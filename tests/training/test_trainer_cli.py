"""`harmonizer-fast train` and `eval-clickme` on the bundled sample, and the data streams."""
import argparse
import csv
import json

import numpy as np
import pytest
import torch

from harmonizer_fast.cli import main
from harmonizer_fast.sample_data import sample_shards
from harmonizer_fast.training import checkpoint as ckpt
from harmonizer_fast.training import train_cli
from harmonizer_fast.training.data_mix import (
    ImageFolderRecords,
    MixedBatches,
    ShuffledBatches,
    build_train_stream,
    split_batch_size,
)
from tests.training._tiny import make_records

TRAIN_ARGS = ["train", "--model", "test_resnet", "--sample", "--batch-size", "2", "--lr", "0.01",
              "--no-progress", "--num-classes", "1000", "--schedule", "constant"]


def test_train_cli_resume_matches_straight_run(tmp_path):
    assert main(TRAIN_ARGS + ["--steps", "2", "--output-dir", str(tmp_path / "a")]) == 0
    assert main(TRAIN_ARGS + ["--steps", "1", "--output-dir", str(tmp_path / "b")]) == 0
    assert main(TRAIN_ARGS + ["--steps", "2", "--output-dir", str(tmp_path / "b"), "--resume"]) == 0
    a = ckpt.load_checkpoint(tmp_path / "a" / "last.pt")
    b = ckpt.load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 2 and a["data"] == b["data"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    rows = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]


def test_eval_cli_writes_scores_figure_and_matches_evaluate_clickme(tmp_path):
    from harmonizer_fast.common import ClickMeRecords
    from harmonizer_fast.evaluation import evaluate_clickme
    from harmonizer_fast.models import create_model, preprocess_input

    torch.manual_seed(0)
    model = create_model("test_resnet")
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "eval"
    assert main(["eval-clickme", "--model", "test_resnet", "--weights", str(weights), "--sample", "--batch-size", "4",
                 "--figure-images", "3", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    records = ClickMeRecords(sample_shards("val"), progress=False)
    assert len(rows) == len(records) == 10
    batch = records.get_batch(range(len(records)))
    want = evaluate_clickme(model.eval(), clickme_val_dataset=[tuple(batch[:3])], preprocess_inputs=preprocess_input,
                            progress=False)
    np.testing.assert_allclose([float(r["spearman"]) for r in rows], want["spearman"], rtol=1e-5, atol=1e-6)
    assert [int(r["label"]) for r in rows] == batch.labels.argmax(1).tolist()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["alignment_score"] == pytest.approx(want["alignment_score"], rel=1e-5)
    assert (out / "alignment.png").stat().st_size > 10_000


def _write_folder(root, classes=(3, 4), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / str(c) / f"{i}.png")


def test_image_folders_have_zero_tokens_and_mix_resumably(tmp_path):
    _write_folder(tmp_path / "imgs")
    folders = ImageFolderRecords(tmp_path / "imgs", image_size=32, num_classes=5)
    batch = folders.get_batch([0, 4])
    assert batch.images.shape == (2, 3, 32, 32) and batch.tokens.tolist() == [0.0, 0.0]
    assert batch.labels.argmax(1).tolist() == [3, 4] and float(batch.heatmaps.abs().sum()) == 0.0
    clickme = make_records(n=12)
    mixed = MixedBatches([ShuffledBatches(clickme, 3, seed=1), ShuffledBatches(folders, 1, seed=2)])
    it = iter(mixed)
    first = [next(it) for _ in range(5)]
    assert first[0].images.shape[0] == 4 and first[0].tokens.tolist() == [1.0, 1.0, 1.0, 0.0]
    state = mixed.state_dict()
    expected = [next(it) for _ in range(3)]
    again = MixedBatches([ShuffledBatches(clickme, 3, seed=1), ShuffledBatches(folders, 1, seed=2)])
    again.load_state_dict(state)
    it2 = iter(again)
    for want in expected:
        got = next(it2)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_split_batch_size_and_stream_builder(tmp_path):
    assert split_batch_size(8, 0.25) == (6, 2)
    assert split_batch_size(8, 0.25, world_size=2) == (6, 2)
    assert split_batch_size(4, 0.01) == (3, 1)
    with pytest.raises(ValueError, match="folder_fraction"):
        split_batch_size(8, 1.0)
    with pytest.raises(ValueError, match="needs ClickMe records"):
        build_train_stream(None, 4)
    # one of the two without the other would be silently ignored
    with pytest.raises(ValueError, match="folder_fraction` 0, so none of their images"):
        build_train_stream(make_records(n=12), 4, image_folders=[tmp_path / "imgs"])
    with pytest.raises(ValueError, match="no `image_folders`"):
        build_train_stream(make_records(n=12), 4, folder_fraction=0.25)
    with pytest.raises(ValueError, match="class index"):
        (tmp_path / "cats").mkdir()
        (tmp_path / "cats" / "a.png").write_bytes(b"")
        ImageFolderRecords(tmp_path)


def test_shuffled_batches_cover_each_epoch_and_split_over_ranks():
    records = make_records(n=12)
    stream = ShuffledBatches(records, 4, seed=3)
    it = iter(stream)
    epoch = torch.cat([next(it).images for _ in range(3)])
    assert sorted(epoch[:, 0, 0, 0].tolist()) == sorted(records.images[:, 0, 0, 0].tolist())
    assert stream.state_dict() == {"epoch": 0, "position": 3, "seed": 3}
    next(it)
    assert stream.state_dict()["epoch"] == 1
    halves = [next(iter(ShuffledBatches(records, 4, seed=3, rank=r, world_size=2))).images for r in (0, 1)]
    whole = next(iter(ShuffledBatches(records, 4, seed=3))).images
    assert torch.equal(torch.cat(halves), whole)


@pytest.mark.parametrize("option", ["--eval-every", "--eval-batches"])
def test_train_refuses_negative_evaluation_counts(tmp_path, option, capsys):
    # --eval-batches -1 used to fail in islice only after training, when the evaluation ran
    with pytest.raises(SystemExit) as info:
        main(TRAIN_ARGS + ["--steps", "1", "--output-dir", str(tmp_path / "run"), option, "-1"])
    assert info.value.code == 2 and option in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_loss_backend_is_checked_with_the_config_and_every_option_has_help(tmp_path, capsys):
    from harmonizer_fast.training import TrainerConfig

    with pytest.raises(ValueError, match="`loss_backend` must be one of .*got 'cuda'"):
        TrainerConfig(loss_backend="cuda")  # was accepted, then failed at the first training step
    assert TrainerConfig(loss_backend="torch").loss_backend == "torch"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--loss-backend {auto,triton,torch}" in capsys.readouterr().out
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    bare = [a.option_strings[0] for a in parser._actions if a.help and a.help.startswith("(default")]
    assert bare == []  # every option says what it is, not only its default
