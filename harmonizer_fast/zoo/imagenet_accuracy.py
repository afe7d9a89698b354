"""ImageNet top-1 measured by the sweep itself (``--imagenet DIR``) for models without a known one.

For each model whose accuracy is neither given (``--accuracy-csv``, ``accuracies=``) nor already
measured, the swept network itself (same weights, same seeded random init) is scored with
:func:`harmonizer_fast.evaluation.imagenet.evaluate_imagenet` on the local validation folder.
Results go to ``out_dir/imagenet_top1.csv`` (the ``--accuracy-csv`` format), which a rerun reads
instead of measuring again, as long as the data folder and the limit are the same.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from harmonizer_fast.evaluation.imagenet import evaluate_imagenet, read_accuracy_rows, write_accuracy_csv
from harmonizer_fast.zoo.results import lookup_accuracy

__all__ = ["MEASURED_ACCURACY_FILE", "measure_missing_accuracies"]

#: File, under the sweep's ``out_dir``, of the accuracies the sweep measured.
MEASURED_ACCURACY_FILE = "imagenet_top1.csv"


def measure_missing_accuracies(specs: Sequence, accuracies: Mapping[str, float], data_dir: str, out_dir: str,
                               build: Callable[[object], torch.nn.Module], limit: Optional[int] = None,
                               progress: bool = True) -> Dict[str, float]:
    """``accuracies`` plus a measured top-1 for every spec (``.label``) that has none.

    ``build(spec)`` returns the network the sweep scores for ``spec``.
    """
    if not os.path.isdir(os.path.expanduser(data_dir)):
        raise FileNotFoundError(f"`imagenet` {data_dir!r} is not a folder (a local ImageNet validation set)")
    table = dict(accuracies)
    path = os.path.join(out_dir, MEASURED_ACCURACY_FILE)
    cached = read_accuracy_rows(path) if os.path.exists(path) else {}
    for spec in specs:
        if math.isfinite(lookup_accuracy(spec.label, table)):
            continue
        row = cached.get(spec.label)
        if row and _same_measurement(row, data_dir, limit):
            table[spec.label] = float(row["top1"])
            continue
        result = evaluate_imagenet(build(spec), data_dir, limit=limit, progress=progress)
        # The sweep's own record of what it measured: replacing a stale row of it is expected.
        write_accuracy_csv({spec.label: result}, path, data_dir=data_dir, overwrite=True)
        print(f"{spec.label}: ImageNet {result.describe()}", flush=True)
        table[spec.label] = result.top1
    return table


def _same_measurement(row: Mapping[str, str], data_dir: str, limit: Optional[int]) -> bool:
    """Whether a cached row was measured on ``data_dir`` with this ``limit`` (None: every image)."""
    if row.get("data") != str(data_dir):
        return False
    whole_set = row.get("estimate") == "false"
    if limit is None:
        return whole_set
    return row.get("images") == str(limit) or (whole_set and int(row.get("images", 0)) <= limit)
