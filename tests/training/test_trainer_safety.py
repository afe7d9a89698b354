"""A training run never destroys or fakes results: refusals, resume checks, torn logs, divergence, stale temporaries."""
import json
import os

import pytest
import torch

from harmonizer_fast.cli import main
from harmonizer_fast.training import checkpoint as ckpt
from harmonizer_fast.training.metrics_log import MetricsLogger
from harmonizer_fast.training.trainer import Trainer, TrainerConfig, TrainingDiverged
from tests.training._tiny import NUM_CLASSES, TinyNet, make_stream

TRAIN_ARGS = ["train", "--model", "test_resnet", "--sample", "--batch-size", "2", "--lr", "0.01",
              "--no-progress", "--num-classes", "1000", "--schedule", "constant"]


def _config(tmp_path, **overrides):
    base = dict(model="tiny", num_classes=NUM_CLASSES, batch_size=4, steps=2, lr=0.05, schedule="constant",
                output_dir=str(tmp_path), progress=False, seed=3)
    base.update(overrides)
    return TrainerConfig(**base)


def _trainer(tmp_path, **overrides):
    torch.manual_seed(0)
    return Trainer(TinyNet(), _config(tmp_path, **overrides), train_data=make_stream())


def test_rerun_without_resume_is_refused_and_keeps_the_run(tmp_path):
    _trainer(tmp_path).fit()
    before = (tmp_path / "last.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        _trainer(tmp_path).fit()
    assert ((tmp_path / "last.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_text()) == before
    rows = _trainer(tmp_path).fit(overwrite=True)  # explicit: starts again
    assert [r["step"] for r in rows] == [1, 2]


def test_cli_refuses_a_rerun_with_a_clear_message(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(TRAIN_ARGS + ["--steps", "1", "--output-dir", out]) == 0
    stamp = os.stat(os.path.join(out, "last.pt")).st_mtime_ns
    with pytest.raises(SystemExit, match="already holds a training run"):
        main(TRAIN_ARGS + ["--steps", "1", "--output-dir", out])
    assert os.stat(os.path.join(out, "last.pt")).st_mtime_ns == stamp
    assert main(TRAIN_ARGS + ["--steps", "1", "--output-dir", out, "--overwrite"]) == 0


@pytest.mark.parametrize("change", [dict(lr=0.1), dict(batch_size=2), dict(lambda_harmonization=0.5),
                                    dict(optimizer="adamw"), dict(lambda_weights=0.0)])
def test_resume_refuses_changes_that_break_exact_resumption(tmp_path, change):
    _trainer(tmp_path, steps=4).fit(steps=1)
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"cannot resume.*{key}"):
        _trainer(tmp_path, steps=4, **change).fit(resume=True)


def test_resume_allows_more_steps(tmp_path):
    _trainer(tmp_path, steps=2).fit()
    rows = _trainer(tmp_path, steps=3, log_every=1).fit(resume=True)
    assert [r["step"] for r in rows] == [3]


def test_cli_resume_with_another_optimizer_is_refused_not_a_keyerror(tmp_path):
    out = str(tmp_path / "run")
    assert main(TRAIN_ARGS + ["--steps", "1", "--output-dir", out]) == 0
    with pytest.raises(SystemExit, match="optimizer: 'sgd' -> 'adamw'"):
        main(TRAIN_ARGS + ["--steps", "2", "--output-dir", out, "--resume", "--optimizer", "adamw"])


def test_torn_last_metrics_line_is_repaired_on_resume(tmp_path):
    _trainer(tmp_path, steps=3).fit(steps=2)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "lr": 0.0')  # a crash mid-append
    with pytest.warns(RuntimeWarning, match="torn last line"):
        rows = _trainer(tmp_path, steps=3).fit(resume=True)
    assert [r["step"] for r in rows] == [3]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]


def test_a_corrupted_middle_line_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl.*line 2"):
        MetricsLogger.read_rows(path)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), -1.0, 0.0])
def test_learning_rate_must_be_finite_and_positive(tmp_path, lr):
    with pytest.raises(ValueError, match="`lr` must be a finite positive number"):
        _config(tmp_path, lr=lr)


def test_divergence_stops_and_keeps_the_good_checkpoint(tmp_path):
    _trainer(tmp_path, steps=1, lr=0.05).fit()
    trainer = _trainer(tmp_path, steps=6, lr=1e20, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="diverged at step|refusing to write checkpoint"):
        trainer.fit(overwrite=True)
    kept = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_cli_divergence_exits_non_zero(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(TRAIN_ARGS + ["--steps", "3", "--output-dir", str(tmp_path / "run"), "--lr", "1e12"])
    assert "diverged" in str(info.value.code)


def test_non_finite_weights_are_never_written(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit()
    good = (tmp_path / "last.pt").read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="refusing to write checkpoint"):
        trainer.save_checkpoint()
    assert (tmp_path / "last.pt").read_bytes() == good


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    _trainer(tmp_path, steps=2).fit(steps=1)
    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"\0" * 1024)
    unrelated = tmp_path / ".notes.txt.tmp"
    unrelated.write_text("mine")
    _trainer(tmp_path, steps=2).fit(resume=True)
    assert not stale.exists() and unrelated.exists()


def test_resume_to_fewer_steps_than_the_checkpoint_is_refused(tmp_path, capsys):
    _trainer(tmp_path, steps=2).fit()
    with pytest.raises(ValueError, match="at step 2, beyond `steps` 1"):
        _trainer(tmp_path, steps=1).fit(resume=True)  # used to return [] silently
    assert _trainer(tmp_path, steps=2).fit(resume=True) == []  # complete already: nothing to do
    out = str(tmp_path / "cli")
    assert main(TRAIN_ARGS + ["--steps", "1", "--output-dir", out]) == 0
    capsys.readouterr()
    assert main(TRAIN_ARGS + ["--steps", "1", "--output-dir", out, "--resume"]) == 0
    assert "nothing to train" in capsys.readouterr().out
