"""harmonizer_fast: the neural harmonizer in PyTorch, fast.

Submodules mirror the reference packages: :mod:`harmonizer_fast.training`,
:mod:`harmonizer_fast.common`, :mod:`harmonizer_fast.evaluation`,
:mod:`harmonizer_fast.models` and :mod:`harmonizer_fast.neural`.
"""
from harmonizer_fast._ext import EXTENSION_ERROR, HAS_EXTENSION

__version__ = "0.1.0"

__all__ = ["HAS_EXTENSION", "EXTENSION_ERROR", "__version__"]
