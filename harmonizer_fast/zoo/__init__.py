"""Model-zoo sweeps: every layer of many models scored on IT benchmarks, into one resumable table.

Entry points: :func:`sweep` (Python), ``harmonizer-fast sweep`` (CLI), :func:`demo_sweep` (the
README demo). Pieces: :mod:`~harmonizer_fast.zoo.layers` (layer discovery, one-pass extraction),
:mod:`~harmonizer_fast.zoo.benchmarks` (benchmark registry, streaming sinks, layer selection on
disjoint data), :mod:`~harmonizer_fast.zoo.results` (the crash-safe table),
:mod:`~harmonizer_fast.zoo.report` (figures, HTML), :mod:`~harmonizer_fast.zoo.ray_runner`.
"""
from harmonizer_fast.zoo.benchmarks import BENCHMARKS, LayerResult, get_benchmark, register_benchmark
from harmonizer_fast.zoo.demo import PUBLISHED_TOP1, demo_sweep
from harmonizer_fast.zoo.layers import LayerExtractor, discover_layers
from harmonizer_fast.zoo.report import write_report
from harmonizer_fast.zoo.results import COLUMNS, ResultStore, SweepRow, model_table, read_table, rows_equal
from harmonizer_fast.zoo.sweep import PACKAGED_WEIGHTS, ModelSpec, SweepUnit, run_unit, sweep

__all__ = [
    "BENCHMARKS", "COLUMNS", "LayerExtractor", "LayerResult", "ModelSpec", "PACKAGED_WEIGHTS", "PUBLISHED_TOP1",
    "ResultStore", "SweepRow", "SweepUnit", "demo_sweep", "discover_layers", "get_benchmark", "model_table",
    "read_table", "register_benchmark", "rows_equal", "run_unit", "sweep", "write_report",
]
