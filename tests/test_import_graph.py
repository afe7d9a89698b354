"""The import graph points one way: the floor, then common/ops/neural/evaluation/models, then training/zoo."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "harmonizer_fast"

#: room -> rooms it must never load (directly or through anything it imports).
FORBIDDEN = {
    "harmonizer_fast.spec": ["training", "zoo", "ops", "common", "neural", "evaluation", "models"],
    "harmonizer_fast.ops": ["training", "zoo", "common", "neural", "evaluation", "models"],
    "harmonizer_fast.common": ["training", "zoo", "ops", "neural", "models"],
    "harmonizer_fast.evaluation": ["training", "zoo"],
    "harmonizer_fast.neural": ["training", "zoo"],
    "harmonizer_fast.models": ["training", "zoo"],
}


def _modules_loaded_by(module: str) -> list:
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('harmonizer_fast'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_lower_rooms_never_load_higher_ones(module):
    loaded = _modules_loaded_by(module)
    bad = [m for m in loaded for room in FORBIDDEN[module] if m == f"harmonizer_fast.{room}" or m.startswith(f"harmonizer_fast.{room}.")]
    assert not bad, f"importing {module} in a fresh interpreter loaded {bad}"


def test_spec_imports_nothing_of_the_package():
    tree = ast.parse((PACKAGE / "spec.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name.startswith("harmonizer_fast")]


def _imports_of(path: Path) -> list:
    tree = ast.parse(path.read_text())
    names = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    names += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    return [n for n in names if n.startswith("harmonizer_fast.")]


@pytest.mark.parametrize("room", ["ops", "common", "neural", "evaluation", "models"])
def test_no_source_arrow_into_training_or_zoo(room):
    """Also lazy imports inside functions: every import statement of the room's files."""
    offenders = {
        str(path.relative_to(PACKAGE)): [n for n in _imports_of(path) if n.split(".")[1] in ("training", "zoo")]
        for path in (PACKAGE / room).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}
