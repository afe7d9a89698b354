import os

import pytest

from harmonizer_fast._io import atomic_open, atomic_write_text


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "table.csv"
    atomic_write_text(path, "a,b\n1,2\n")
    atomic_write_text(path, "a,b\n3,4\n")
    assert path.read_text() == "a,b\n3,4\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path, "wb") as handle:
            handle.write(b"half of the new")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]


def test_bad_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):
            pass
