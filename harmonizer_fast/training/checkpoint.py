"""Atomic, resumable training checkpoints that load without unpickling arbitrary objects.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and
dicts, so :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``. Random
number generator states (python, numpy, torch, CUDA) are converted to tensors and plain
lists by :func:`rng_state` and restored by :func:`set_rng_state`.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from harmonizer_fast._io import atomic_open

PathLike = Union[str, "os.PathLike[str]"]

#: bump when the layout of the checkpoint dictionary changes.
CHECKPOINT_FORMAT = 1


def rng_state() -> Dict[str, Any]:
    """The python, numpy, torch and (when present) CUDA generator states as tensors and lists."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: Dict[str, Any] = {
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore generator states saved by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"]), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state(
        (nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` through :func:`harmonizer_fast._io.atomic_open`: a crash mid-write leaves
    the previous file intact, never a truncated one."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def save_checkpoint(
    path: PathLike,
    *,
    model_state: Dict[str, torch.Tensor],
    optimizer_state: Dict[str, Any],
    scheduler_state: Optional[Dict[str, Any]],
    step: int,
    data_state: Dict[str, Any],
    config: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write a complete training state atomically (see :func:`atomic_torch_save`).

    Args:
        path: destination file (its folder is created).
        model_state: ``model.state_dict()`` (unwrap DDP first).
        optimizer_state, scheduler_state: their ``state_dict()``.
        step: number of optimizer steps done.
        data_state: the data stream's position (plain ints/lists).
        config: the run's configuration as plain values, for checks on resume.
        extra: other plain values (e.g. the last logged metrics).
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "step": int(step),
        "data": data_state,
        "rng": rng_state(),
        "config": config or {},
        "extra": extra or {},
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a harmonizer_fast checkpoint of a known format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a harmonizer_fast checkpoint of format {CHECKPOINT_FORMAT} "
            f"(got {type(payload).__name__} with format {getattr(payload, 'get', lambda k: None)('format')!r})"
        )
    return payload


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """``directory/last.pt`` if it exists (the trainer's rolling checkpoint), else None."""
    candidate = Path(directory) / "last.pt"
    return candidate if candidate.is_file() else None


#: the files a training run writes into its output folder (checkpoints and metric logs).
RUN_FILES = ("last.pt", "step_*.pt", "metrics.csv", "metrics.jsonl")


def stale_temporaries(directory: PathLike) -> List[Path]:
    """Temporary files an interrupted atomic write of a run's :data:`RUN_FILES` left in ``directory``."""
    directory = Path(directory)
    return sorted({p for name in RUN_FILES for p in directory.glob(f".{name}.*.tmp") if p.is_file()})


def existing_run(directory: PathLike) -> List[str]:
    """Names of the files of an earlier run in ``directory`` (a checkpoint, or metric rows); empty if none."""
    directory = Path(directory)
    found = [p.name for p in [directory / "last.pt", *sorted(directory.glob("step_*.pt"))] if p.is_file()]
    log = directory / "metrics.jsonl"
    if log.is_file() and log.stat().st_size > 0:
        found.append(log.name)
    return found
