"""Timing helpers shared by the benchmark comparisons: medians measured side by side in one run."""
from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple


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


def measure_interleaved(fns: Sequence[Tuple[str, Callable[[], object]]], repeats: int = 5, warmup: int = 1,
                        before_run: Optional[Callable[[int], object]] = None,
                        after_run: Optional[Callable[[int], object]] = None) -> List[Timing]:
    """Each of the named ``fns`` ``warmup`` times (in order), then ``repeats`` rounds in which
    every variant runs once, the order rotated by one each round: a change of the machine's
    speed during the run falls on all variants alike (a block of runs per variant puts it on
    one). ``before_run(i)`` and ``after_run(i)`` run untimed around every run of variant ``i``
    (memory probes)."""
    def run(i: int) -> float:
        gc.collect()
        if before_run is not None:
            before_run(i)
        start = time.perf_counter()
        fns[i][1]()
        elapsed = time.perf_counter() - start
        if after_run is not None:
            after_run(i)
        return elapsed

    for i in range(len(fns)):
        for _ in range(warmup):
            run(i)
    times: List[List[float]] = [[] for _ in fns]
    for r in range(repeats):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            times[i].append(run(i))
    return [Timing(name, statistics.median(t), min(t), max(t), repeats) for (name, _), t in zip(fns, times)]


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
