"""Figures and a self-contained HTML report of a sweep table.

* ``tradeoff_<benchmark>.png``: ImageNet top-1 (x) against the ceiled IT score of each model's
  selected layer (y) or, for the ``clickme`` benchmark, its ClickMe alignment; one point per
  model with its standard error; harmonized models are red stars, the others grey dots. Models
  without a known top-1 are drawn hollow in a grey "top-1 unknown" strip left of the others and
  named in the title (never dropped).
* ``alignment_<clickme>_vs_<benchmark>.png``: each model's ClickMe alignment (x) against its
  ceiled IT score (y), when a sweep has both.
* ``layers_<benchmark>.png``: per-layer score curves of the IT benchmarks (report score against
  layer depth, one line per model, a band of one standard error; the selected layer is circled).
* ``report.html``: the figures embedded as base64 PNGs (the headline ones side by side), the
  per-model table and the full table.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from typing import Dict, List, Optional, Sequence

from harmonizer_fast.evaluation.figure import agg_pyplot
from harmonizer_fast.zoo.clickme_benchmark import CLICKME_LAYER_METHOD
from harmonizer_fast.zoo.results import COLUMNS, SweepRow, atomic_write_bytes, model_table

__all__ = ["ceiled_error", "is_harmonized_name", "plot_tradeoff", "plot_alignment_vs_it", "plot_layer_curves", "write_report"]

_HARMONIZED = re.compile(r"harmoni[sz]ed|(^|[_.-])harmonizer?($|[_.-])", re.IGNORECASE)


def is_harmonized_name(model: str) -> bool:
    """Name rule for marking harmonized models: the name contains 'harmonized' or a 'harmonizer' word."""
    return bool(_HARMONIZED.search(model))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


#: x position of the "top-1 unknown" strip, as a fraction of the known accuracies' span left of them.
_UNKNOWN_STRIP = 0.18


def ceiled_error(row: SweepRow) -> float:
    """The raw score's standard error carried onto the ceiled axis (scaled by ceiled / raw)."""
    if not (math.isfinite(row.score_error) and math.isfinite(row.ceiled_score)) or row.score == 0:
        return 0.0
    return abs(row.score_error * row.ceiled_score / row.score)


def _scatter_models(ax, points: Sequence[tuple]) -> None:
    """``(x, y, xerr, yerr, row, known)`` points: grey dots / red stars (harmonized), hollow when
    the x value is not known (drawn in the unknown strip), each labelled with its model."""
    for x, y, xerr, yerr, row, known in points:
        marker, colour, size = ("*", "crimson", 15) if row.harmonized else ("o", "0.35", 7)
        ax.errorbar([x], [y], xerr=[xerr] if xerr else None, yerr=[yerr] if yerr else None, fmt=marker,
                    color=colour, markersize=size, markerfacecolor=colour if known else "white",
                    markeredgewidth=1.4, ecolor=colour, elinewidth=1, capsize=2, zorder=3)
    for (x, y, *_rest), dy in zip(points, _label_offsets(ax, points)):
        ax.annotate(_rest[2].model, (x, y), fontsize=8, xytext=(6, dy), textcoords="offset points",
                    arrowprops=dict(arrowstyle="-", color="0.6", lw=0.6) if dy != 4 else None)
    handles = [ax.scatter([], [], marker="o", color="0.35", s=40, label="standard"),
               ax.scatter([], [], marker="*", color="crimson", s=140, label="harmonized")]
    if any(not known for *_, known in points):
        handles.append(ax.scatter([], [], marker="o", facecolors="white", edgecolors="0.35", s=40,
                                  label="top-1 not measured (hollow)"))
    ax.legend(handles=handles, fontsize=8, loc="best")


def _label_offsets(ax, points: Sequence[tuple]) -> List[float]:
    """Vertical label offsets (points) that keep labels of nearby points from overlapping:
    a label close (in axis fractions) to an earlier one is moved below it."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed: List[tuple] = []
    offsets = []
    for x, y, *_ in points:
        fx, fy = (x - x0) / ((x1 - x0) or 1.0), (y - y0) / ((y1 - y0) or 1.0)
        dy = 4.0
        while any(abs(fx - px) < 0.3 and abs((fy + dy / 300) - py) < 0.04 for px, py in placed):
            dy -= 11.0
        placed.append((fx, fy + dy / 300))
        offsets.append(dy)
    return offsets


def _accuracy_points(chosen: Sequence[SweepRow], y_of) -> tuple:
    """Points of an accuracy-vs-score figure; models without a top-1 go to a marked strip left of
    the known accuracies (never dropped). Returns (points, strip x or None, unknown model names)."""
    scored = [r for r in chosen if math.isfinite(y_of(r)[0])]  # a NaN score has no place on the y axis
    known = [r for r in scored if math.isfinite(r.imagenet_top1)]
    unknown = [r for r in scored if not math.isfinite(r.imagenet_top1)]
    xs = [r.imagenet_top1 for r in known] or [50.0]
    span = max(max(xs) - min(xs), 5.0)
    strip = min(xs) - _UNKNOWN_STRIP * span - 0.02 * span if unknown else None
    points = [(r.imagenet_top1, *y_of(r)[:1], 0.0, y_of(r)[1], r, True) for r in known]
    points += [(strip, y_of(r)[0], 0.0, y_of(r)[1], r, False) for r in unknown]
    return points, strip, sorted(r.model for r in unknown)


def _draw_unknown_strip(ax, strip: Optional[float], span: float) -> None:
    """Grey band at ``strip`` with its own tick ("not measured") and no accuracy ticks inside it,
    so a hollow point there cannot be read as an accuracy."""
    if strip is None:
        return
    half = 0.5 * _UNKNOWN_STRIP * span
    ax.axvspan(strip - half, strip + half, color="0.92", zorder=0)
    ax.axvline(strip + half, color="0.6", linewidth=0.8, linestyle=":", zorder=1)
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, strip - half), hi)
    ticks = [t for t in ax.get_xticks() if strip + half < t <= hi]
    ax.set_xticks([strip] + ticks)
    ax.set_xticklabels(["top-1 not\nmeasured"] + [f"{t:g}" for t in ticks])


def plot_tradeoff(rows: Sequence[SweepRow], benchmark: str, path: str) -> List[str]:
    """ImageNet top-1 (x) vs the ceiled score of each model on ``benchmark`` (y), one point per model.

    Models without a top-1 are drawn hollow in a grey "top-1 unknown" strip left of the others;
    returns their names. Vertical bars: the raw score's standard error on the ceiled axis.
    """
    plt = agg_pyplot()
    chosen = [r for r in model_table(rows) if r.benchmark == benchmark]
    points, strip, unknown = _accuracy_points(chosen, lambda r: (r.ceiled_score, ceiled_error(r)))
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    if points:
        _pad_limits(ax, points)
        _scatter_models(ax, points)
    known = [p[0] for p in points if p[5]] or [50.0]
    _draw_unknown_strip(ax, strip, max(max(known) - min(known), 5.0))
    ax.set_xlabel("ImageNet top-1 accuracy (%)")
    is_clickme = _is_model_level(chosen)
    ax.set_ylabel("ClickMe alignment (mean Spearman / human ceiling 0.658)" if is_clickme
                  else f"ceiled score on {benchmark} (selected layer)")
    title = f"ImageNet accuracy vs {'ClickMe alignment' if is_clickme else benchmark}"
    if unknown:
        title += f"\n(top-1 not measured for: {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''})"
    _finish(plt, fig, ax, title, False, path)
    return unknown


def plot_alignment_vs_it(rows: Sequence[SweepRow], clickme: str, benchmark: str, path: str) -> List[str]:
    """Each model's ClickMe alignment (x) vs its ceiled score on the IT ``benchmark`` (y), both
    with their standard errors; returns the models scored on only one of the two (listed in the title)."""
    plt = agg_pyplot()
    table = model_table(rows)
    alignment = {r.model: r for r in table if r.benchmark == clickme}
    it = {r.model: r for r in table if r.benchmark == benchmark}
    both = [m for m in it if m in alignment and math.isfinite(alignment[m].ceiled_score)
            and math.isfinite(it[m].ceiled_score)]
    missing = sorted((set(alignment) | set(it)) - set(both))
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    points = [(alignment[m].ceiled_score, it[m].ceiled_score, ceiled_error(alignment[m]),
               ceiled_error(it[m]), it[m], True) for m in both]
    if points:
        _pad_limits(ax, points)
        _scatter_models(ax, points)
    ax.set_xlabel("ClickMe alignment (mean Spearman / human ceiling 0.658)")
    ax.set_ylabel(f"ceiled score on {benchmark} (selected layer)")
    title = f"Human alignment vs {benchmark}"
    if missing:
        title += f"\n(scored on only one: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})"
    _finish(plt, fig, ax, title, False, path)
    return missing


def _pad_limits(ax, points: Sequence[tuple]) -> None:
    """Axis limits holding every point with its error bars, plus room for the labels."""
    xs = [v for x, _, xerr, *_ in points for v in (x - xerr, x + xerr)]
    ys = [v for _, y, _, yerr, *_ in points for v in (y - yerr, y + yerr)]
    for values, setter, right in ((xs, ax.set_xlim, 0.35), (ys, ax.set_ylim, 0.2)):
        lo, hi = min(values), max(values)
        span = max(hi - lo, 1e-3 + 0.1 * abs(hi))
        setter(lo - 0.08 * span, hi + right * span)


def _is_model_level(rows: Sequence[SweepRow]) -> bool:
    """Rows of a whole-model benchmark (ClickMe alignment), which has no layers to draw."""
    return bool(rows) and all(r.layer_method == CLICKME_LAYER_METHOD for r in rows)


def plot_layer_curves(rows: Sequence[SweepRow], benchmark: str, path: str) -> None:
    """Report score of every layer against its depth (layer index), one curve per model."""
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    by_model: Dict[str, List[SweepRow]] = {}
    for r in rows:
        if r.benchmark == benchmark:
            by_model.setdefault(r.model, []).append(r)
    for model, layer_rows in by_model.items():
        layer_rows = sorted(layer_rows, key=lambda r: r.layer_index)
        depth = [r.layer_index / max(len(layer_rows) - 1, 1) for r in layer_rows]
        line, = ax.plot(depth, [r.score for r in layer_rows], marker=".", label=model,
                        linestyle="--" if layer_rows[0].harmonized else "-")
        errors = [r.score_error if math.isfinite(r.score_error) else 0.0 for r in layer_rows]
        ax.fill_between(depth, [r.score - e for r, e in zip(layer_rows, errors)],
                        [r.score + e for r, e in zip(layer_rows, errors)], color=line.get_color(), alpha=0.2)
        for d, r in zip(depth, layer_rows):
            if r.selected:
                ax.scatter([d], [r.score], s=90, facecolors="none", edgecolors=line.get_color(), zorder=4)
    ax.set_xlabel("relative layer depth (0 = first candidate, 1 = last)")
    ax.set_ylabel(f"score on {benchmark} (report split)")
    _finish(plt, fig, ax, "Per-layer scores, band: \u00b11 s.e. over splits (circle: layer chosen on the selection split)",
            bool(by_model), path)


def _finish(plt, fig, ax, title: str, legend: bool, path: str) -> None:
    """Title, legend, grid; then the PNG is written atomically and the figure closed."""

    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    plt.close(fig)


def _html_table(rows: Sequence[SweepRow]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = getattr(r, c)
            text = f"{v:.4g}" if isinstance(v, float) and not isinstance(v, bool) else str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append(f"<tr{' class=sel' if r.selected else ''}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: str, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{_b64(path)}'>"


def write_report(rows: Sequence[SweepRow], out_dir: str) -> Dict[str, str]:
    """Write the PNG figures of every benchmark and ``report.html``; returns name -> path.

    Per IT benchmark: ``tradeoff_<benchmark>.png`` and ``layers_<benchmark>.png``. Per whole-model
    benchmark (ClickMe): ``tradeoff_<clickme>.png`` (accuracy vs alignment), and with each IT
    benchmark ``alignment_<clickme>_vs_<benchmark>.png``. The headline figures sit side by side.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, str] = {}
    benchmarks = sorted({r.benchmark for r in rows})
    model_level = [b for b in benchmarks if _is_model_level([r for r in rows if r.benchmark == b])]
    it_benchmarks = [b for b in benchmarks if b not in model_level]
    unknown: Dict[str, List[str]] = {}
    for benchmark in benchmarks:
        path = os.path.join(out_dir, f"tradeoff_{_safe(benchmark)}.png")
        unknown[benchmark] = plot_tradeoff(rows, benchmark, path)
        paths[f"tradeoff_{benchmark}"] = path
    headline, layers = [], []
    for benchmark in it_benchmarks:
        curves = os.path.join(out_dir, f"layers_{_safe(benchmark)}.png")
        plot_layer_curves(rows, benchmark, curves)
        paths[f"layers_{benchmark}"] = curves
        figures = [_img(paths[f"tradeoff_{benchmark}"], f"accuracy vs {benchmark}")]
        for clickme in model_level:
            figures.append(_img(paths[f"tradeoff_{clickme}"], f"accuracy vs {clickme} alignment"))
            both = os.path.join(out_dir, f"alignment_{_safe(clickme)}_vs_{_safe(benchmark)}.png")
            plot_alignment_vs_it(rows, clickme, benchmark, both)
            paths[f"alignment_{clickme}_vs_{benchmark}"] = both
            figures.append(_img(both, f"{clickme} alignment vs {benchmark}"))
        headline.append(f"<h3>{html.escape(benchmark)}</h3><div class=row>{''.join(figures)}</div>")
        layers.append(f"<h3>{html.escape(benchmark)}</h3>{_img(curves, 'per-layer scores')}")
    if not it_benchmarks:
        headline += [f"<div class=row>{_img(paths[f'tradeoff_{b}'], f'accuracy vs {b}')}</div>" for b in model_level]
    missing = sorted({m for names in unknown.values() for m in names})
    note = (f"<p>ImageNet top-1 not measured (drawn hollow in the grey strip; give <code>--accuracy-csv</code> "
            f"or <code>--imagenet DIR</code>) for: {html.escape(', '.join(missing))}</p>") if missing else ""
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>harmonizer_fast sweep</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}tr.sel{background:#fff3c4}"
        ".row{display:flex;flex-wrap:wrap;gap:8px}.row img{width:32%;min-width:380px}img{max-width:100%}</style>"
        "</head><body><h1>Model-zoo sweep</h1>"
        "<p>IT scores are measured on report images; the layer of each model is chosen on disjoint "
        "selection images (highlighted rows). ClickMe alignment is the mean Spearman correlation of "
        "each model's saliency with the human maps over the human ceiling (0.65753); it has no layer."
        " Harmonized models are red stars.</p>" + note
        + "<h2>ImageNet accuracy vs IT, vs ClickMe alignment, and alignment vs IT</h2>" + "".join(headline)
        + ("<h2>Per-layer IT scores</h2>" + "".join(layers) if layers else "")
        + "<h2>Per-model results (selected layer)</h2>" + _html_table(model_table(rows))
        + "<h2>All layers</h2>" + _html_table(rows)
        + "</body></html>"
    )
    report = os.path.join(out_dir, "report.html")
    atomic_write_bytes(report, page.encode())
    paths["report"] = report
    return paths


def _b64(path: str) -> str:
    with open(path, "rb") as handle:
        return base64.b64encode(handle.read()).decode()
