"""IT readouts: RidgeCV and PLSRegression against scikit-learn and himalaya on the same data.

Brain-Score-sized problem: 3,200 images, 168 IT sites, 20 alphas (``np.logspace(-3, 6, 20)``);
features p=2,048 (primal route) and p=50,000 (dual route, float32 storage). Every case checks
that the candidates agree with the baseline before its timing is reported.

``python -m benchmarks.compare_readouts --grid`` times RidgeCV leave-one-out and PLS-25
against scikit-learn on a grid of shapes (n samples x p features -> t targets), repeats
interleaved (scikit-learn, ours, scikit-learn, ...; a side whose runs are short is timed in its
own steady state, after untimed runs of itself, see :data:`SETTLE_BELOW_S`), and prints one row per shape: medians,
spreads (min-max), the ratio, and for ridge the *floor*: the time of the work scikit-learn and
this package both must do (the dual Gram and its eigendecomposition when p >= n, and in
every case the per-alpha products F diag(w) B, timed as the package forms them: alphas
stacked into wide products on the BLAS its size rule picks), so that ``bound = sklearn / floor`` is the
largest ratio any implementation sharing that work could reach, and ``reached = ratio /
bound``. PLS has no shared decomposition (scikit-learn iterates on the full data). A
per-shape time budget caps the repeats of slow shapes (at least one run of each side).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks._timing import Comparison, Timing, format_table, measure

ALPHAS = np.logspace(-3, 6, 20)


def make_problem(n: int, p: int, n_targets: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Correlated float32 features (a 64-d latent plus noise) and targets of varied noise."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 64)).astype(np.float32)
    X = latent @ rng.standard_normal((64, p)).astype(np.float32)
    X += 2.0 * rng.standard_normal((n, p)).astype(np.float32)
    readout = rng.standard_normal((64, n_targets)) / 8.0
    noise = rng.standard_normal((n, n_targets)) * rng.uniform(0.3, 3.0, n_targets)
    Y = (latent @ readout + noise).astype(np.float32)
    return X, Y


def _fit_once(fit: Callable[[], object], name: str):
    """Time one fit and keep its model: the slow baselines run once, and that run is also
    the reference the candidate is checked against."""
    start = time.perf_counter()
    model = fit()
    elapsed = time.perf_counter() - start
    return model, Timing(name, elapsed, elapsed, elapsed, 1)


def _reps(quick: bool) -> dict:
    return dict(repeats=3, warmup=1) if quick else dict(repeats=2, warmup=0)


def _assert_predictions(ours: np.ndarray, ref: np.ndarray, rtol: float, what: str) -> None:
    err = np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max()
    if err > rtol:
        raise AssertionError(f"{what}: predictions differ by {err:.2e} (relative to max), tolerance {rtol}")


#: Relative leave-one-out MSE within which a different alpha per target is accepted as a tie.
#: scikit-learn's gram mode (p >= n) corrects the LOO denominator for the intercept by a
#: subtraction that cancels ~1 / (alpha n) against itself, with an error ~ 1 / alpha: 4.3e-9
#: relative at 500 x 50,000 -> 100, alpha 1e-3 (ours equals a refit-per-sample LOO there to
#: 1e-15; see benchmarks/RESULTS.md and the test
#: test_dual_loo_is_exact_where_sklearn_intercept_correction_cancels). Below this tolerance
#: scikit-learn's own curve cannot order the two alphas.
ALPHA_TIE_RTOL = 1e-7


def check_ridge_against_sklearn(ours, ref, X: np.ndarray, Y: np.ndarray, what: str) -> str:
    """Same ``alpha_`` per target as scikit-learn's ``ref`` and predictions within 1e-5, except
    at ties: a target may choose another alpha only where both implementations' LOO MSE of the
    two alphas agree within :data:`ALPHA_TIE_RTOL` (scikit-learn's curve recomputed with
    ``store_cv_results``), and then its predictions must equal scikit-learn's ``Ridge`` at our
    alpha. Returns a note naming the tied targets ("" when every alpha is the same)."""
    from sklearn.linear_model import Ridge as SkRidge
    from sklearn.linear_model import RidgeCV as SkRidgeCV

    ours_alpha, ref_alpha = np.atleast_1d(ours.alpha_), np.atleast_1d(ref.alpha_)
    same = ours_alpha == ref_alpha
    pred, ref_pred = ours.predict(X).reshape(len(X), -1), ref.predict(X).astype(np.float64).reshape(len(X), -1)
    _assert_predictions(pred[:, same], ref_pred[:, same], 1e-5, what)
    differ = np.flatnonzero(~same)
    if differ.size == 0:
        return ""
    X64 = np.asarray(X, np.float64)
    Y64 = np.asarray(Y, np.float64)
    curves = SkRidgeCV(ALPHAS, alpha_per_target=True, store_cv_results=True).fit(X64, Y64[:, differ])
    sk_mse = curves.cv_results_.reshape(len(X), differ.size, len(ALPHAS)).mean(axis=0)  # (targets, alphas)
    details = []
    for row, j in enumerate(differ):
        a_ours, a_ref = (int(np.flatnonzero(ALPHAS == a)[0]) for a in (ours_alpha[j], ref_alpha[j]))
        our_mse = -ours.cv_scores_[:, j]
        pair = [a_ours, a_ref]
        gaps = {
            "scikit-learn's curve": abs(sk_mse[row, a_ours] - sk_mse[row, a_ref]) / sk_mse[row, a_ref],
            "our curve": abs(our_mse[a_ours] - our_mse[a_ref]) / our_mse[a_ours],
            "the two curves": float(np.max(np.abs(our_mse[pair] - sk_mse[row, pair]) / sk_mse[row, pair])),
        }
        worst = max(gaps, key=gaps.get)
        if gaps[worst] > ALPHA_TIE_RTOL:
            raise AssertionError(
                f"{what}: target {j} chose alpha {ours_alpha[j]:.3g}, scikit-learn {ref_alpha[j]:.3g}, and the LOO "
                f"MSE of the two alphas differ by {gaps[worst]:.2e} relative in {worst} (tie tolerance {ALPHA_TIE_RTOL})"
            )
        at_ours = SkRidge(alpha=float(ours_alpha[j])).fit(X64, Y64[:, j]).predict(X64)
        _assert_predictions(pred[:, j], at_ours, 1e-5, f"{what}, target {j} at alpha {ours_alpha[j]:.3g}")
        details.append(f"{j} ({ours_alpha[j]:.3g} vs {ref_alpha[j]:.3g}, LOO MSE within {max(gaps.values()):.1e})")
    return (
        f"{differ.size} of {same.size} targets chose another alpha than scikit-learn at a tie (relative LOO MSE "
        f"within {ALPHA_TIE_RTOL:g} in both implementations): target " + ", ".join(details)
    )


def _loo_case(X, Y, label: str, quick: bool) -> Comparison:
    from sklearn.linear_model import RidgeCV as SkRidgeCV

    from harmonizer_fast.neural.ridge import RidgeCV

    ref, base = _fit_once(lambda: SkRidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y), "sklearn RidgeCV LOO")
    ours = RidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y)
    tie_note = check_ridge_against_sklearn(ours, ref, X, Y, label)
    if tie_note:
        print(f"{label}: {tie_note}", file=sys.stderr, flush=True)
    cand = measure(lambda: RidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y), name="RidgeCV LOO", **_reps(quick))
    note = "same alphas_" + (" (or ties, see stderr)" if tie_note else "") + ", predictions <= 1e-5"
    return Comparison(f"{label} LOO, per-target alpha", base, [cand], note=note)


def _kfold_case(X, Y, label: str, quick: bool, dual: bool) -> Comparison:
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV as HimRidgeCV

    from harmonizer_fast.neural.ridge import RidgeCV

    set_backend("torch", on_error="raise")

    def himalaya_fit():
        if dual:
            model = KernelRidgeCV(alphas=ALPHAS, kernel="linear", cv=5, fit_intercept=True)
        else:
            model = HimRidgeCV(alphas=ALPHAS, cv=5, fit_intercept=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.fit(X, Y)

    def ours_fit():
        # himalaya scores folds by negative MSE and keeps one alpha per target
        return RidgeCV(ALPHAS, cv=5, alpha_per_target=True, scoring="neg_mean_squared_error").fit(X, Y)

    ref, base = _fit_once(himalaya_fit, f"himalaya {'KernelRidgeCV' if dual else 'RidgeCV'} (torch)")
    ours = ours_fit()
    ref_alphas = np.asarray(ref.best_alphas_.cpu() if hasattr(ref.best_alphas_, "cpu") else ref.best_alphas_)
    same = np.isclose(ours.alpha_, ref_alphas, rtol=1e-4)
    if same.mean() < 0.9:
        raise AssertionError(f"{label}: only {same.mean():.0%} of targets chose himalaya's alpha")
    ref_pred = np.asarray(ref.predict(X).cpu() if hasattr(ref.predict(X), "cpu") else ref.predict(X), np.float64)
    # himalaya runs in float32: agreement to float32 accuracy on the targets with the same alpha
    _assert_predictions(ours.predict(X)[:, same], ref_pred[:, same], 2e-3, label)
    cand = measure(ours_fit, name="RidgeCV 5-fold", **_reps(quick))
    cand.extra["same_alpha"] = f"{same.mean():.0%}"
    return Comparison(f"{label} 5-fold, per-target alpha", base, [cand], note="float32 himalaya vs float64 ours")


def _pls_case(X, Y, label: str, quick: bool) -> Comparison:
    from sklearn.cross_decomposition import PLSRegression as SkPLS

    from harmonizer_fast.neural.pls import PLSRegression

    ref, base = _fit_once(lambda: SkPLS(25, scale=False).fit(X, Y), "sklearn PLSRegression(25)")
    ours = PLSRegression(25).fit(X, Y)
    if ours.n_iter_ != ref.n_iter_:
        raise AssertionError(f"{label}: NIPALS iteration counts differ: {ours.n_iter_} vs {ref.n_iter_}")
    _assert_predictions(ours.predict(X), ref.predict(X).astype(np.float64), 1e-4, label)
    cand = measure(lambda: PLSRegression(25).fit(X, Y), name="PLSRegression(25)", **_reps(quick))
    cand.extra["nipals_iters"] = str(sum(ref.n_iter_))
    return Comparison(f"{label} PLS-25", base, [cand], note="same n_iter_, predictions <= 1e-4")


def _pearson_case(Y: np.ndarray) -> Comparison:
    from harmonizer_fast.neural._backend import pearson_per_target, pearson_per_target_numpy

    pred = Y + np.random.default_rng(1).standard_normal(Y.shape).astype(np.float32)
    np.testing.assert_allclose(pearson_per_target(Y, pred), pearson_per_target_numpy(Y, pred), rtol=1e-10)
    base = measure(lambda: pearson_per_target_numpy(Y, pred), name="NumPy", repeats=20, warmup=2)
    cand = measure(lambda: pearson_per_target(Y, pred), name="C++ pearson_per_target", repeats=20, warmup=2)
    return Comparison(f"pearson per target {Y.shape}", base, [cand])


def compare(quick: bool) -> Tuple[str, List[Comparison]]:
    n, t = (800, 40) if quick else (3200, 168)
    p_primal, p_dual = (256, 4000) if quick else (2048, 50000)
    X, Y = make_problem(n, p_primal, t)
    cases = [
        lambda: _pearson_case(Y),
        lambda: _loo_case(X, Y, f"primal n={n} p={p_primal} t={t}", quick),
        lambda: _kfold_case(X, Y, f"primal n={n} p={p_primal} t={t}", quick, dual=False),
        lambda: _pls_case(X, Y, f"n={n} p={p_primal} t={t}", quick),
        lambda: _loo_case(*dual_problem(), f"dual n={n} p={p_dual} t={t} (float32 X)", quick),
        lambda: _kfold_case(*dual_problem(), f"dual n={n} p={p_dual} t={t} (float32 X)", quick, dual=True),
    ]
    cache = {}

    def dual_problem():
        if "dual" not in cache:
            cache["dual"] = make_problem(n, p_dual, t, seed=1)
        return cache["dual"]

    comparisons = []
    for case in cases:
        comparisons.append(case())
        # progress on stderr: a long full run leaves its finished rows behind
        print(format_table(comparisons[-1:]), file=sys.stderr, flush=True)
    return f"IT readouts ({len(ALPHAS)} alphas)", comparisons


# --------------------------------------------------------------------------- shape grid

#: (n samples, p features, t targets) of the grid: both routes of the ridge (p < n primal,
#: p >= n dual), the issue's weak shapes (ridge 1600 x 1000 -> 80, PLS 1500 x 400 -> 40) and
#: the corners of n 500..5000, p 200..50,000, t 10..500 that a 2-core machine runs in minutes.
RIDGE_GRID: Tuple[Tuple[int, int, int], ...] = (
    (500, 200, 10),
    (1600, 1000, 80),
    (5000, 200, 500),
    (5000, 1000, 50),
    (1000, 5000, 10),
    (500, 50000, 100),
    (2000, 10000, 500),
)
#: scikit-learn's PLS makes ~100 NIPALS passes over X and Y per component on these data (tol
#: 1e-6), so its wide or many-target shapes take minutes per fit (5000 x 200 -> 500: 250 s,
#: 500 x 10,000 -> 50: 93 s on the loaded 2-core machine): those are in PLS_WIDE_GRID (--wide).
PLS_GRID: Tuple[Tuple[int, int, int], ...] = (
    (500, 200, 10),
    (1500, 400, 40),
    (5000, 200, 50),
    (1000, 2000, 100),
    (500, 5000, 20),
)
PLS_WIDE_GRID: Tuple[Tuple[int, int, int], ...] = ((5000, 200, 500), (500, 10000, 50), (500, 50000, 100))
TINY_GRID: Tuple[Tuple[int, int, int], ...] = ((60, 30, 3), (40, 90, 4))


#: Runs shorter than this are timed in the steady state of their own side: before each timed run,
#: untimed runs of the same side for at least :data:`SETTLE_S`. Timed right after the other
#: library, a short run pays for what that run left behind: scikit-learn's two-thread OpenBLAS
#: calls leave its worker threads spin-waiting on the other core for ~0.1 s (OpenBLAS's default
#: thread timeout, 2^28 cycles), which slows a one-thread fit on this 2-vCPU machine
#: (500 x 200 -> 10, quiet, medians of 30: this package's fit 4.2 ms right after a scikit-learn
#: fit, 4.4 ms with 5 ms between them, 3.95 ms after a scikit-learn fit with OpenBLAS held at one
#: thread, 3.65 ms after 0.15 s of its own fits, 3.60 ms repeated back to back), while this
#: package's fits leave no thread spinning (scikit-learn's fit: 18.5 ms both right after ours and
#: in its own steady state). A sweep fits back to back, so the steady state is what a user gets;
#: rounds still alternate the sides, so a load change hits both.
SETTLE_BELOW_S = 0.1
SETTLE_S = 0.15


def _settle(fn: Callable[[], object]) -> None:
    """Untimed runs of ``fn`` for at least :data:`SETTLE_S` (at least one)."""
    end = time.perf_counter() + SETTLE_S
    fn()
    while time.perf_counter() < end:
        fn()


def _time(fn: Callable[[], object]) -> Tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _ridge_floor(X: np.ndarray, Y: np.ndarray, n_alphas: int) -> float:
    """Seconds of the work both RidgeCV implementations share on this shape, run under the
    package's thread rules (small decompositions and products on one BLAS thread)."""
    from harmonizer_fast.neural._backend import matmul, threads_for_product
    from harmonizer_fast.neural.ridge_path import path_chunk
    from harmonizer_fast.neural.ridge_solvers import eigh_psd

    n, p = X.shape
    t = Y.shape[1]
    Xc = np.asarray(X, np.float64) - X.mean(axis=0, dtype=np.float64)
    start = time.perf_counter()
    k = min(n, p)
    if p >= n:  # scikit-learn's 'eigen' mode: eigendecomposition of X X^T, as the dual route
        eigh_psd(Xc @ Xc.T)
    F = np.ascontiguousarray(Xc[:, :k])
    # the per-alpha products (n x k) @ (k x t), formed as the package forms them: up to
    # PATH_COLUMNS columns of stacked alphas per product, on the BLAS of the size rule
    chunk = path_chunk(n_alphas, t)
    B = np.ones((k, chunk * t))
    out = np.empty((n, chunk * t))
    with threads_for_product(n * k * t):
        for _ in range(-(-n_alphas // chunk)):
            matmul(F, B, out=out)
    return time.perf_counter() - start


def _grid_row(kind: str, shape: Tuple[int, int, int], repeats: int, budget_s: float) -> dict:
    from sklearn.cross_decomposition import PLSRegression as SkPLS
    from sklearn.linear_model import RidgeCV as SkRidgeCV

    from harmonizer_fast.neural.pls import PLSRegression
    from harmonizer_fast.neural.ridge import RidgeCV

    n, p, t = shape
    X, Y = make_problem(n, p, t)
    if kind == "ridge":
        sk_fit = lambda: SkRidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y)  # noqa: E731
        our_fit = lambda: RidgeCV(ALPHAS, alpha_per_target=True).fit(X, Y)  # noqa: E731
    else:
        sk_fit = lambda: SkPLS(25, scale=False).fit(X, Y)  # noqa: E731
        our_fit = lambda: PLSRegression(25).fit(X, Y)  # noqa: E731
    start = time.perf_counter()
    our_fit()  # warm-up (imports, first-touch of the BLAS buffers); also checked below
    ref, sk_first = _time(sk_fit)
    ours, our_first = _time(our_fit)
    note = ""
    if kind == "ridge":
        note = check_ridge_against_sklearn(ours, ref, X, Y, f"ridge {shape}")
    else:
        if ours.n_iter_ != ref.n_iter_:
            raise AssertionError(f"PLS {shape}: NIPALS iteration counts differ")
        _assert_predictions(ours.predict(X), ref.predict(X).astype(np.float64), 1e-4, f"PLS {shape}")
    sk_times, our_times = [sk_first], [our_first]
    settle_sk, settle_ours = sk_first < SETTLE_BELOW_S, our_first < SETTLE_BELOW_S
    if settle_sk or settle_ours:  # the first runs followed the other side: time them again
        sk_times, our_times = [], []
    round_s = sk_first + our_first + SETTLE_S * (settle_sk + settle_ours)  # one round of the loop
    while len(sk_times) < repeats and (not sk_times or time.perf_counter() - start + round_s < budget_s):
        if settle_sk:
            _settle(sk_fit)
        sk_times.append(_time(sk_fit)[1])  # interleaved: a load change hits both sides
        if settle_ours:
            _settle(our_fit)
        our_times.append(_time(our_fit)[1])
    row = dict(
        kind=kind,
        shape=shape,
        sklearn=statistics.median(sk_times),
        sklearn_spread=(min(sk_times), max(sk_times)),
        ours=statistics.median(our_times),
        ours_spread=(min(our_times), max(our_times)),
        repeats=len(sk_times),
        note=note,
    )
    row["ratio"] = row["sklearn"] / row["ours"]
    if kind == "ridge":
        floors = [_ridge_floor(X, Y, len(ALPHAS))]
        while len(floors) < min(3, len(sk_times)) and time.perf_counter() - start + floors[-1] < budget_s:
            floors.append(_ridge_floor(X, Y, len(ALPHAS)))
        floor = statistics.median(floors)
        row["floor"] = floor
        row["bound"] = row["sklearn"] / floor
    return row


def format_grid(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`run_grid`'s rows."""
    lines = [
        "| readout | n x p -> t | scikit-learn median (min-max) | ours median (min-max) | ratio | "
        "floor | bound | reached | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n, p, t = r["shape"]
        sk_lo, sk_hi = r["sklearn_spread"]
        o_lo, o_hi = r["ours_spread"]
        bound = f"{r['bound']:.1f}x" if "bound" in r else "-"
        reached = f"{r['ratio'] / r['bound']:.0%}" if "bound" in r else "-"
        floor = _fmt_s(r["floor"]) if "floor" in r else "-"
        label = "RidgeCV LOO" if r["kind"] == "ridge" else "PLS-25"
        lines.append(
            f"| {label} | {n} x {p} -> {t} | {_fmt_s(r['sklearn'])} ({_fmt_s(sk_lo)}-{_fmt_s(sk_hi)}) | "
            f"{_fmt_s(r['ours'])} ({_fmt_s(o_lo)}-{_fmt_s(o_hi)}) | {r['ratio']:.1f}x | {floor} | {bound} | "
            f"{reached} | {r['repeats']} |"
        )
    notes = [f"- {'RidgeCV LOO' if r['kind'] == 'ridge' else 'PLS-25'} {' x '.join(map(str, r['shape'][:2]))} -> "
             f"{r['shape'][2]}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def run_grid(
    ridge_grid: Sequence[Tuple[int, int, int]] = RIDGE_GRID,
    pls_grid: Sequence[Tuple[int, int, int]] = PLS_GRID,
    repeats: int = 5,
    budget_s: float = 25.0,
) -> List[dict]:
    """Time every shape of both grids (see the module docstring); rows also go to stderr."""
    rows = []
    jobs = [("ridge", s) for s in ridge_grid] + [("pls", s) for s in pls_grid]
    for kind, shape in jobs:
        rows.append(_grid_row(kind, shape, repeats, budget_s))
        print("\n".join(format_grid(rows[-1:]).splitlines()[2:]), file=sys.stderr, flush=True)  # row (+ note)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="IT readouts against scikit-learn")
    parser.add_argument("--grid", action="store_true", help="ratio table over the shape grid")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (checks that the script runs)")
    parser.add_argument("--wide", action="store_true", help="add PLS shapes where scikit-learn takes minutes")
    parser.add_argument(
        "--readout", choices=("both", "ridge", "pls"), default="both", help="grid: one readout only (a run in parts)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per shape and side (grid)")
    parser.add_argument("--budget-s", type=float, default=25.0, help="seconds per shape before repeats stop")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (without --grid)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.budget_s <= 0:
        parser.error(f"--repeats must be >= 1 and --budget-s > 0, got {args.repeats} and {args.budget_s}")
    if args.grid:
        grids = (TINY_GRID, TINY_GRID) if args.tiny else (RIDGE_GRID, PLS_GRID + (PLS_WIDE_GRID if args.wide else ()))
        grids = tuple(g if args.readout in ("both", kind) else () for g, kind in zip(grids, ("ridge", "pls")))
        start = time.perf_counter()
        rows = run_grid(*grids, repeats=args.repeats, budget_s=args.budget_s)
        print(f"### IT readouts vs scikit-learn, shape grid ({len(ALPHAS)} alphas, PLS tol 1e-6)\n")
        print(format_grid(rows))
        print(f"\n(total {time.perf_counter() - start:.0f} s)")
        return 0
    title, comparisons = compare(args.quick)
    print(format_table(comparisons, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
