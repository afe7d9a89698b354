"""The sweep results table: one row per model x layer x benchmark, written crash-safely.

Storage layout of a sweep directory ``out/``::

    out/parts/<unit>.csv    rows of one finished (model, benchmark) unit, written atomically
    out/results.csv         every finished unit's rows merged, in sweep order (atomic rewrite)
    out/results.parquet     the same table, when pyarrow is installed
    out/models.csv          one row per model x benchmark: the layer chosen on the selection split
    out/units.json          the unit keys of the sweep that wrote the table (so a later sweep
                            with other models or options can say which units its table drops)

A unit's part file appears in one ``os.replace`` of a fully written and fsync'd temporary file,
so after a crash (even ``kill -9``) a part file is either complete or absent; a rerun skips the
units whose part file exists and redoes the others. ``results.csv`` is rebuilt from part files,
never appended to, so it cannot hold a half-written or duplicated row.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence

from harmonizer_fast._io import atomic_write_bytes

__all__ = [
    "SweepRow",
    "COLUMNS",
    "TIMING_COLUMNS",
    "ResultStore",
    "atomic_write_bytes",
    "read_table",
    "write_table",
    "model_table",
    "load_accuracy_csv",
    "rows_equal",
    "neutralize_formula",
    "restore_formula",
]


@dataclass
class SweepRow:
    """One scored layer of one model on one benchmark.

    ``score`` is the layer's score on its full features; ``selection_score`` is what the
    benchmark's layer-choice rule (``choice_rule``) ranks layers by, and ``selected`` marks the
    best layer of its (model, benchmark) pair by it. Rules: ``pca<k>-pca-images`` /
    ``pca<k>-own-stimuli`` (Brain-Score's: the layer reduced to ``k`` principal components fitted
    on separate images, or on the benchmark's own stimuli; the score is on all images),
    ``disjoint-halves`` (the images are halved: ``selection_score`` on one half, ``score`` on the
    other, no selection bias), ``disjoint-sites`` (the spatial benchmark's recording sites halved).
    ``ceiled_score`` follows the benchmark's ceiling convention (NaN without a ceiling);
    ``score_error`` is the benchmark's error of ``score`` over its splits.
    """

    model: str
    benchmark: str
    layer: str
    layer_index: int
    score: float
    score_error: float
    ceiling: float
    ceiled_score: float
    selection_score: float
    selected: bool
    choice_rule: str
    n_features: int
    imagenet_top1: float
    harmonized: bool
    extraction_s: float
    readout_s: float
    layer_method: str


COLUMNS: List[str] = [f.name for f in fields(SweepRow)]
#: columns that depend on wall-clock time, not on the data: ignore them when comparing runs.
TIMING_COLUMNS = ("extraction_s", "readout_s")
_TYPES = {f.name: f.type for f in fields(SweepRow)}


#: First characters that make a spreadsheet read a cell as a formula (OWASP's CSV-injection list).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_TEXT_GUARD = "'"


def neutralize_formula(text: str) -> str:
    """``text`` made inert for spreadsheets: a leading ``'`` before a formula prefix (and before an
    existing leading ``'``, so that :func:`restore_formula` gives back the original exactly)."""
    return _TEXT_GUARD + text if text.startswith(FORMULA_PREFIXES + (_TEXT_GUARD,)) else text


def restore_formula(text: str) -> str:
    """Inverse of :func:`neutralize_formula`."""
    return text[1:] if text.startswith(_TEXT_GUARD) else text


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return neutralize_formula(value)
    return str(value)


def _parse(column: str, text: str) -> object:
    kind = _TYPES[column]
    if kind in ("float", float):
        return float(text)
    if kind in ("int", int):
        return int(text)
    if kind in ("bool", bool):
        if text not in ("true", "false"):
            raise ValueError(f"column {column!r} must be true/false, got {text!r}")
        return text == "true"
    return restore_formula(text)


def _csv_bytes(rows: Sequence[SweepRow]) -> bytes:
    buffer = io.StringIO(newline="")
    # RFC 4180 line ends: csv then quotes any field holding a CR or LF, so a label with a
    # carriage return cannot split a row.
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_format(getattr(row, c)) for c in COLUMNS])
    return buffer.getvalue().encode()


def write_table(rows: Sequence[SweepRow], path: str) -> None:
    """Write ``rows`` atomically as CSV (floats in shortest round-trip form)."""
    atomic_write_bytes(path, _csv_bytes(rows))


def read_table(path: str) -> List[SweepRow]:
    """Read a table written by :func:`write_table`; a malformed file raises ``ValueError``."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != COLUMNS:
            raise ValueError(f"{path}: header {header} is not the sweep table's columns {COLUMNS}")
        rows = []
        for number, record in enumerate(reader, start=2):
            if len(record) != len(COLUMNS):
                raise ValueError(f"{path}:{number}: {len(record)} fields, expected {len(COLUMNS)}")
            rows.append(SweepRow(**{c: _parse(c, v) for c, v in zip(COLUMNS, record)}))
    return rows


def _write_parquet(rows: Sequence[SweepRow], path: str) -> bool:
    try:
        import pyarrow as pa  # optional: pyarrow (the `test` extra); without it no Parquet copy is written
        import pyarrow.parquet as pq  # optional, as above
    except ImportError:
        return False
    table = pa.Table.from_pylist([asdict(r) for r in rows])
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue().to_pybytes())
    return True


def rows_equal(a: Sequence[SweepRow], b: Sequence[SweepRow], ignore: Sequence[str] = ()) -> bool:
    """Same rows in the same order, NaN equal to NaN, ``ignore`` columns (e.g. timings) skipped."""

    def comparable(row: SweepRow) -> tuple:
        values = []
        for column in COLUMNS:
            if column in ignore:
                continue
            value = getattr(row, column)
            values.append("nan" if isinstance(value, float) and math.isnan(value) else value)
        return tuple(values)

    return len(a) == len(b) and all(comparable(x) == comparable(y) for x, y in zip(a, b))


def model_table(rows: Iterable[SweepRow]) -> List[SweepRow]:
    """The selected layer's row of each (model, benchmark): the per-model result."""
    return [row for row in rows if row.selected]


def unit_key(model: str, benchmark: str, config: Dict[str, object]) -> str:
    """File-safe name of a (model, benchmark) unit; the hash changes with its configuration."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}__{benchmark}")
    return f"{safe}__{digest}"


class ResultStore:
    """Crash-safe storage of a sweep's rows under ``out_dir`` (layout in the module docstring)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = os.path.abspath(out_dir)
        self.parts_dir = os.path.join(self.out_dir, "parts")
        os.makedirs(self.parts_dir, exist_ok=True)

    @property
    def table_path(self) -> str:
        return os.path.join(self.out_dir, "results.csv")

    @property
    def models_path(self) -> str:
        return os.path.join(self.out_dir, "models.csv")

    @property
    def parquet_path(self) -> str:
        return os.path.join(self.out_dir, "results.parquet")

    @property
    def units_path(self) -> str:
        return os.path.join(self.out_dir, "units.json")

    def table_units(self) -> List[str]:
        """Unit keys of the sweep that last wrote ``results.csv`` (empty when none did)."""
        if not os.path.exists(self.units_path):
            return []
        try:
            with open(self.units_path) as handle:
                keys = json.load(handle)
        except (OSError, ValueError):
            return []  # unreadable: only the warning about dropped units is lost
        return [str(k) for k in keys] if isinstance(keys, list) else []

    def part_path(self, key: str) -> str:
        return os.path.join(self.parts_dir, f"{key}.csv")

    def is_done(self, key: str) -> bool:
        """True when the unit's part file exists and parses (a corrupt one is redone)."""
        path = self.part_path(key)
        if not os.path.exists(path):
            return False
        try:
            return len(read_table(path)) > 0
        except (ValueError, OSError):
            return False

    def save_unit(self, key: str, rows: Sequence[SweepRow]) -> None:
        """Store one finished unit's rows in a single atomic step."""
        if not rows:
            raise ValueError(f"unit {key!r} produced no rows; nothing to store")
        write_table(rows, self.part_path(key))

    def load_unit(self, key: str) -> List[SweepRow]:
        return read_table(self.part_path(key))

    def merge(self, keys: Sequence[str]) -> List[SweepRow]:
        """Rebuild ``results.csv`` (and ``models.csv``, Parquet) from the finished units, in order."""
        rows: List[SweepRow] = []
        for key in keys:
            if self.is_done(key):
                rows += self.load_unit(key)
        write_table(rows, self.table_path)
        write_table(model_table(rows), self.models_path)
        _write_parquet(rows, self.parquet_path)
        atomic_write_bytes(self.units_path, json.dumps(list(keys), indent=1).encode())
        return rows


def load_accuracy_csv(path: str) -> Dict[str, float]:
    """Read ImageNet top-1 accuracies from a user CSV with columns ``model`` and ``top1``.

    timm's own accuracy tables (``results-imagenet.csv``) live in its source repository, not in
    the installed package, so offline the accuracies come from this file; a timm results CSV
    (columns ``model``, ``top1``) can be passed as is. Accuracies are in percent, as timm's.
    """
    accuracies: Dict[str, float] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"model", "top1"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"`accuracy_csv` {path} needs columns model, top1; missing {sorted(missing)}")
        for record in reader:
            value = float(record["top1"])
            if not math.isfinite(value):
                raise ValueError(f"`accuracy_csv` {path}: top1 of {record['model']!r} is {value}")
            accuracies[record["model"].strip()] = value
    return accuracies


def lookup_accuracy(model: str, accuracies: Optional[Dict[str, float]], aliases: Sequence[str] = ()) -> float:
    """Top-1 of ``model``: its exact name, else the exact name of an alias (the sweep passes a
    pretrained model's full ``arch.tag``, e.g. timm's default tag of an untagged name), else the
    first entry whose name matches ignoring timm ``.tag`` suffixes; NaN if unknown."""
    if not accuracies:
        return float("nan")
    for name in (model, *aliases):
        if name in accuracies:
            return accuracies[name]
    base = model.split(".")[0]
    for name, value in accuracies.items():
        if name.split(".")[0] == base:
            return value
    return float("nan")
