"""Alignment metrics against the TF reference fixtures and per-map scipy/numpy oracles.

Every test runs on both backends: the C++ extension ("native", skipped when it is not
built) and the NumPy/SciPy fallback ("numpy").
"""
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from harmonizer_fast._ext import HAS_EXTENSION, extension
from harmonizer_fast.evaluation import (
    HUMAN_SPEARMAN_CEILING,
    alignment_metrics,
    dice,
    intersection_over_union,
    spearman_correlation,
)
from harmonizer_fast.evaluation import metrics as metrics_module

from tests.conftest import load_fixture

VARIANTS = ["", "_quant", "_quantsq"]


@pytest.fixture(params=["native", "numpy"])
def backend(request, monkeypatch):
    if request.param == "native":
        if not HAS_EXTENSION:
            pytest.skip("C++ extension not built")
    else:
        monkeypatch.setattr(metrics_module, "extension", lambda: None)
    return request.param


# Per-map oracles written the way the reference computes them (scipy.stats.spearmanr and
# np.percentile on each map), independent of the vectorised code under test.
def oracle_spearman(a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array([spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)])


def oracle_masks(a, b, percentile):
    top = [(x > np.percentile(x, 100 - percentile), y > np.percentile(y, 100 - percentile)) for x, y in zip(a, b)]
    return [(int(np.sum(ma & mb)), int(np.sum(ma)), int(np.sum(mb))) for ma, mb in top]


def oracle_dice(a, b, percentile=10):
    return np.array([2.0 * np.float32(i) / (np.float32(sa + sb) + 1e-9) for i, sa, sb in oracle_masks(a, b, percentile)])


def oracle_iou(a, b, percentile=10):
    return np.array([i / ((sa + sb - i) + 1e-9) for i, sa, sb in oracle_masks(a, b, percentile)])


def tied_maps(rng, shape, levels, dtype=np.float32):
    return (np.round(rng.random(shape) * levels) / levels).astype(dtype)


# ---------------------------------------------------------------- TF reference fixtures


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference_fixture(backend, variant):
    f = load_fixture("metrics.npz")
    a, b = f["a" + variant], f["b" + variant]
    rho = spearman_correlation(a, b)
    assert rho.dtype == np.float64
    np.testing.assert_allclose(rho, f["spearman" + variant], rtol=1e-12, atol=1e-14)
    d = dice(a, b)
    assert d.dtype == np.float32 == f["dice" + variant].dtype
    np.testing.assert_array_equal(d, f["dice" + variant])
    np.testing.assert_allclose(d, f["dice_f64" + variant], rtol=1e-7)
    iou = intersection_over_union(a, b)
    assert iou.dtype == np.float64
    np.testing.assert_array_equal(iou, f["iou" + variant])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("percentile", [10, 25.5])
def test_alignment_metrics_equals_the_three_functions(backend, variant, percentile):
    f = load_fixture("metrics.npz")
    a, b = f["a" + variant], f["b" + variant]
    scores = alignment_metrics(a, b, percentile=percentile)
    assert sorted(scores) == ["dice", "iou", "spearman"]
    for got, want in [
        (scores["spearman"], spearman_correlation(a, b)),
        (scores["dice"], dice(a, b, percentile)),
        (scores["iou"], intersection_over_union(a, b, percentile)),
    ]:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    if percentile == 10:
        np.testing.assert_array_equal(scores["iou"], f["iou" + variant])


def test_quantised_fixture_selects_nothing(backend):
    # 90th percentile equals the top level: strict '>' keeps no pixel, 0 / (0 + 1e-9) = 0.
    f = load_fixture("metrics.npz")
    assert np.all(dice(f["a_quant"], f["b_quant"]) == 0)
    assert np.all(intersection_over_union(f["a_quant"], f["b_quant"]) == 0)


def test_human_ceiling():
    assert HUMAN_SPEARMAN_CEILING == 0.65753


# ---------------------------------------------------------------- scipy / numpy oracles


@pytest.mark.parametrize(
    "shape, levels",
    [((4, 17, 23), None), ((3, 9, 11), 5), ((1, 31, 29), 3), ((2, 100, 100), 40), ((2, 96, 97), None), ((1, 91, 93), 7), ((1, 1, 7), None)],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_maps_match_oracles(backend, shape, levels, dtype):
    # (2, 100, 100), (2, 96, 97) and (1, 91, 93) have >= 8192 pixels: the sampled selection path.
    rng = np.random.default_rng(sum(shape) + (levels or 0))
    if levels is None:
        a = rng.standard_normal(shape).astype(dtype)
        b = (0.5 * a + rng.standard_normal(shape)).astype(dtype)
    else:
        a, b = tied_maps(rng, shape, levels, dtype), tied_maps(rng, shape, levels, dtype)
    np.testing.assert_allclose(spearman_correlation(a, b), oracle_spearman(a, b), rtol=1e-12, atol=1e-13)
    for percentile in (10, 1, 12.5, 50, 99.5):
        np.testing.assert_array_equal(dice(a, b, percentile), oracle_dice(a, b, percentile))
        np.testing.assert_array_equal(intersection_over_union(a, b, percentile), oracle_iou(a, b, percentile))


@pytest.mark.parametrize("percentile", [0, 100])
def test_extreme_percentiles(backend, percentile):
    rng = np.random.default_rng(3)
    a, b = rng.random((3, 10, 12), dtype=np.float32), rng.random((3, 10, 12), dtype=np.float32)
    np.testing.assert_array_equal(dice(a, b, percentile), oracle_dice(a, b, percentile))
    np.testing.assert_array_equal(intersection_over_union(a, b, percentile), oracle_iou(a, b, percentile))
    if percentile == 100:  # threshold = the minimum: all but the minimum pixels kept
        assert np.all(intersection_over_union(a, b, percentile) > 0.98)


def test_signed_zeros_are_ties(backend):
    a = np.array([[[0.0, -0.0, 1.0, -0.0], [2.0, 0.0, -1.0, 3.0]]], dtype=np.float32)
    b = np.array([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]], dtype=np.float32)
    np.testing.assert_allclose(spearman_correlation(a, b), oracle_spearman(a, b), rtol=1e-12)


def test_constant_map_gives_scipy_nan_with_warning(backend):
    rng = np.random.default_rng(4)
    a, b = rng.random((3, 8, 8)), rng.random((3, 8, 8))
    a[1] = 0.25
    with pytest.warns(RuntimeWarning, match=r"undefined .* indices \[1\]"):
        rho = spearman_correlation(a, b)
    assert np.isnan(rho[1]) and np.isnan(oracle_spearman(a, b)[1])
    np.testing.assert_allclose(rho[[0, 2]], oracle_spearman(a, b)[[0, 2]], rtol=1e-12)
    # the constant map's top 10 % is empty (nothing is > its percentile)
    assert dice(a, b)[1] == 0 and intersection_over_union(a, b)[1] == 0


def test_single_pixel_maps_are_nan(backend):
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert np.isnan(spearman_correlation(np.ones((2, 1, 1)), np.zeros((2, 1, 1)))).all()


def test_perfect_and_reversed_order(backend):
    a = np.arange(60, dtype=np.float32).reshape(1, 6, 10)
    assert spearman_correlation(a, 2 * a + 1)[0] == 1.0
    assert spearman_correlation(a, -a)[0] == -1.0
    # threshold 53.1: pixels 54..59 kept; float32 Dice rounds 12 / (12 + 1e-9) to 1
    assert dice(a, a)[0] == np.float32(1.0) and intersection_over_union(a, a)[0] == 6 / (6 + 1e-9)


def test_empty_batch(backend):
    a = np.zeros((0, 4, 4), dtype=np.float32)
    assert spearman_correlation(a, a).shape == (0,)
    assert dice(a, a).shape == (0,) and intersection_over_union(a, a).shape == (0,)


def test_torch_and_dtype_inputs(backend):
    rng = np.random.default_rng(5)
    a, b = rng.random((2, 9, 7), dtype=np.float32), rng.random((2, 9, 7), dtype=np.float32)
    expected = spearman_correlation(a, b)
    np.testing.assert_array_equal(spearman_correlation(torch.from_numpy(a), torch.from_numpy(b)), expected)
    np.testing.assert_array_equal(dice(torch.from_numpy(a), b), dice(a, b))
    # float64 on one side: both compared in float64
    np.testing.assert_allclose(spearman_correlation(a.astype(np.float64), b), oracle_spearman(a, b), rtol=1e-12)
    ints = (a * 10).astype(np.int64)
    np.testing.assert_allclose(spearman_correlation(ints, b), oracle_spearman(ints.astype(np.float32), b), rtol=1e-12)
    halves = torch.from_numpy(a).to(torch.bfloat16)
    np.testing.assert_array_equal(dice(halves, b), oracle_dice(halves.float().numpy(), b))


# ---------------------------------------------------------------- C++ specifics


@pytest.mark.skipif(not HAS_EXTENSION, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_native_thresholds_bitwise_equal_numpy(dtype):
    rng = np.random.default_rng(6)
    native = extension()
    for n in (1, 2, 5, 4096, 8203, 9000, 50176):  # 8203: the SIMD filter's scalar tail
        x = rng.standard_normal((3, n)).astype(dtype)
        x[1] = np.round(x[1] * 2)  # heavy ties
        for percentile in (10, 0, 100, 12.5, 33, 0.01):
            got = native.top_percentile_thresholds(x, percentile)
            want = np.array([np.percentile(row, 100 - percentile) for row in x])
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, want.astype(dtype))


def _sampled_positions(n, count=1024):
    # The pixels the C++ selection samples for an n-pixel map: one per slice of n // count
    # pixels, at an offset drawn by xorshift64 (fixed seed).
    state, mask, slice_, positions = 0x9E3779B97F4A7C15, (1 << 64) - 1, n // count, []
    for i in range(count):
        state ^= (state << 13) & mask
        state ^= state >> 7
        state ^= (state << 17) & mask
        positions.append(i * slice_ + (((state >> 32) * slice_) >> 32))
    return np.array(positions)


@pytest.mark.skipif(not HAS_EXTENSION, reason="C++ extension not built")
@pytest.mark.parametrize("sample_value", [-10.0, 10.0])
def test_native_threshold_when_sample_brackets_miss(sample_value):
    # Every sampled pixel is an outlier, so the pivots miss the wanted ranks and the
    # exact full selection must take over.
    n = 10000
    x = np.random.default_rng(7).random((1, n)).astype(np.float32)
    x[0, _sampled_positions(n)] = sample_value
    got = extension().top_percentile_thresholds(x, 10)
    np.testing.assert_array_equal(got, [np.percentile(x[0], 90)])


def test_native_equals_fallback():
    if not HAS_EXTENSION:
        pytest.skip("C++ extension not built")
    rng = np.random.default_rng(8)
    a = np.concatenate([rng.random((3, 40, 50)), tied_maps(rng, (3, 40, 50), 6, np.float64)]).astype(np.float32)
    b = np.concatenate([rng.random((3, 40, 50)), tied_maps(rng, (3, 40, 50), 3, np.float64)]).astype(np.float32)
    rows = metrics_module._pair(a, b)[:2]
    np.testing.assert_allclose(extension().spearman_maps(*rows), metrics_module._spearman_numpy(*rows), rtol=1e-13)
    for native_counts, numpy_counts in zip(extension().overlap_counts(*rows, 10.0), metrics_module._overlap_counts_numpy(*rows, 10.0)):
        np.testing.assert_array_equal(native_counts, numpy_counts)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("metric", [spearman_correlation, dice, intersection_over_union])
def test_non_finite_raises(backend, bad, metric):
    a, b = np.zeros((2, 4, 4), dtype=np.float32), np.ones((2, 4, 4), dtype=np.float32)
    b[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"`heatmaps_b` \(shape \(2, 4, 4\)\) contains 1 non-finite"):
        metric(a, b)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_in_large_maps_raises(backend, bad, dtype):
    # Maps large enough for the sampled selection; the bad pixel sits in a later map of `heatmaps_a`.
    rng = np.random.default_rng(3)
    a, b = rng.random((3, 100, 100)).astype(dtype), rng.random((3, 100, 100)).astype(dtype)
    a[2, 57, 91] = bad
    a[1, 0, 0] = bad
    for metric in (spearman_correlation, dice, intersection_over_union, alignment_metrics):
        with pytest.raises(ValueError, match=r"`heatmaps_a` \(shape \(3, 100, 100\)\) contains 2 non-finite"):
            metric(a, b)


@pytest.mark.skipif(extension() is None, reason="C++ extension not built")
@pytest.mark.parametrize("kernel", ["spearman_maps", "overlap_counts", "top_percentile_thresholds"])
def test_native_kernels_name_the_first_non_finite_map(kernel):
    rng = np.random.default_rng(4)
    a, b = rng.random((4, 9000)).astype(np.float32), rng.random((4, 9000)).astype(np.float32)
    b[3, 5], b[1, 8999] = np.nan, np.inf
    args = {"spearman_maps": (a, b), "overlap_counts": (a, b, 10.0), "top_percentile_thresholds": (b, 10.0)}[kernel]
    which = "a" if kernel == "top_percentile_thresholds" else "b"
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN or inf\) in map 1 of argument {which}$"):
        getattr(extension(), kernel)(*args)


@pytest.mark.parametrize(
    "a, b, error, match",
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), ValueError, r"same shape, got \(2, 4, 4\) and \(2, 4, 5\)"),
        (np.zeros((4, 4)), np.zeros((4, 4)), ValueError, r"`heatmaps_a` must have rank 3 .* got shape \(4, 4\)"),
        (np.zeros((2, 0, 4)), np.zeros((2, 0, 4)), ValueError, r"non-empty maps, got shape \(2, 0, 4\)"),
        ([[[1.0]]], np.zeros((1, 1, 1)), TypeError, r"`heatmaps_a` must be a numpy.ndarray or torch.Tensor, got list"),
        (np.zeros((1, 2, 2)), np.zeros((1, 2, 2), dtype=complex), TypeError, r"`heatmaps_b` must hold real numbers"),
        (np.zeros((1, 2, 2)), np.array([[["x"]]]), TypeError, r"`heatmaps_b` must hold real numbers"),
    ],
)
def test_bad_maps_raise(backend, a, b, error, match):
    for metric in (spearman_correlation, dice, intersection_over_union, alignment_metrics):
        with pytest.raises(error, match=match):
            metric(a, b)


@pytest.mark.parametrize("percentile, error", [(-1, ValueError), (100.5, ValueError), (float("nan"), ValueError), ("10", TypeError), (True, TypeError)])
def test_bad_percentile_raises(backend, percentile, error):
    a = np.zeros((1, 3, 3))
    for metric in (dice, intersection_over_union, alignment_metrics):
        with pytest.raises(error, match="`percentile`"):
            metric(a, a, percentile=percentile)
