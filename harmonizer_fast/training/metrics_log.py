"""Per-step metric logs (``metrics.jsonl`` and ``metrics.csv``) that survive crashes and resumes."""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Union

from harmonizer_fast._io import atomic_write_text


class MetricsLogger:
    """Append per-step metrics to ``metrics.csv`` and ``metrics.jsonl`` under ``directory``.

    On resume, rows after the resumed step (written by the interrupted run) are dropped
    first, so the logs read as one uninterrupted run.
    """

    FIELDS = ("step", "lr", "loss", "cross_entropy", "weight_decay", "harmonization", "images_per_s", "time_s")

    def __init__(self, directory: Union[str, os.PathLike], resume_step: int = 0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.directory / "metrics.csv"
        self.jsonl_path = self.directory / "metrics.jsonl"
        self._truncate(resume_step)

    def _truncate(self, resume_step: int) -> None:
        rows = self.read_rows(self.jsonl_path) if self.jsonl_path.exists() else []
        rows = [r for r in rows if r.get("step", 0) <= resume_step] if resume_step else []
        extra = sorted({k for r in rows for k in r} - set(self.FIELDS))
        self.fields = list(self.FIELDS) + extra
        atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(self.csv_path, self._csv_text(rows))

    @staticmethod
    def read_rows(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
        """The rows of a ``metrics.jsonl``, tolerating a torn last line (a crash or a full disk
        mid-append: it is dropped with a warning and the file is rewritten without it on resume).

        Raises:
            ValueError: a line other than the last is not JSON (the file was edited or corrupted).
        """
        with open(path, "rb") as handle:
            lines = handle.read().split(b"\n")
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                if any(rest.strip() for rest in lines[number:]):
                    raise ValueError(f"{str(path)!r} line {number} is not a JSON row ({err}); it is not a torn "
                                     "last line, so the log was edited or corrupted") from err
                warnings.warn(f"{str(path)!r}: dropped a torn last line ({len(line)} bytes, from an interrupted "
                              "append)", RuntimeWarning, stacklevel=3)
        return rows

    def _csv_text(self, rows: List[Dict[str, Any]]) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def log(self, row: Dict[str, Any]) -> None:
        """Append ``row`` to both logs; each append is one write of whole lines, flushed to disk."""
        new_fields = [k for k in row if k not in self.fields]
        _append_durably(self.jsonl_path, (json.dumps(row) + "\n").encode("utf-8"))
        if new_fields:  # a new metric (e.g. an evaluation score): rewrite the CSV with the wider header
            self.fields += new_fields
            atomic_write_text(self.csv_path, self._csv_text(self.read_rows(self.jsonl_path)))
            return
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=self.fields, extrasaction="ignore").writerow(row)
        _append_durably(self.csv_path, buffer.getvalue().encode("utf-8"))


def _append_durably(path: Path, data: bytes) -> None:
    """One ``O_APPEND`` write then fsync: a crash leaves at most a torn last line, never a gap."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
