import os

# The Triton interpreter must be selected before any @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import numpy as np
import pytest

# Outputs of the real TensorFlow reference code (see tests/fixtures/reference/README.md),
# committed so that a clean clone tests against them.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.exists():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


def load_fixture(name: str):
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} not found")
    return np.load(path)
