"""argparse types shared by the command-line tools: a bad value is refused with the value named."""
from __future__ import annotations

import argparse


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (``--batch-size 0`` would loop forever or divide by zero; ``--image-size 0``
    would build an empty input)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0, for counts where 0 means "all" or "none" (``--max-batches -1`` would
    silently drop the last batch through a negative slice)."""
    return _int_at_least(text, 0)
