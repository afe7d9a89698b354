"""Alignment metrics on 224x224 maps: the package vs the reference's per-map SciPy/NumPy loops.

The baseline is a transcription of ``harmonization.evaluation.metrics``: cast to float32,
then for each map pair ``scipy.stats.spearmanr`` on the flattened maps, or two
``np.percentile`` calls, float32 masks and their sums for Dice / IoU. The candidates are
the package functions (C++ extension: radix-sort ranks, sampled selection, OpenMP over
maps) and the same functions with the extension disabled (vectorised NumPy/SciPy
fallback). :func:`compare` checks that every variant gives the reference's values (Dice
and IoU bit-identical, Spearman within 1e-12) before timing.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Dict, Iterator, List, Tuple
from unittest import mock

import numpy as np
from scipy.stats import spearmanr

from benchmarks._timing import Comparison, Timing, measure
from harmonizer_fast.evaluation import dice, intersection_over_union, spearman_correlation
from harmonizer_fast.evaluation import metrics as metrics_module

SIZE = 224
EPSILON = 1e-9


# --------------------------------------------------------------------------- reference loops

def reference_spearman(heatmaps_a: np.ndarray, heatmaps_b: np.ndarray) -> np.ndarray:
    """The reference ``spearman_correlation``: scipy.stats.spearmanr map by map."""
    heatmaps_a, heatmaps_b = heatmaps_a.astype(np.float32), heatmaps_b.astype(np.float32)
    return np.array([spearmanr(ha.flatten(), hb.flatten())[0] for ha, hb in zip(heatmaps_a, heatmaps_b)])


def _reference_masks(ha: np.ndarray, hb: np.ndarray, percentile: int) -> Tuple[np.ndarray, np.ndarray]:
    ha = (ha > np.percentile(ha, 100 - percentile, (0, 1))).astype(np.float32)
    hb = (hb > np.percentile(hb, 100 - percentile, (0, 1))).astype(np.float32)
    return ha, hb


def reference_dice(heatmaps_a: np.ndarray, heatmaps_b: np.ndarray, percentile: int = 10) -> np.ndarray:
    """The reference ``dice``: per map, percentile masks, ``2 sum(a b) / (sum(a + b) + eps)``."""
    heatmaps_a, heatmaps_b = heatmaps_a.astype(np.float32), heatmaps_b.astype(np.float32)
    scores = []
    for ha, hb in zip(heatmaps_a, heatmaps_b):
        ha, hb = _reference_masks(ha, hb, percentile)
        scores.append(2.0 * np.sum(ha * hb) / (np.sum(ha + hb) + EPSILON))
    return np.array(scores)


def reference_iou(heatmaps_a: np.ndarray, heatmaps_b: np.ndarray, percentile: int = 10) -> np.ndarray:
    """The reference ``intersection_over_union``: per map, percentile masks, and / or counts."""
    heatmaps_a, heatmaps_b = heatmaps_a.astype(np.float32), heatmaps_b.astype(np.float32)
    scores = []
    for ha, hb in zip(heatmaps_a, heatmaps_b):
        ha, hb = _reference_masks(ha, hb, percentile)
        scores.append(np.sum(np.logical_and(ha, hb)) / (np.sum(np.logical_or(ha, hb)) + EPSILON))
    return np.array(scores)


# --------------------------------------------------------------------------- inputs and checks

def make_maps(n_maps: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Correlated float32 (N, 224, 224) maps: a uniform, b = 0.6 a + 0.4 uniform."""
    rng = np.random.default_rng(seed)
    a = rng.random((n_maps, SIZE, SIZE), dtype=np.float32)
    b = (0.6 * a + 0.4 * rng.random((n_maps, SIZE, SIZE), dtype=np.float32)).astype(np.float32)
    return a, b


@contextlib.contextmanager
def numpy_fallback() -> Iterator[None]:
    """Run the package functions as if the C++ extension were not built."""
    with mock.patch.object(metrics_module, "extension", lambda: None):
        yield


def _fallback(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with numpy_fallback():
            return fn(a, b)

    return run


#: metric -> (reference loop, package function)
METRICS: Dict[str, Tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]] = {
    "spearman": (reference_spearman, spearman_correlation),
    "dice": (reference_dice, dice),
    "iou": (reference_iou, intersection_over_union),
}


def check_equal(name: str, expected: np.ndarray, got: np.ndarray) -> None:
    """Dice/IoU must be bit-identical (same dtype); Spearman equal to 1e-12."""
    if name == "spearman":
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    else:
        assert got.dtype == expected.dtype, (name, got.dtype, expected.dtype)
        np.testing.assert_array_equal(got, expected)


def measure_with_cpu(fn: Callable[[], object], repeats: int, warmup: int, name: str) -> Timing:
    """:func:`measure` plus the median process CPU time (all threads) of the timed runs.

    On a shared machine the wall-clock time includes waiting for a core; the CPU time does
    not, and for the OpenMP variants it shows the work summed over threads.
    """
    cpu: List[float] = []

    def timed() -> None:
        start = time.process_time()
        fn()
        cpu.append(time.process_time() - start)

    timing = measure(timed, repeats=repeats, warmup=warmup, name=name)
    timing.extra["cpu"] = f"{statistics.median(cpu[warmup:]):.3f} s"
    return timing


def compare(quick: bool = False) -> Tuple[str, List[Comparison]]:
    n_maps = 200 if quick else 1000
    repeats = 3
    a, b = make_maps(n_maps)
    comparisons = []
    for name, (reference, package) in METRICS.items():
        expected = reference(a, b)
        variants = {"package (C++)": package, "package (NumPy fallback)": _fallback(package)}
        for fn in variants.values():
            check_equal(name, expected, fn(a, b))
        baseline = measure_with_cpu(lambda: reference(a, b), repeats, 0, "reference per-map loop")
        candidates = [measure_with_cpu(lambda fn=fn: fn(a, b), repeats, 1, label) for label, fn in variants.items()]
        comparisons.append(Comparison(f"{name}, {n_maps} maps 224x224", baseline, candidates, note="values checked equal"))
    return "Alignment metrics (spearman, dice, iou)", comparisons
