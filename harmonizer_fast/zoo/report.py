"""Figures and a self-contained HTML report of a sweep table.

* ``tradeoff_<benchmark>.png``: ImageNet top-1 (x) against the ceiled IT score of each model's
  selected layer (y), one point per model; harmonized models are drawn as red stars, the others
  as grey dots. Models without a known accuracy are listed in the caption, not plotted.
* ``layers_<benchmark>.png``: per-layer score curves (report score against layer depth, one line
  per model; the selected layer is circled).
* ``report.html``: both figures embedded as base64 PNGs, the per-model table and the full table.
"""
from __future__ import annotations

import base64
import html
import math
import os
import re
from typing import Dict, List, Sequence

from harmonizer_fast.zoo.results import COLUMNS, SweepRow, atomic_write_bytes, model_table

__all__ = ["is_harmonized_name", "plot_tradeoff", "plot_layer_curves", "write_report"]

_HARMONIZED = re.compile(r"harmoni[sz]ed|(^|[_.-])harmonizer?($|[_.-])", re.IGNORECASE)


def is_harmonized_name(model: str) -> bool:
    """Name rule for marking harmonized models: the name contains 'harmonized' or a 'harmonizer' word."""
    return bool(_HARMONIZED.search(model))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_tradeoff(rows: Sequence[SweepRow], benchmark: str, path: str) -> List[str]:
    """ImageNet accuracy vs ceiled score, one point per model; returns the models left out."""
    plt = _pyplot()
    chosen = [r for r in model_table(rows) if r.benchmark == benchmark]
    plotted = [r for r in chosen if math.isfinite(r.imagenet_top1) and math.isfinite(r.ceiled_score)]
    left_out = sorted(r.model for r in chosen if r not in plotted)
    fig, ax = plt.subplots(figsize=(6.0, 4.5), dpi=110)
    for harmonized, style in ((False, dict(marker="o", color="0.45", s=36, label="standard")),
                              (True, dict(marker="*", color="crimson", s=140, label="harmonized"))):
        group = [r for r in plotted if r.harmonized == harmonized]
        if group:
            ax.scatter([r.imagenet_top1 for r in group], [r.ceiled_score for r in group], zorder=3, **style)
            for r in group:
                ax.annotate(r.model, (r.imagenet_top1, r.ceiled_score), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("ImageNet top-1 accuracy (%)")
    ax.set_ylabel(f"ceiled score on {benchmark} (selected layer)")
    title = f"Accuracy vs {benchmark}"
    if left_out:
        title += f"\n(no accuracy for: {', '.join(left_out[:6])}{' ...' if len(left_out) > 6 else ''})"
    _finish(plt, fig, ax, title, bool(plotted), path)
    return left_out


def plot_layer_curves(rows: Sequence[SweepRow], benchmark: str, path: str) -> None:
    """Report score of every layer against its depth (layer index), one curve per model."""
    plt = _pyplot()
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
        for d, r in zip(depth, layer_rows):
            if r.selected:
                ax.scatter([d], [r.score], s=90, facecolors="none", edgecolors=line.get_color(), zorder=4)
    ax.set_xlabel("relative layer depth (0 = first candidate, 1 = last)")
    ax.set_ylabel(f"score on {benchmark} (report split)")
    _finish(plt, fig, ax, "Per-layer scores (circle: layer chosen on the selection split)", bool(by_model), path)


def _finish(plt, fig, ax, title: str, legend: bool, path: str) -> None:
    """Title, legend, grid; then the PNG is written atomically and the figure closed."""
    import io

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


def write_report(rows: Sequence[SweepRow], out_dir: str) -> Dict[str, str]:
    """Write the PNG figures of every benchmark and ``report.html``; returns name -> path."""
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, str] = {}
    sections = []
    for benchmark in sorted({r.benchmark for r in rows}):
        tradeoff = os.path.join(out_dir, f"tradeoff_{_safe(benchmark)}.png")
        curves = os.path.join(out_dir, f"layers_{_safe(benchmark)}.png")
        left_out = plot_tradeoff(rows, benchmark, tradeoff)
        plot_layer_curves(rows, benchmark, curves)
        paths[f"tradeoff_{benchmark}"] = tradeoff
        paths[f"layers_{benchmark}"] = curves
        note = (f"<p>No ImageNet accuracy (give <code>--accuracy-csv</code>) for: "
                f"{html.escape(', '.join(left_out))}</p>") if left_out else ""
        sections.append(
            f"<h2>{html.escape(benchmark)}</h2>{note}"
            f"<img alt='accuracy vs ceiled score' src='data:image/png;base64,{_b64(tradeoff)}'>"
            f"<img alt='per-layer scores' src='data:image/png;base64,{_b64(curves)}'>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>harmonizer_fast sweep</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}tr.sel{background:#fff3c4}img{max-width:48%}</style>"
        "</head><body><h1>Model-zoo sweep</h1>"
        "<p>Scores are measured on report images; the layer of each model is chosen on disjoint "
        "selection images (highlighted rows).</p>"
        + "".join(sections)
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
