"""Run sweep units on a Ray cluster: one task per (model, benchmark) unit.

The driver keeps the results store: as each task finishes (``ray.wait``), its rows are written to
the unit's part file in one atomic step, so a distributed sweep is resumable exactly like an
in-process one. Workers rebuild the benchmark from its registry name and keyword arguments (a
seeded simulator is rebuilt bit-identically; a real benchmark's ``path`` must be readable from
every node, e.g. a shared filesystem).

``address="local"`` starts a private local cluster (``ray.init()`` with ``num_cpus``); any other
address is passed to ``ray.init(address=...)`` (``"auto"``, ``"ray://host:10001"``, ...).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

from harmonizer_fast.zoo.results import SweepRow

__all__ = ["run_units_on_ray"]


def _import_ray():
    try:
        import ray
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "`--ray` needs Ray: pip install 'harmonizer_fast[ray]' (or run without --ray, in-process)"
        ) from err
    return ray


def run_units_on_ray(
    units: Sequence[object],
    run_unit: Callable[[object], List[SweepRow]],
    on_done: Callable[[object, List[SweepRow]], None],
    address: str = "local",
    num_cpus: Optional[int] = None,
    cpus_per_task: float = 1.0,
    progress: bool = True,
) -> None:
    """Execute ``run_unit(unit)`` for every unit as a Ray task; call ``on_done(unit, rows)`` on the
    driver as each one finishes (in completion order).

    Parameters
    ----------
    units : sequence
        Picklable unit descriptions.
    run_unit : callable
        Importable function (it is shipped to the workers by reference).
    on_done : callable
        Runs on the driver; stores the rows.
    address : str
        ``"local"`` for a fresh local cluster, else a Ray address.
    num_cpus : int, optional
        CPUs of the local cluster (``address="local"`` only); default all.
    cpus_per_task : float
        CPUs reserved per task; with ``num_cpus=2, cpus_per_task=1`` two models run at once.
    """
    ray = _import_ray()
    if not units:
        return
    started_here = False
    if not ray.is_initialized():
        if address == "local":
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(int(cpus_per_task), 1))}},
            )
        else:
            ray.init(address=address, log_to_driver=False)
        started_here = True
    try:
        remote = ray.remote(num_cpus=cpus_per_task, max_retries=1)(_run_with_threads)
        pending: Dict[object, object] = {
            remote.remote(run_unit, unit, max(int(cpus_per_task), 1)): unit for unit in units
        }
        bar = _progress_bar(len(units), progress)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                unit = pending.pop(ref)
                on_done(unit, ray.get(ref))
                bar.update(1)
        bar.close()
    finally:
        if started_here:
            ray.shutdown()


def _run_with_threads(run_unit: Callable[[object], List[SweepRow]], unit: object, threads: int) -> List[SweepRow]:
    import torch

    # A worker owns `threads` CPUs; torch's default (all cores) would oversubscribe the node.
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return run_unit(unit)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="models (ray)", unit="model", disable=not enabled)
