"""The process heap's policy toward freed memory: give it back during long streaming loops
(:func:`release_freed_memory`), keep it for the next step while training
(:func:`keep_freed_memory`).

Why this exists: scoring every layer streams thousands of image batches; each batch allocates
large short-lived activations (tens of MB) and a few small long-lived chunks of stored
features. glibc places the long-lived chunks inside the space the freed activations leave, so the
next batch's activations rarely fit in one hole and the heap grows instead: measured on ViT-B/16,
RSS grew by ~70 MB per batch of 32 while only ~6.5 MB per batch was kept (8.1 GiB after ~1,300
images). ``malloc_trim(0)`` releases the free pages inside the heap (not only at its top), which
keeps RSS at what is actually held. Other C libraries need no help here; the call is a no-op.

Training is the opposite case: every step allocates and frees the same ~100 MB of temporaries
(a harmonized ViT-Tiny step at batch 8), and by default glibc returns the freed top of the heap
and larger blocks to the OS, so the next step takes them back page by page: 15-50 thousand minor
page faults per step at ~1.5 us each in the VMs measured (a plain step of the same model: none).
``keep_freed_memory`` sets the thresholds so that those pages stay with the process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Callable, Optional

__all__ = ["keep_freed_memory", "keeps_freed_memory", "release_freed_memory"]


def _glibc_function(name: str, argtypes) -> Optional[Callable[..., int]]:
    """glibc's ``name`` (None elsewhere: musl has neither malloc_trim nor these mallopt options)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_MALLOC_TRIM = _glibc_function("malloc_trim", [ctypes.c_size_t])
_MALLOPT = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])
# <malloc.h>: M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap (glibc's largest dynamic threshold on 64 bits)
KEEP_MMAP_THRESHOLD = 32 << 20
#: free memory at the heap's top is returned to the OS only above this (mallopt takes an int)
KEEP_TRIM_THRESHOLD = (1 << 31) - 1
_KEEPING = False  # set by keep_freed_memory


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``); True when it could.

    Costs about a millisecond; call it once per batch in loops that keep small results while
    freeing large temporaries.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def keep_freed_memory() -> bool:
    """Keep freed memory in the process for later allocations (glibc ``mallopt``: blocks up to
    :data:`KEEP_MMAP_THRESHOLD` from the heap, the heap's free top kept up to
    :data:`KEEP_TRIM_THRESHOLD`); True when set, False where the C library is not glibc.

    Process-wide and lasting (glibc has no way back to its adaptive thresholds): resident memory
    stays near the largest step's peak instead of falling between steps; the peak itself does not
    grow. :func:`release_freed_memory` still returns free pages when called.
    """
    global _KEEPING
    if _MALLOPT is None:
        return False
    _KEEPING = bool(_MALLOPT(_M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)) and bool(
        _MALLOPT(_M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
    return _KEEPING



def keeps_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` has set this process's heap to keep freed memory (then a
    fresh large tensor costs its writes, not also its page faults)."""
    return _KEEPING
