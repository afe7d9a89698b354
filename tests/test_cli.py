"""`harmonizer-fast`: an error about the user's input is one line naming it, not a traceback."""
import pytest

from harmonizer_fast import cli


def test_a_missing_path_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    missing = tmp_path / "no_such_shards"
    argv = ["eval-clickme", "--model", "test_resnet", "--shards", str(missing), "--out", str(tmp_path / "out"),
            "--no-progress"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    message = str(info.value.code)
    assert message.startswith("harmonizer-fast eval-clickme: error: FileNotFoundError")
    assert str(missing) in message and cli.TRACEBACK_ENV in message
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")  # the traceback on request
    with pytest.raises(FileNotFoundError, match="no_such_shards"):
        cli.main(argv)
