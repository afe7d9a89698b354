"""Timing helpers shared by the benchmark comparisons: medians measured side by side in one run."""
from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence


@dataclass
class Timing:
    """Median and spread of repeated wall-clock runs of one variant."""

    name: str
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    extra: Dict[str, str] = field(default_factory=dict)


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, name: str = "",
            setup: Optional[Callable[[], object]] = None) -> Timing:
    """Run ``fn`` ``warmup`` times, then ``repeats`` timed times; report the median. ``setup``
    runs untimed before every run (e.g. evicting the caches)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(name, statistics.median(times), min(times), max(times), repeats)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass
class Comparison:
    """One benchmark case: a baseline and candidate timings of the same work."""

    case: str
    baseline: Timing
    candidates: List[Timing]
    note: str = ""


def format_table(comparisons: Sequence[Comparison], title: Optional[str] = None) -> str:
    """Markdown table: one row per variant, median time and speed-up over the case's baseline."""
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += ["| case | variant | median | min | speed-up vs baseline | note |", "|---|---|---|---|---|---|"]
    for comp in comparisons:
        for t in [comp.baseline, *comp.candidates]:
            ratio = comp.baseline.median_s / t.median_s if t.median_s > 0 else float("inf")
            extra = ", ".join(f"{k}={v}" for k, v in t.extra.items())
            note = "; ".join(x for x in (comp.note if t is comp.baseline else "", extra) if x)
            lines.append(
                f"| {comp.case} | {t.name}{' (baseline)' if t is comp.baseline else ''} | "
                f"{_fmt(t.median_s)} | {_fmt(t.min_s)} | {ratio:.2f}x | {note} |"
            )
    return "\n".join(lines)


def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"
