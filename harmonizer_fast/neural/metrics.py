"""Neural alignment metrics of the IT benchmark (port of ``neural_harmonizer.evaluation.metrics``).

Everything takes numpy arrays or torch tensors and computes with torch on the CPU (float64 inputs
stay float64, everything else is computed in float32, as the TensorFlow reference did).

Differences from the reference, each a bug fix (see the function docstrings):

* :func:`brain_score` honours ``n_components``, predicts with the intercept and has a working
  ``'spearman'`` branch;
* :func:`ceiling_score` uses every channel and the full spatial map (``reference_bug_compat=True``
  gives the reference's number).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import rankdata

from harmonizer_fast.spec import ArrayLike, check_rank, check_same_shape, compute_dtype, shape_of, tf_resize_bilinear
from harmonizer_fast.neural.pls import PLSRegression

__all__ = [
    "tf_pearson_loss",
    "pearson_correlation",
    "spearman_per_row",
    "brain_score",
    "spearmanr_sim",
    "highest_off_diagonal",
    "ceiling_score",
    "CORRELATIONS",
    "REDUCERS",
    "as_tensor",
    "resize_bilinear",
]


def as_tensor(x: ArrayLike, name: str, dtype: torch.dtype = None) -> torch.Tensor:
    """A CPU floating tensor view of ``x`` (numpy array or tensor), cast to ``dtype`` if given."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        raise TypeError(f"`{name}` must be a numpy array or a torch.Tensor, got {type(x).__name__}")
    if dtype is not None:
        return t.to(dtype)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t.to(compute_dtype(t))


#: TensorFlow 2 bilinear resize of (N, C, H, W) maps (one implementation, in the floor).
resize_bilinear = tf_resize_bilinear


def _centred_cosine(x: torch.Tensor, y: torch.Tensor, axis: int) -> torch.Tensor:
    xc = x - x.mean(axis, keepdim=True)
    yc = y - y.mean(axis, keepdim=True)
    return (xc * yc).sum(axis) / (xc.pow(2).sum(axis).sqrt() * yc.pow(2).sum(axis).sqrt())


def tf_pearson_loss(x: ArrayLike, y: ArrayLike, axis: int = -1) -> torch.Tensor:
    r"""Pearson correlation of ``x`` and ``y`` along ``axis``, as a centred cosine similarity.

    .. math:: r = \frac{\sum_i (x_i - \bar x)(y_i - \bar y)}
                       {\sqrt{\sum_i (x_i - \bar x)^2}\,\sqrt{\sum_i (y_i - \bar y)^2}}

    Despite its (reference) name this is the correlation, not a loss. ``x`` and ``y`` have the same
    shape; the result has that shape without ``axis``. A slice with zero variance has no
    correlation: it raises ``ValueError`` instead of returning NaN.
    """
    xt, yt = as_tensor(x, "x"), as_tensor(y, "y")
    check_same_shape(xt, yt, "x", "y")
    dtype = torch.promote_types(xt.dtype, yt.dtype)
    r = _centred_cosine(xt.to(dtype), yt.to(dtype), axis)
    if not bool(torch.isfinite(r).all()):
        bad = int((~torch.isfinite(r)).sum())
        raise ValueError(
            f"tf_pearson_loss: {bad} slice(s) along axis {axis} of x/y (shape {shape_of(xt)}) have zero "
            "variance (or non-finite values), so their correlation is undefined"
        )
    return r


#: Plainly named alias of :func:`tf_pearson_loss` (it returns correlations, not a loss).
pearson_correlation = tf_pearson_loss


def spearman_per_row(x: ArrayLike, y: ArrayLike) -> torch.Tensor:
    """Spearman's rho of each row of ``x`` with the same row of ``y`` (ties get average ranks, as scipy).

    Rows are ranked along the last axis, then :func:`tf_pearson_loss` of the ranks.
    """
    xt, yt = as_tensor(x, "x"), as_tensor(y, "y")
    check_same_shape(xt, yt, "x", "y")
    rx = rankdata(xt.numpy(), axis=-1)
    ry = rankdata(yt.numpy(), axis=-1)
    return tf_pearson_loss(rx, ry, axis=-1)


#: Correlation of each row of predictions with the same row of targets, by name.
CORRELATIONS: Dict[str, Callable[[ArrayLike, ArrayLike], torch.Tensor]] = {
    "pearson": lambda a, b: tf_pearson_loss(a, b, axis=-1),
    "spearman": spearman_per_row,
}

#: Aggregation of per-target correlations into one score, by name.
REDUCERS: Dict[str, Callable[[np.ndarray], float]] = {
    "median": lambda c: float(np.median(c)),
    "mean": lambda c: float(np.mean(c)),
}


def _lookup(registry: Dict[str, object], key: str, name: str):
    if key not in registry:
        raise ValueError(f"`{name}` must be one of {sorted(registry)}, got {key!r}")
    return registry[key]


def _make_pls(n_components: int):
    return PLSRegression(n_components, scale=False, tol=1e-4)


def brain_score(
    X_train: ArrayLike,
    Y_train: ArrayLike,
    X_test: ArrayLike,
    Y_test: ArrayLike,
    n_components: int = 25,
    reducer: str = "median",
    correlation_fn: str = "pearson",
) -> Tuple[float, torch.Tensor, torch.Tensor]:
    r"""PLS readout score: fit on train, correlate predictions with the test targets.

    Fits ``PLSRegression(n_components, scale=False, tol=1e-4)`` on ``(X_train, Y_train)``
    (samples x features, samples x targets), predicts ``Y_pred = (X_test - \bar x) B^T + b``,
    computes the correlation of each target (column) over the test samples and reduces them.

    Parameters
    ----------
    n_components
        PLS components; clipped to ``min(n_features, n_samples - 1)`` (PLS cannot extract more).
    reducer
        ``'median'`` or ``'mean'`` over targets (see :data:`REDUCERS`).
    correlation_fn
        ``'pearson'`` or ``'spearman'`` per target (see :data:`CORRELATIONS`).

    Returns
    -------
    score
        The reduced correlation, a float.
    pls_kernel
        (n_features, n_targets) regression weights, the reference's layout (``coef_.T``).
    Y_pred
        (n_test, n_targets) predictions.

    Notes
    -----
    Reference bugs fixed here: the reference always used 25 components whatever
    ``n_components`` said; it predicted ``X_test @ coef`` without centring or intercept (a
    per-target constant offset, invisible to Pearson but not to the returned predictions); its
    ``'spearman'`` branch referred to undefined names and raised ``NameError``.
    """
    xtr, ytr = as_tensor(X_train, "X_train"), as_tensor(Y_train, "Y_train")
    xte, yte = as_tensor(X_test, "X_test"), as_tensor(Y_test, "Y_test")
    for t, n in ((xtr, "X_train"), (ytr, "Y_train"), (xte, "X_test"), (yte, "Y_test")):
        check_rank(t, 2, n, "samples x features/targets")
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of samples: X_train {shape_of(xtr)}, Y_train "
            f"{shape_of(ytr)}, X_test {shape_of(xte)}, Y_test {shape_of(yte)}"
        )
    if xtr.shape[1] != xte.shape[1] or ytr.shape[1] != yte.shape[1]:
        raise ValueError(
            f"train and test must have the same columns: X_train {shape_of(xtr)} vs X_test "
            f"{shape_of(xte)}, Y_train {shape_of(ytr)} vs Y_test {shape_of(yte)}"
        )
    correlate = _lookup(CORRELATIONS, correlation_fn, "correlation_fn")
    reduce = _lookup(REDUCERS, reducer, "reducer")
    if n_components < 1:
        raise ValueError(f"`n_components` must be >= 1, got {n_components}")
    n_components = min(int(n_components), xtr.shape[1], xtr.shape[0] - 1)

    pls = _make_pls(n_components).fit(xtr.numpy(), ytr.numpy())
    dtype = torch.promote_types(xte.dtype, yte.dtype)
    y_pred = torch.as_tensor(np.asarray(pls.predict(xte.numpy()))).to(dtype)
    kernel = torch.as_tensor(np.asarray(pls.coef_)).to(dtype).T.contiguous()
    correlations = correlate(y_pred.T, yte.to(dtype).T)
    return reduce(correlations.numpy()), kernel, y_pred


def spearmanr_sim(
    explanations1: ArrayLike, explanations2: ArrayLike, reducers: Sequence[int] = (1, 4, 16)
) -> Dict[int, List[float]]:
    """Spearman similarity of pairs of maps at several resolutions.

    For each ``reducer`` both (N, H, W) (or (N, H, W, 1)) map batches are resized bilinearly
    (TensorFlow semantics, :func:`resize_bilinear`) to ``int(H / reducer)`` squared, and each pair
    is compared with Spearman's rho over its pixels. Returns ``{reducer: [rho per pair]}``.
    A reducer that leaves fewer than 2x2 pixels raises ``ValueError`` (the reference gave NaN).
    The reference's ``visualize`` plotting option is not ported.
    """
    e1, e2 = as_tensor(explanations1, "explanations1"), as_tensor(explanations2, "explanations2")
    check_same_shape(e1, e2, "explanations1", "explanations2")
    check_rank(e1, (3, 4), "explanations1", "(N, H, W) or (N, H, W, 1)")
    if e1.ndim == 4:
        if e1.shape[-1] != 1:
            raise ValueError(f"4-D explanations must have one channel (N, H, W, 1), got {shape_of(e1)}")
        e1, e2 = e1[..., 0], e2[..., 0]
    # The reference cast both to float32 before resizing.
    e1, e2 = e1.to(torch.float32)[:, None], e2.to(torch.float32)[:, None]
    sims: Dict[int, List[float]] = {}
    for reducer in reducers:
        side = int(e1.shape[2] / reducer)
        if side < 2:
            raise ValueError(f"reducer {reducer} leaves a {side}x{side} map from {shape_of(e1[:, 0])}")
        r1 = resize_bilinear(e1, (side, side)).flatten(1)
        r2 = resize_bilinear(e2, (side, side)).flatten(1)
        sims[reducer] = [float(v) for v in spearman_per_row(r1, r2)]
    return sims


def highest_off_diagonal(correlation_matrix: ArrayLike) -> float:
    """Largest entry of a square matrix outside its diagonal.

    NaN entries (pairs whose correlation is undefined) are skipped, as the reference's ``>``
    comparison skipped them; a matrix with no finite off-diagonal entry raises ``ValueError``.
    """
    m = as_tensor(correlation_matrix, "correlation_matrix")
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"`correlation_matrix` must be square, got shape {shape_of(m)}")
    off = m[~torch.eye(m.shape[0], dtype=torch.bool)]
    off = off[~torch.isnan(off)]
    if off.numel() == 0:
        raise ValueError(f"`correlation_matrix` {shape_of(m)} has no finite off-diagonal entry")
    return float(off.max())


def _channel_correlation_matrix(maps: torch.Tensor, correlation_fn: str) -> torch.Tensor:
    """(R, P) maps -> (R, R) correlations over the P positions; NaN where a map is constant."""
    if correlation_fn == "spearman":
        maps = torch.as_tensor(rankdata(maps.numpy(), axis=-1)).to(maps.dtype)
    centred = maps - maps.mean(-1, keepdim=True)
    norms = centred.norm(dim=-1)
    unit = centred / norms[:, None]
    corr = unit @ unit.T
    corr[norms == 0] = float("nan")
    corr[:, norms == 0] = float("nan")
    return corr


def _reference_ceiling_matrix(maps_xy: torch.Tensor) -> torch.Tensor:
    """The reference's per-image matrix: channels 0..R-2 only, upper triangle only (zeros below),
    each entry the mean over rows of the row-wise Pearson correlation of two (x, y) maps."""
    r = maps_xy.shape[-1]
    corr = torch.zeros(r, r, dtype=maps_xy.dtype)
    for i in range(r - 1):
        for j in range(i + 1, r - 1):
            corr[i, j] = _centred_cosine(maps_xy[..., i], maps_xy[..., j], -1).mean()
    return corr


def ceiling_score(
    neural_array: ArrayLike,
    time_a: int = 100,
    time_b: int = 150,
    correlation_fn: str = "pearson",
    reference_bug_compat: bool = False,
) -> float:
    r"""Noise ceiling of spatial IT maps from the agreement between recording channels.

    ``neural_array`` is (images, x, y, time, channels). For each image, each channel's spatial map
    is its mean response over time samples ``[time_a, time_b)``; the correlation (``'pearson'`` or
    ``'spearman'``) over all x*y positions is computed for every pair of channels, and the image's
    ceiling is the highest off-diagonal value (:func:`highest_off_diagonal`, constant maps skipped).
    The result is the mean of that over images.

    Notes
    -----
    The reference differs in ways that are bugs: it skips the last channel (``range(R - 1)``),
    correlates the maps row by row (Pearson along y, then the mean over x) instead of over the whole
    map, fills only the upper triangle (so a negative best pair is reported as 0), and its spearman
    branch fails. ``reference_bug_compat=True`` reproduces its number (Pearson only), for comparison
    with published ceilings. Its min-max "normalisation" subtracts a constant (operator precedence)
    and its flip of the x axis does not change correlations; both are omitted.
    """
    arr = as_tensor(neural_array, "neural_array")
    check_rank(arr, 5, "neural_array", "images x x x y x time x channels")
    if not 0 <= time_a < time_b <= arr.shape[3]:
        raise ValueError(
            f"need 0 <= time_a < time_b <= {arr.shape[3]} (time samples of neural_array "
            f"{shape_of(arr)}), got time_a={time_a}, time_b={time_b}"
        )
    if arr.shape[-1] < 2:
        raise ValueError(f"`neural_array` needs at least 2 channels, got shape {shape_of(arr)}")
    _lookup(CORRELATIONS, correlation_fn, "correlation_fn")
    if reference_bug_compat and correlation_fn != "pearson":
        raise ValueError("reference_bug_compat=True reproduces only the 'pearson' ceiling (its spearman branch fails)")
    maps = arr[:, :, :, time_a:time_b].mean(3)  # images, x, y, channels
    per_image = []
    for image_maps in maps:
        if reference_bug_compat:
            corr = _reference_ceiling_matrix(image_maps)
        else:
            corr = _channel_correlation_matrix(image_maps.reshape(-1, image_maps.shape[-1]).T, correlation_fn)
        per_image.append(highest_off_diagonal(corr))
    return float(np.mean(per_image))
