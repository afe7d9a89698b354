"""Run sweep units in parallel: local worker processes, or one Ray task per unit on a cluster.

The driver keeps the results store: as each unit finishes, its rows are written to the unit's
part file in one atomic step, so a parallel sweep is resumable exactly like an in-process one.
Workers rebuild the benchmark from its registry name and keyword arguments (a seeded simulator
is rebuilt bit-identically; a real benchmark's ``path`` must be readable from every node, e.g. a
shared filesystem).

``address="local"`` runs the units in a pool of worker processes on this machine
(:func:`run_units_in_processes`). It deliberately does not start a Ray cluster: Ray's GCS,
raylet and worker gRPC servers listen on every network interface, whatever
``_node_ip_address`` says (measured with ``ss -ltnp`` under Ray 2.60), and whoever reaches those
ports can run code as the user. The process pool opens no socket at all.

Any other address joins an existing Ray cluster (``ray.init(address=...)``: ``"auto"``,
``"ray://host:10001"``, ...). Such a cluster runs arbitrary code for anyone who can reach its
ports (GCS, Ray Client, dashboard); securing it is the cluster's job: see the README section
on sweeps.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from harmonizer_fast.zoo.results import SweepRow

__all__ = ["run_units_on_ray", "run_units_in_processes", "LOCAL"]

#: ``address`` that selects the local process pool.
LOCAL = "local"


def _import_ray():
    try:
        import ray  # optional: the `ray` extra (only --ray ADDRESS needs it)
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "`--ray ADDRESS` needs Ray: pip install 'harmonizer_fast[ray]' (or run without --ray, in-process)"
        ) from err
    return ray


def run_units_in_processes(
    units: Sequence[object],
    run_unit: Callable[[object], List[SweepRow]],
    on_done: Callable[[object, List[SweepRow]], None],
    num_workers: Optional[int] = None,
    threads_per_worker: int = 1,
    progress: bool = True,
) -> None:
    """``run_unit(unit)`` for every unit in ``num_workers`` spawned processes (default: one per
    CPU); ``on_done(unit, rows)`` runs in this process as each one finishes."""
    if not units:
        return
    workers = num_workers or os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`num_workers` must be a positive int, got {num_workers!r}")
    context = multiprocessing.get_context("spawn")
    bar = _progress_bar(len(units), progress, "models (processes)")
    with ProcessPoolExecutor(max_workers=min(workers, len(units)), mp_context=context) as pool:
        futures = {pool.submit(_run_with_threads, run_unit, unit, threads_per_worker): unit for unit in units}
        for future in as_completed(futures):
            on_done(futures[future], future.result())
            bar.update(1)
    bar.close()


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Raise ``ConnectionError`` when nothing listens at a ``host:port`` / ``ray://host:port``
    address; ``ray.init`` would otherwise retry for minutes before failing. Other forms
    (``"auto"``, ``"local"``) are left to their own handling."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(f"no Ray cluster answers at --ray {address!r} ({err}): start it first "
                              "(ray start --head on the head node) or fix the address") from err


def run_units_on_ray(
    units: Sequence[object],
    run_unit: Callable[[object], List[SweepRow]],
    on_done: Callable[[object, List[SweepRow]], None],
    address: str = LOCAL,
    num_cpus: Optional[int] = None,
    cpus_per_task: float = 1.0,
    progress: bool = True,
) -> None:
    """Execute ``run_unit(unit)`` for every unit, in parallel; call ``on_done(unit, rows)`` on the
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
        ``"local"``: a local process pool (no network service, see the module docstring); else
        the address of a running Ray cluster.
    num_cpus : int, optional
        Worker processes of ``"local"`` (default all CPUs); ignored for a cluster.
    cpus_per_task : float
        CPUs reserved per task (threads per worker); with ``num_cpus=2, cpus_per_task=1`` two
        models run at once.
    """
    if not units:
        return
    threads = max(int(cpus_per_task), 1)
    if address == LOCAL:
        run_units_in_processes(units, run_unit, on_done, num_workers=num_cpus, threads_per_worker=threads,
                               progress=progress)
        return
    ray = _import_ray()
    started_here = False
    if not ray.is_initialized():
        check_ray_address(address)
        ray.init(address=address, log_to_driver=False)
        started_here = True
    try:
        remote = ray.remote(num_cpus=cpus_per_task, max_retries=1)(_run_with_threads)
        pending: Dict[object, object] = {remote.remote(run_unit, unit, threads): unit for unit in units}
        bar = _progress_bar(len(units), progress, "models (ray)")
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
    # A worker owns `threads` CPUs; torch's default (all cores) would oversubscribe the node.
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return run_unit(unit)


def _progress_bar(total: int, enabled: bool, desc: str):
    return tqdm(total=total, desc=desc, unit="model", disable=not enabled)
