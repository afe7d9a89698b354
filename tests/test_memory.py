"""release_freed_memory: returns heap pages that fragmentation would otherwise keep."""
import ctypes
import subprocess
import sys

import pytest

from harmonizer_fast import _memory
from harmonizer_fast._memory import release_freed_memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


@pytest.mark.skipif(_memory._MALLOC_TRIM is None, reason="needs glibc malloc_trim")
def test_release_freed_memory_returns_pages_between_kept_blocks():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 96 KB blocks stay below glibc's initial mmap threshold, so they live in the heap; freeing
    # every other one leaves holes pinned between kept blocks: the streaming-loop pattern in
    # miniature (free() alone cannot return them, only the top of the heap).
    blocks = []
    for _ in range(400):
        block = libc.malloc(96 << 10)
        ctypes.memset(block, 1, 96 << 10)
        blocks.append(block)
    for block in blocks[::2]:
        libc.free(block)
    before = _rss_bytes()
    assert release_freed_memory() is True
    released = before - _rss_bytes()
    for block in blocks[1::2]:
        libc.free(block)
    # 200 holes x 96 KB = 18.75 MiB are free inside the heap; most of it must go back.
    assert released > 12 << 20, f"released only {released / 2**20:.1f} MiB"

def test_release_freed_memory_is_a_safe_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(_memory, "_MALLOC_TRIM", None)
    assert release_freed_memory() is False


_FAULTS_SCRIPT = r"""
import ctypes, resource, sys
from harmonizer_fast import _memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert _memory.keep_freed_memory() is True

def cycle():  # a step's temporaries: eight 4 MB blocks allocated, written, all freed
    blocks = [libc.malloc(4 << 20) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, 4 << 20)
    for block in blocks:
        libc.free(block)

cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(_memory._MALLOPT is None, reason="needs glibc mallopt")
def test_keep_freed_memory_stops_page_faulting_a_repeated_allocation():
    # fresh processes: the thresholds are process-wide and cannot be set back
    faults = {}
    for mode in ("default", "keep"):
        run = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        faults[mode] = int(run.stdout.strip())
    # by default glibc returns the freed 32 MB (more than twice its adaptive threshold, the
    # largest block) each time: 8192 faults per cycle
    assert faults["default"] > 5 * 6000, faults
    assert faults["keep"] < 200, faults


def test_keep_freed_memory_is_a_safe_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(_memory, "_MALLOPT", None)
    assert _memory.keep_freed_memory() is False
