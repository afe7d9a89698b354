"""Install files name packages by version: never a local file, a file:// URL or an absolute path."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL_FILES = sorted(
    [ROOT / "constraints.txt", ROOT / "pyproject.toml", *(ROOT / "scripts").glob("*.sh"), ROOT / ".ci" / "run"]
)
#: a file:// URL, a direct reference "name @ <path or url>", or an absolute path outside the repository
LOCAL = [
    (re.compile(r"file:", re.I), "a file: URL"),
    (re.compile(r"^\s*[A-Za-z0-9_.\-\[\]]+\s*@\s*\S", re.M), "a direct reference (name @ location)"),
    (re.compile(r"(?<![\w.$}])/(?:tmp|home|root|opt|mnt|work|var|srv|data|Users)/"), "an absolute path outside the repository"),
]


def _code_lines(path: Path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.split("#", 1)[0] if path.suffix in (".txt", ".sh", "") or path.name == "run" else line
        if stripped.strip():
            yield number, stripped


@pytest.mark.parametrize("path", INSTALL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_install_file_names_no_local_file(path):
    offenders = [f"{path.name}:{n}: {pattern[1]}: {line.strip()}"
                 for n, line in _code_lines(path) for pattern in LOCAL if pattern[0].search(line)]
    assert not offenders, "\n".join(offenders)


def test_the_check_catches_the_pin_that_broke_fresh_clones(tmp_path):
    bad = tmp_path / "constraints.txt"
    bad.write_text("simplejpeg @ file:///tmp/sj/simplejpeg-1.9.0-cp311.whl#sha256=00\nnumpy==2.4.6\n")
    hits = [n for n, line in _code_lines(bad) for pattern in LOCAL if pattern[0].search(line)]
    assert hits and set(hits) == {1}
    script = tmp_path / "setup.sh"
    script.write_text("pip install /home/me/wheels/torch.whl\n")
    assert [n for n, line in _code_lines(script) for pattern in LOCAL if pattern[0].search(line)] == [1]


def test_every_constraint_is_an_exact_version():
    for number, line in _code_lines(ROOT / "constraints.txt"):
        assert re.fullmatch(r"\s*[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+\s*", line), f"constraints.txt:{number}: {line!r}"
