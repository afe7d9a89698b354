"""Loader for the compiled extension ``harmonizer_fast._C``.

The package must stay importable when the extension failed to build or load: every
fast path checks :data:`HAS_EXTENSION` and falls back to its pure Python/torch
reference, and the reason is kept in :data:`EXTENSION_ERROR` (and reported once).
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Optional

_C: Optional[ModuleType]
EXTENSION_ERROR: Optional[str] = None

if os.environ.get("HARMONIZER_FAST_DISABLE_EXTENSION", "") == "1":
    _C = None
    EXTENSION_ERROR = "disabled by HARMONIZER_FAST_DISABLE_EXTENSION=1"
else:
    try:
        from harmonizer_fast import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # pragma: no cover - depends on the build
        _C = None
        EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

HAS_EXTENSION: bool = _C is not None
_warned = False


def extension() -> Optional[ModuleType]:
    """Return the compiled module, or ``None`` (warning once) when it is unavailable."""
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            "harmonizer_fast._C (C++ extension) is not available, using the slower "
            f"NumPy fallbacks. Reason: {EXTENSION_ERROR}. Reinstall with "
            "`pip install -e .` and a C++17 compiler to enable it.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _C
