"""Shared pieces of the IT readouts (:mod:`~harmonizer_fast.neural.ridge`, :mod:`~.pls`):
input validation and the per-target reductions, with a C++ fast path (``csrc/ridge.cpp``)
and the NumPy reference it is tested against.

What runs where (measured on the shared 2-core machine): large products stay in NumPy's BLAS
on the process's threads (OpenBLAS dsyrk forms X^T X of a 3200 x 2048 design in 0.25 s,
torch's CPU matmul in 0.40 s; a 3200 x 2048 by 2048 x 168 product takes 32 ms vs 42 ms), and
so do Grams (dsyrk: half the flops of torch's gemm). Products below :data:`SMALL_PRODUCT`
multiply-adds go to torch's MKL ``dgemm`` on one thread (:func:`matmul`: ~25 % faster than
OpenBLAS's at 500 x 200 x 200), and decompositions below :data:`SMALL_DECOMPOSITION` to
torch's MKL ``dsyevd`` on one thread
(:func:`~harmonizer_fast.neural.ridge_solvers.eigh_psd`). Both pools are held at one thread
for a whole small fit (:func:`single_blas_thread`), so they never compete for the cores. The
per-target epilogues run in C++, one pass without temporaries: at 3200 x 168, residual
moments take 0.3-0.6 ms against 1.1-18 ms for the NumPy expressions below, Pearson 0.6-1.5 ms
against 30-70 ms (min-median under load); the column centring of a design is one C++ pass
(:func:`centre_columns`).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional, Tuple

import numpy as np
import scipy.sparse
import torch  # imported anyway by harmonizer_fast.neural (feature extraction): no added import cost
from threadpoolctl import ThreadpoolController  # a dependency of scikit-learn

from harmonizer_fast._ext import extension
from harmonizer_fast.spec import shape_of

__all__ = [
    "pearson_per_target",
    "residual_moments",
    "check_features",
    "check_finite",
    "check_targets",
    "centre_columns",
    "check_gram",
    "centre_gram",
    "centre_cross_gram",
    "single_blas_thread",
    "single_torch_thread",
    "matmul",
    "threads_for_product",
    "threads_for_decomposition",
]


#: Multiply-adds below which a product (or a whole small fit) runs on one BLAS thread.
SMALL_PRODUCT = 50_000_000
#: Order below which a decomposition runs on one BLAS thread: threading a small ``eigh`` or
#: Cholesky costs more than it saves, and far more on a busy machine (a 39 x 39 ``eigh`` took
#: 37 ms on two OpenBLAS threads at load 6, 0.3 ms on one). A rule on the size only, so the
#: result bits never depend on the load.
SMALL_DECOMPOSITION = 512

_single_thread_depth = 0  # nesting depth of single_blas_thread (the limit is set once, outermost)


@contextlib.contextmanager
def single_blas_thread() -> Iterator[None]:
    """Run the enclosed small products on one BLAS thread (NumPy's OpenBLAS and torch's
    MKL: see :func:`matmul`).

    The many small products of a PLS component (matrix-vector, t x t) and the per-alpha
    products of a small ridge path lose more to thread start-up and spin-waiting than they
    gain: PLSRegression(25) on 3200 x 2048 x 168 took 1.5-1.8 s on one OpenBLAS thread and
    5.9-7.7 s on two (shared 2-core machine); a 500 x 200 by 200 x 200 product took 8.0 ms
    on two threads and 0.5 ms on one at load ~2.5. Large products and the decompositions
    outside this context keep all threads. Nested uses cost nothing: only the outermost sets
    and restores the limit. The limit is set through the BLAS libraries' own
    ``set_num_threads`` (threadpoolctl's per-library controllers, found once): entering and
    leaving costs ~35-45 us for both OpenBLAS copies (NumPy's and SciPy's) and torch together,
    where two ``threadpoolctl`` ``limit()`` calls alone cost ~60 us (1.5 % of a 500 x 200 fit).

    Reproducibility: OpenBLAS results depend, in the last bits, on its thread count (the
    blocked sums are split differently). The thread count used here is fixed (one) and every
    other product runs on the process's configured count, never on a count derived from the
    machine's load, so a fit is bitwise reproducible for a given BLAS configuration. On an
    oversubscribed machine, limit the threads yourself (``OPENBLAS_NUM_THREADS=1`` or
    ``threadpoolctl.threadpool_limits(1)``): OpenBLAS's threaded ``eigh`` spin-waits when the
    cores are busy (2048 x 2048: 27-33 s on two threads at load ~8, 5.1-5.7 s on one).
    """
    global _single_thread_depth
    if _single_thread_depth:
        yield
        return
    libraries = _blas_libraries()
    previous = [lib.get_num_threads() for lib in libraries]
    for lib in libraries:
        lib.set_num_threads(1)
    _single_thread_depth += 1
    try:
        with single_torch_thread():
            yield
    finally:
        _single_thread_depth -= 1
        for lib, count in zip(libraries, previous):
            if count is not None:
                lib.set_num_threads(count)


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run the enclosed torch CPU calls (and the MKL BLAS/LAPACK under them) on one thread,
    then restore the caller's count.

    For the small products of :func:`matmul` and the small decompositions of
    :func:`~harmonizer_fast.neural.ridge_solvers.eigh_psd`: torch's thread count is its
    OpenMP/MKL pool, which OpenBLAS (NumPy's pool) does not see, so a threaded MKL call inside
    a fit would compete with OpenBLAS for the cores (a ridge grid run with torch's ``eigh`` on
    its default two threads was slower on every shape). On one thread nothing competes.
    ``torch.set_num_threads`` is cheap (a set-and-restore pair: ~0.2 us warm, ~20 us right after
    other work has evicted the caches). It sets the calling thread's OpenMP and MKL limits and
    torch's process-wide intra-op count: torch CPU work in other Python threads runs on one
    thread while a small fit holds it.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _as_tensor(a: np.ndarray) -> Optional[torch.Tensor]:
    """A zero-copy float64 tensor view of ``a``, or None where torch cannot view it (read-only
    memory, negative strides, another dtype)."""
    if a.dtype != np.float64 or not a.flags.writeable or any(s < 0 for s in a.strides):
        return None
    return torch.from_numpy(a)


def matmul(A: np.ndarray, B: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    r"""The float64 product :math:`A B` (into ``out`` when given, C-contiguous of shape
    (A.shape[0], B.shape[1])), on the BLAS that is faster for its size.

    Below :data:`SMALL_PRODUCT` multiply-adds: torch's ``dgemm`` (MKL in torch's x86 wheels)
    on one torch thread, zero-copy (one thread, quiet machine: 500 x 200 by 200 x 200 0.38 ms
    vs OpenBLAS's 0.49 ms; 500 x 200 by 200 x 40 0.47 ms for twenty such products vs
    0.63 ms for twenty 200 x 10 products on OpenBLAS). Above: NumPy's OpenBLAS on the
    process's threads. A rule on the size only, so the bits never depend on the load.
    """
    if A.shape[0] * A.shape[1] * B.shape[1] < SMALL_PRODUCT:
        if out is None:
            out = np.empty((A.shape[0], B.shape[1]))
        tA, tB, tout = _as_tensor(A), _as_tensor(B), _as_tensor(out)
        if tA is not None and tB is not None and tout is not None and out.flags.c_contiguous:
            with single_torch_thread():
                torch.mm(tA, tB, out=tout)
            return out
    return np.matmul(A, B, out=out)


def threads_for_product(multiply_adds: int) -> "contextlib.AbstractContextManager[None]":
    """The BLAS thread policy of products (and of whole fits) of ``multiply_adds`` multiply-adds:
    one thread below :data:`SMALL_PRODUCT`, the process's configured count above."""
    return single_blas_thread() if multiply_adds < SMALL_PRODUCT else contextlib.nullcontext()


def threads_for_decomposition(order: int) -> "contextlib.AbstractContextManager[None]":
    """The BLAS thread policy of an ``order`` x ``order`` decomposition (``eigh``, Cholesky): one
    thread below :data:`SMALL_DECOMPOSITION`, the process's configured count above."""
    return single_blas_thread() if order < SMALL_DECOMPOSITION else contextlib.nullcontext()


_BLAS_LIBRARIES: Optional[list] = None


def _blas_libraries() -> list:
    """threadpoolctl's controllers of the loaded BLAS libraries, found once for the process:
    ``threadpool_limits`` rescans the loaded libraries at every call (2-5 ms, as long as a whole
    small PLS fit); NumPy's BLAS is loaded by now."""
    global _BLAS_LIBRARIES
    if _BLAS_LIBRARIES is None:
        _BLAS_LIBRARIES = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _BLAS_LIBRARIES


def _to_numpy(x: object, name: str) -> np.ndarray:
    """Any array-like (NumPy, torch, lists, object arrays of numbers) as a real NumPy array."""
    if scipy.sparse.issparse(x):
        raise TypeError(
            f"`{name}` is a sparse {type(x).__name__} of shape {x.shape}, but dense data is required: "
            "convert it with .toarray()"
        )
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"`{name}` must be array-like, got {type(x).__name__}") from exc
    if np.iscomplexobj(arr):
        raise ValueError(f"Complex data not supported: `{name}` has dtype {arr.dtype} (shape {shape_of(arr)})")
    if arr.dtype == object:
        try:  # object arrays of numbers (as pandas gives) convert; anything else names its element
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"`{name}` must hold numbers (shape {shape_of(arr)}): {exc}") from exc
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"`{name}` must hold numbers, got dtype {arr.dtype} (shape {shape_of(arr)})")
    return arr


def _float_dtype(arr: np.ndarray) -> np.dtype:
    """float32 stays float32, everything else (ints, float16, float64) becomes float64."""
    return np.dtype(np.float32) if arr.dtype == np.float32 else np.dtype(np.float64)


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise a ValueError naming ``name``, its shape and its count of NaN/inf values, if any."""
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise ValueError(
            f"`{name}` (shape {shape_of(arr)}) contains {bad} non-finite values (NaN or inf); "
            "drop or impute them before fitting"
        )


def check_features(
    X: object,
    name: str = "X",
    n_features: Optional[int] = None,
    estimator: str = "the estimator",
    finite: bool = True,
) -> np.ndarray:
    """Validate a (n_samples, n_features) design matrix; returns float32/float64 C-ordered.

    At least one sample and one feature; ``n_features`` (the fitted width) is checked with
    scikit-learn's wording, naming ``estimator``. ``finite=False`` leaves the NaN/inf check to
    the caller (:func:`check_finite`), who reads the data anyway (as :func:`centre_columns`)."""
    arr = _to_numpy(X, name)
    if arr.ndim != 2:
        raise ValueError(
            f"`{name}` must be 2-D (n_samples, n_features), got shape {shape_of(arr)}. Reshape your data: "
            f"a single sample with {name}.reshape(1, -1), a single feature with {name}.reshape(-1, 1)"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"`{name}` has 0 sample(s) (shape={shape_of(arr)}) while a minimum of 1 is required")
    if arr.shape[1] == 0:
        raise ValueError(f"`{name}` has 0 feature(s) (shape={shape_of(arr)}) while a minimum of 1 is required.")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(
            f"{name} has {arr.shape[1]} features, but {estimator} is expecting {n_features} features as "
            f"input (got shape {shape_of(arr)})"
        )
    arr = np.ascontiguousarray(arr, dtype=_float_dtype(arr))
    if finite:
        check_finite(arr, name)
    return arr


def centre_columns_numpy(X: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference of :func:`centre_columns` in plain NumPy."""
    mean = X.mean(axis=0, dtype=np.float64)
    centred = X - mean
    return centred, mean, np.einsum("ij,ij->j", centred, centred)


def centre_columns(X: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Column-centred copy of a float32/float64 (n, p) array in float64, in two passes.

    Returns :math:`X_c = X - 1 \bar x^\top`, :math:`\bar x` (the column means, summed in row
    order in float64: the bits of ``X.mean(axis=0, dtype=np.float64)``) and the column sums of
    squares :math:`\sum_i X_{c,ij}^2`. A NaN or inf in a column makes its mean non-finite, so
    a caller checks finiteness on the ``p`` means instead of the ``n p`` values. No overflow
    warnings (a finite ``X`` whose sums overflow gives non-finite means and sums).
    """
    ext = extension()
    if ext is None:
        with np.errstate(over="ignore", invalid="ignore"):
            return centre_columns_numpy(X)
    return ext.centre_columns(X)


def check_gram(K: object, name: str = "K") -> np.ndarray:
    """Validate a train Gram matrix: square (n, n), finite, symmetric to 1e-6 of its largest
    entry; returns it in float64, exactly symmetrised."""
    arr = _to_numpy(K, name)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"`{name}` must be a square (n_samples, n_samples) Gram matrix, got shape {shape_of(arr)}")
    if arr.shape[0] == 0:
        raise ValueError(f"`{name}` has 0 sample(s) (shape={shape_of(arr)}) while a minimum of 1 is required")
    arr = np.asarray(arr, dtype=np.float64)
    check_finite(arr, name)
    asym = float(np.max(np.abs(arr - arr.T)))
    if asym > 1e-6 * max(float(np.max(np.abs(arr))), np.finfo(float).tiny):
        raise ValueError(
            f"`{name}` (shape {shape_of(arr)}) is not symmetric (largest |K - K.T| = {asym:.3g}): pass the "
            "train x train Gram matrix X @ X.T"
        )
    return (arr + arr.T) / 2.0


def centre_gram(K: np.ndarray) -> Tuple[np.ndarray, np.ndarray, float]:
    r"""Centred Gram :math:`J K J` (:math:`J = I - \tfrac1n 1 1^\top`): the inner products of
    the features centred by their mean. Also returns the column means of ``K`` and its grand
    mean, with which :func:`centre_cross_gram` centres a test x train cross-Gram the same way."""
    col_mean = K.mean(axis=0)
    grand = float(col_mean.mean())
    return K - col_mean[:, None] - col_mean[None, :] + grand, col_mean, grand


def centre_cross_gram(K_cross: np.ndarray, col_mean: np.ndarray, grand: float) -> np.ndarray:
    r"""Inner products of test and train features both centred by the *train* mean:
    :math:`K^{\times} - \bar k^{\times} 1^\top - 1 \bar k^\top + \bar{\bar k}` (row means of the
    cross-Gram, column means and grand mean of the train Gram from :func:`centre_gram`)."""
    return K_cross - K_cross.mean(axis=1, keepdims=True) - col_mean[None, :] + grand


def check_targets(Y: object, n_samples: int, x_shape: Tuple[int, ...], name: str = "Y") -> Tuple[np.ndarray, bool]:
    """Validate targets against ``n_samples``; returns a 2-D float64 array and whether Y was 1-D."""
    if Y is None:
        raise ValueError(f"`{name}` is None: this estimator requires y to be passed, but the target y is None")
    arr = _to_numpy(Y, name)
    if arr.ndim not in (1, 2):
        raise ValueError(f"`{name}` must be 1-D (n_samples,) or 2-D (n_samples, n_targets), got shape {shape_of(arr)}")
    if arr.shape[0] != n_samples:
        raise ValueError(
            f"`X` and `{name}` must have the same number of samples (rows), got X shape "
            f"{tuple(x_shape)} and {name} shape {shape_of(arr)}"
        )
    one_d = arr.ndim == 1
    arr = np.ascontiguousarray(arr.reshape(n_samples, -1), dtype=np.float64)
    if arr.shape[1] == 0:
        raise ValueError(f"`{name}` has no targets (shape {shape_of(arr)})")
    check_finite(arr, name)
    return arr, one_d


# --------------------------------------------------------------------------- reductions


def residual_moments_numpy(
    Y: np.ndarray, M: np.ndarray, d: Optional[np.ndarray] = None, m_is_residual: bool = False
) -> np.ndarray:
    """Reference of :func:`residual_moments` in plain NumPy."""
    if M.ndim == 3:  # stacked alphas: one (n, t) slice at a time
        return np.stack(
            [residual_moments_numpy(Y, M[:, a], None if d is None else d[a], m_is_residual) for a in range(M.shape[1])]
        )
    R = M.copy() if m_is_residual else Y - M  # the only (n, t) temporary
    if d is not None:
        R /= d[:, None]
    return np.stack([R.sum(axis=0), np.einsum("ij,ij->j", R, R), np.einsum("ij,ij->j", Y, R)])


def residual_moments(
    Y: np.ndarray, M: np.ndarray, d: Optional[np.ndarray] = None, m_is_residual: bool = False
) -> np.ndarray:
    r"""Per-target sums of the residuals :math:`r = (Y - M) / d` (or :math:`M / d`) in one pass.

    .. math::

        \text{out}_{0j} = \sum_i r_{ij}, \quad \text{out}_{1j} = \sum_i r_{ij}^2, \quad
        \text{out}_{2j} = \sum_i Y_{ij} r_{ij}, \qquad r_{ij} = (Y_{ij} - M_{ij}) / d_i

    Every ridge validation score (MSE, :math:`R^2`, Pearson) is a function of these three sums
    and the moments of ``Y``, so an alpha's fold is scored without keeping its residuals.

    Parameters
    ----------
    Y : float64 array of shape (n_samples, n_targets)
    M : float64 array of shape (n_samples, n_targets), or (n_samples, c, n_targets): ``c``
        alphas stacked (the layout of one product :math:`F\,[W_1 B, \dots, W_c B]`), each
        reduced against the same ``Y``
    d : float64 array of shape (n_samples,) (or (c, n_samples) with a stacked ``M``), optional
        (1 when absent)
    m_is_residual : bool
        ``M`` already holds :math:`Y - \hat Y` (computed without cancellation by the caller):
        :math:`r = M / d`.

    Returns
    -------
    float64 array of shape (3, n_targets), or (c, 3, n_targets) for a stacked ``M``. The C++
    kernel sums rows in fixed blocks, so the result is bitwise the same whatever the number of
    OpenMP threads (and each alpha's sums the same whether it is stacked or not).
    """
    ext = extension()
    if ext is None:
        return residual_moments_numpy(Y, M, d, m_is_residual)
    return ext.ridge_residual_moments(Y, M, d, m_is_residual)


def pearson_per_target_numpy(Y_true: np.ndarray, Y_pred: np.ndarray) -> np.ndarray:
    """Reference of :func:`pearson_per_target` in plain NumPy (float64)."""
    a = np.asarray(Y_true, dtype=np.float64)
    b = np.asarray(Y_pred, dtype=np.float64)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0)) * np.sqrt((b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=0) / np.where(denom > 0, denom, 1.0), np.nan)


def pearson_per_target(Y_true: object, Y_pred: object) -> np.ndarray:
    r"""Pearson correlation between matching columns (targets) of two arrays.

    .. math::

        \rho_j = \frac{\sum_i (y_{ij} - \bar y_j)(\hat y_{ij} - \bar{\hat y}_j)}
                      {\sqrt{\sum_i (y_{ij} - \bar y_j)^2}\,\sqrt{\sum_i (\hat y_{ij} - \bar{\hat y}_j)^2}}

    Two passes (means, then centred sums), accumulated in float64 whatever the input dtype;
    the C++ kernel reads float32 inputs without a converted copy.

    Parameters
    ----------
    Y_true, Y_pred : arrays (NumPy or torch) of shape (n_samples, n_targets) or (n_samples,)

    Returns
    -------
    float64 array of shape (n_targets,) (shape (1,) for 1-D inputs). A column that is constant
    in either input has no correlation: its entry is NaN and a ``RuntimeWarning`` says how many.
    """
    a = _to_numpy(Y_true, "Y_true")
    b = _to_numpy(Y_pred, "Y_pred")
    if a.ndim == 1:
        a = a[:, None]
    if b.ndim == 1:
        b = b[:, None]
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"`Y_true` and `Y_pred` must have the same shape (n_samples, n_targets), got "
            f"{shape_of(np.asarray(Y_true))} and {shape_of(np.asarray(Y_pred))}"
        )
    if a.shape[0] < 2:
        raise ValueError(f"Pearson correlation needs at least 2 samples, got shape {shape_of(a)}")
    dtype = np.float32 if (a.dtype == np.float32 and b.dtype == np.float32) else np.float64
    a = np.ascontiguousarray(a, dtype=dtype)
    b = np.ascontiguousarray(b, dtype=dtype)
    check_finite(a, "Y_true")
    check_finite(b, "Y_pred")
    ext = extension()
    out = pearson_per_target_numpy(a, b) if ext is None else ext.pearson_per_target(a, b)
    n_nan = int(np.isnan(out).sum())
    if n_nan:
        warnings.warn(
            f"pearson_per_target: {n_nan} of {out.size} target(s) are constant in Y_true or Y_pred; "
            "their correlation is undefined (NaN)",
            RuntimeWarning,
            stacklevel=2,
        )
    return out
