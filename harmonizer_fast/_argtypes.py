"""argparse types shared by the command-line tools: a bad value is refused with the value named."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (``--batch-size 0`` would loop forever or divide by zero; ``--image-size 0``
    would build an empty input)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0, for counts where 0 means "all" or "none" (``--max-batches -1`` would
    silently drop the last batch through a negative slice)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value
