"""Run a closed-form double backward through its C++ kernel (counting the calls) or, with the
extension hidden from its module, through the torch formulas."""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import pytest

KERNEL_PATHS = ["fused kernel", "torch ops"]


class CountingExtension:
    """Stands in for ``harmonizer_fast._C`` and counts the calls of the functions named ``prefix*``
    (``prefix``: a string or a tuple of them)."""

    def __init__(self, real, prefix: str):
        self.real, self.prefix, self.calls = real, prefix, 0

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if not name.startswith(self.prefix):
            return attr

        def counted(*args):
            self.calls += 1
            return attr(*args)

        return counted


def kernel_path(path: str, monkeypatch, module: ModuleType, prefix) -> Optional[CountingExtension]:
    """Set ``module._C`` for ``path`` (one of :data:`KERNEL_PATHS`); the counter, or None for torch."""
    if path == "torch ops":
        monkeypatch.setattr(module, "_C", None)
        return None
    if module._C is None:
        pytest.skip("the C++ extension is not built")
    counter = CountingExtension(module._C, prefix)
    monkeypatch.setattr(module, "_C", counter)
    return counter
