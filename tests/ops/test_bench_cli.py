"""`harmonizer-fast bench`: finds the source checkout and passes --quick/--only to benchmarks/run_all.py."""
import argparse
import json
from pathlib import Path

import pytest

from harmonizer_fast import bench_cli
from harmonizer_fast.cli import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[2]


def parse(argv):
    return build_parser().parse_args(["bench", *argv])


def test_registered_and_finds_this_checkout():
    assert COMMANDS["bench"] == "harmonizer_fast.bench_cli"
    assert bench_cli.source_checkout() == REPO


def test_passes_quick_and_only_to_run_all(tmp_path):
    """A stand-in run_all records the arguments and working directory it was started with."""
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "run_all.py").write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, open('seen.json', 'w'))\n"
        "sys.exit(3)\n"
    )
    assert bench_cli.run(parse(["--quick", "--only", "ops", "train_step"]), root=tmp_path) == 3
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == {"argv": ["--quick", "--only", "ops", "train_step"], "cwd": str(tmp_path)}
    assert bench_cli.run(parse([]), root=tmp_path) == 3
    assert json.loads((tmp_path / "seen.json").read_text())["argv"] == []


def test_not_a_source_checkout(monkeypatch, tmp_path, capsys):
    fake_package = tmp_path / "site-packages" / "harmonizer_fast" / "bench_cli.py"
    monkeypatch.setattr(bench_cli, "__file__", str(fake_package))
    with pytest.raises(FileNotFoundError, match="source checkout"):
        bench_cli.source_checkout()
    assert bench_cli.run(argparse.Namespace(quick=False, only=None)) == 2
    assert "pip install -e ." in capsys.readouterr().err
