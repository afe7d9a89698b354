"""Human-alignment metrics between stacks of maps (``harmonization.evaluation.metrics``).

Each function compares two stacks of (N, H, W) maps, map ``i`` of ``heatmaps_a`` with map
``i`` of ``heatmaps_b``, and returns one score per map pair. The work runs in the C++
extension (``harmonizer_fast._C``: linear-time radix ranking, selection instead of
sorting, OpenMP over maps) and falls back to the vectorised NumPy/SciPy functions below
(``_spearman_numpy``, ``_overlap_counts_numpy``) when the extension is unavailable; both
give the reference's numbers.

Differences from the reference, all deliberate:

* float64 maps are ranked and thresholded in float64; the reference first casts every
  input to float32, which can merge nearly equal values into ties. Pass float32 maps to
  reproduce it bit for bit. Other dtypes (integers, float16, bfloat16) are cast to float32.
* NaN or infinite values raise ``ValueError`` (the reference returns NaN or garbage).
* The only NaN returned is the Spearman correlation of a pair in which one map is
  constant (or has a single pixel): rho is undefined there, scipy.stats.spearmanr and so
  the reference return NaN, and so do we, with a ``RuntimeWarning`` naming the maps.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, NamedTuple, Tuple, Union

import numpy as np
import torch
from scipy.stats import rankdata

from harmonizer_fast._ext import extension
from harmonizer_fast.spec import HUMAN_SPEARMAN_CEILING, ArrayLike, check_rank, check_same_shape, shape_of

__all__ = [
    "EPSILON",
    "HUMAN_SPEARMAN_CEILING",
    "alignment_metrics",
    "dice",
    "intersection_over_union",
    "spearman_correlation",
]

#: Added to the denominators of Dice and IoU, as in the reference (so 0 / 0 gives 0).
EPSILON = 1e-9


OverlapCounts = Tuple[np.ndarray, np.ndarray, np.ndarray]


def _check_maps_type(heatmaps: object, name: str) -> None:
    if not isinstance(heatmaps, (np.ndarray, torch.Tensor)):
        raise TypeError(f"`{name}` must be a numpy.ndarray or torch.Tensor, got {type(heatmaps).__name__}")
    if isinstance(heatmaps, np.ndarray) and heatmaps.dtype.kind not in "fiub":
        raise TypeError(f"`{name}` must hold real numbers, got dtype {heatmaps.dtype} (shape {shape_of(heatmaps)})")
    if isinstance(heatmaps, torch.Tensor) and heatmaps.is_complex():
        raise TypeError(f"`{name}` must hold real numbers, got dtype {heatmaps.dtype} (shape {shape_of(heatmaps)})")
    check_rank(heatmaps, 3, name, "N, H, W")
    if heatmaps.shape[1] * heatmaps.shape[2] == 0:
        raise ValueError(f"`{name}` must have non-empty maps, got shape {shape_of(heatmaps)}")


def _as_rows(heatmaps: ArrayLike, dtype: np.dtype) -> np.ndarray:
    """Maps as a C-contiguous (N, H*W) array of ``dtype`` (float32 or float64), copied only if needed."""
    if isinstance(heatmaps, torch.Tensor):
        tensor = heatmaps.detach().to(torch.float64 if dtype == np.float64 else torch.float32)
        array = tensor.cpu().numpy()
    else:
        array = heatmaps.astype(dtype, copy=False)
    return np.ascontiguousarray(array).reshape(array.shape[0], array.shape[1] * array.shape[2])


class MapRows(NamedTuple):
    """Validated stacks as (N, H*W) rows of one dtype, and the (N, H, W) shape for messages."""

    a: np.ndarray
    b: np.ndarray
    shape: str


def _check_finite_rows(rows: MapRows) -> None:
    """Raise the user-facing ValueError if either stack holds NaN or inf (same message as check_finite)."""
    for name, array in (("heatmaps_a", rows.a), ("heatmaps_b", rows.b)):
        finite = np.isfinite(array)
        if not finite.all():
            raise ValueError(
                f"`{name}` (shape {rows.shape}) contains {finite.size - np.count_nonzero(finite)} "
                "non-finite values (NaN or inf)"
            )


def _is_float64(heatmaps: ArrayLike) -> bool:
    return heatmaps.dtype in (np.float64, torch.float64)


def _pair(heatmaps_a: ArrayLike, heatmaps_b: ArrayLike) -> MapRows:
    """Both stacks validated, as (N, H*W) rows of one dtype: float64 if either is float64.

    NaN/inf are not looked for here: the C++ kernels detect them while reading the maps
    (see :func:`_native`), and the NumPy fallback checks first.
    """
    _check_maps_type(heatmaps_a, "heatmaps_a")
    _check_maps_type(heatmaps_b, "heatmaps_b")
    check_same_shape(heatmaps_a, heatmaps_b, "heatmaps_a", "heatmaps_b")
    dtype = np.dtype(np.float64 if _is_float64(heatmaps_a) or _is_float64(heatmaps_b) else np.float32)
    return MapRows(_as_rows(heatmaps_a, dtype), _as_rows(heatmaps_b, dtype), shape_of(heatmaps_a))


def _native(kernel: str, rows: MapRows, *args: float) -> Any:
    """Run ``harmonizer_fast._C.<kernel>(a, b, *args)``, or None without the extension.

    The kernel raises a bare ValueError on NaN/inf (it knows the map, not the argument's
    name or shape); it is re-raised here with the message of the NumPy path.
    """
    native = extension()
    if native is None:
        _check_finite_rows(rows)
        return None
    try:
        return getattr(native, kernel)(rows.a, rows.b, *args)
    except ValueError as error:
        _check_finite_rows(rows)
        raise error


def _check_percentile(percentile: Union[int, float]) -> float:
    if isinstance(percentile, (bool, np.bool_)) or not isinstance(percentile, (int, float, np.integer, np.floating)):
        raise TypeError(f"`percentile` must be a number in [0, 100], got {percentile!r}")
    value = float(percentile)
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"`percentile` must be in [0, 100] (the top share of pixels kept), got {percentile!r}")
    return value


def _spearman_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fallback: average-tie ranks (scipy.stats.rankdata) and their Pearson correlation."""
    ranks_a = rankdata(a, method="average", axis=1)
    ranks_b = rankdata(b, method="average", axis=1)
    ranks_a -= ranks_a.mean(axis=1, keepdims=True)
    ranks_b -= ranks_b.mean(axis=1, keepdims=True)
    covariance = np.einsum("ij,ij->i", ranks_a, ranks_b)
    variances = np.einsum("ij,ij->i", ranks_a, ranks_a) * np.einsum("ij,ij->i", ranks_b, ranks_b)
    with np.errstate(invalid="ignore", divide="ignore"):  # constant maps: 0 / 0 = NaN, as scipy
        rho = covariance / np.sqrt(variances)
    return np.clip(rho, -1.0, 1.0)


def _overlap_counts_numpy(a: np.ndarray, b: np.ndarray, percentile: float) -> OverlapCounts:
    """Fallback: binarise each map above its ``100 - percentile`` percentile; count."""
    q = 100.0 - percentile  # a Python float: np.percentile keeps the maps' dtype
    top_a = a > np.percentile(a, q, axis=1, keepdims=True)
    top_b = b > np.percentile(b, q, axis=1, keepdims=True)
    intersection = np.count_nonzero(top_a & top_b, axis=1).astype(np.int64)
    return intersection, np.count_nonzero(top_a, axis=1).astype(np.int64), np.count_nonzero(top_b, axis=1).astype(np.int64)


def _overlap_counts(rows: MapRows, percentile: float) -> OverlapCounts:
    """(|A and B|, |A|, |B|) per map pair of validated rows."""
    counts = _native("overlap_counts", rows, percentile)
    return tuple(counts) if counts is not None else _overlap_counts_numpy(rows.a, rows.b, percentile)  # type: ignore[return-value]


def _spearman_rows(rows: MapRows) -> np.ndarray:
    """Spearman rho per map pair of validated rows; warns about undefined (NaN) pairs."""
    rho = _native("spearman_maps", rows)
    if rho is None:
        rho = _spearman_numpy(rows.a, rows.b)
    undefined = np.flatnonzero(np.isnan(rho))
    if undefined.size:
        warnings.warn(
            f"Spearman correlation is undefined (returned as NaN, like scipy.stats.spearmanr) "
            f"for {undefined.size} map pair(s) with a constant map, indices {undefined[:10].tolist()}"
            f"{' ...' if undefined.size > 10 else ''}",
            RuntimeWarning,
            stacklevel=3,
        )
    return rho


def _dice_from_counts(intersection: np.ndarray, count_a: np.ndarray, count_b: np.ndarray) -> np.ndarray:
    # The reference sums float32 masks: 2.0 * float32 / (float32 + EPSILON) stays float32.
    return (2.0 * intersection.astype(np.float32)) / ((count_a + count_b).astype(np.float32) + EPSILON)


def _iou_from_counts(intersection: np.ndarray, count_a: np.ndarray, count_b: np.ndarray) -> np.ndarray:
    return intersection / ((count_a + count_b - intersection) + EPSILON)


def spearman_correlation(heatmaps_a: ArrayLike, heatmaps_b: ArrayLike) -> np.ndarray:
    """Spearman's rank correlation of each pair of maps.

    .. math:: \\rho_i = \\frac{\\sum_p (r^a_{ip} - \\bar r)(r^b_{ip} - \\bar r)}
              {\\sqrt{\\sum_p (r^a_{ip} - \\bar r)^2 \\sum_p (r^b_{ip} - \\bar r)^2}}

    where :math:`r^a_{ip}` is the rank of pixel :math:`p` within map :math:`i` of
    ``heatmaps_a`` (equal values share the average of their ranks, as
    ``scipy.stats.rankdata(method='average')``) and :math:`\\bar r = (HW + 1) / 2`.
    Equals ``scipy.stats.spearmanr(a[i].ravel(), b[i].ravel())`` to ~1e-15.

    Args:
        heatmaps_a: (N, H, W) maps, numpy array or torch tensor (any device).
        heatmaps_b: (N, H, W) maps of the same shape.

    Returns:
        float64 array of shape (N,). A pair with a constant map (rho undefined) gives NaN,
        as scipy does, with a ``RuntimeWarning``.
    """
    return _spearman_rows(_pair(heatmaps_a, heatmaps_b))


def dice(heatmaps_a: ArrayLike, heatmaps_b: ArrayLike, percentile: Union[int, float] = 10) -> np.ndarray:
    """Sorensen-Dice overlap of the top ``percentile`` % pixels of each pair of maps.

    Each map is binarised as :math:`A = \\{p : x_p > t\\}` with
    :math:`t` = ``np.percentile(x, 100 - percentile)`` (linear interpolation, strict
    ``>``: with ties at :math:`t` fewer pixels, possibly none, are kept), then

    .. math:: \\mathrm{Dice} = \\frac{2 |A \\cap B|}{|A| + |B| + 10^{-9}}.

    Args:
        heatmaps_a: (N, H, W) maps, numpy array or torch tensor (any device).
        heatmaps_b: (N, H, W) maps of the same shape.
        percentile: share of the pixels kept, in [0, 100]; 10 keeps the top 10 %.

    Returns:
        float32 array of shape (N,): the reference's value and dtype under NumPy 2 (the
        formula is evaluated in float32 there; in float64 it differs by < 1e-7).
    """
    value = _check_percentile(percentile)
    return _dice_from_counts(*_overlap_counts(_pair(heatmaps_a, heatmaps_b), value))


def intersection_over_union(
    heatmaps_a: ArrayLike, heatmaps_b: ArrayLike, percentile: Union[int, float] = 10
) -> np.ndarray:
    """Intersection over union of the top ``percentile`` % pixels of each pair of maps.

    With the binarisation of :func:`dice`,

    .. math:: \\mathrm{IoU} = \\frac{|A \\cap B|}{|A \\cup B| + 10^{-9}}.

    Args:
        heatmaps_a: (N, H, W) maps, numpy array or torch tensor (any device).
        heatmaps_b: (N, H, W) maps of the same shape.
        percentile: share of the pixels kept, in [0, 100]; 10 keeps the top 10 %.

    Returns:
        float64 array of shape (N,) (integer counts divided in float64, as the reference).
    """
    value = _check_percentile(percentile)
    return _iou_from_counts(*_overlap_counts(_pair(heatmaps_a, heatmaps_b), value))


def alignment_metrics(
    heatmaps_a: ArrayLike, heatmaps_b: ArrayLike, percentile: Union[int, float] = 10
) -> Dict[str, np.ndarray]:
    """:func:`spearman_correlation`, :func:`dice` and :func:`intersection_over_union` at once.

    The maps are validated and converted once and the percentile masks are computed once
    for Dice and IoU, so this is cheaper than the three calls; the values are identical.

    Returns:
        dict with ``'spearman'`` (float64), ``'dice'`` (float32) and ``'iou'`` (float64)
        arrays of shape (N,).
    """
    value = _check_percentile(percentile)
    rows = _pair(heatmaps_a, heatmaps_b)
    counts = _overlap_counts(rows, value)
    return {"spearman": _spearman_rows(rows), "dice": _dice_from_counts(*counts), "iou": _iou_from_counts(*counts)}
