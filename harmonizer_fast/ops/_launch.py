"""Launch geometry shared by the fused ops (block sizes for GPU and for the interpreter)."""
from __future__ import annotations

import triton

from harmonizer_fast.ops._dispatch import interpreter_enabled

#: Elements per program on a GPU: small enough for many programs per map (the reductions
#: are split across programs and combined from partials), large enough for wide loads.
GPU_BLOCK = 1024
#: The interpreter runs each program as NumPy array code: one large block per map is
#: far faster than many small ones.
INTERPRETER_BLOCK = 65536


def block_size(n_elements: int) -> int:
    """Power-of-two block covering ``n_elements`` up to the backend's cap."""
    cap = INTERPRETER_BLOCK if interpreter_enabled() else GPU_BLOCK
    return max(16, min(triton.next_power_of_2(max(n_elements, 1)), cap))


def partials_block(n_blocks: int) -> int:
    """Power-of-two width (at least 2) for loading a map's ``n_blocks`` per-block partial sums."""
    return max(2, triton.next_power_of_2(n_blocks))


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4
