"""``bench.accuracy --ray``: the grid's fits as Ray tasks, on this machine or a cluster.

Each job runs :func:`bench.accuracy.run_one`, the function the local process pool runs, as a
``ray.remote`` task asking for ``threads`` CPUs (one GPU on a ``cuda`` device), with the job's
own seed; results are handed to ``done`` as they finish, in any order, so the caller appends
each to its results stream as it lands and a killed sweep resumes from there. The driver's
``bench`` and ``reprogram`` sources travel with the tasks (Ray's ``py_modules``), so a cluster
runs this checkout's code; its nodes need the project's dependencies (torch and the rest).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bench
import reprogram
from reprogram.errors import ConfigError
from server.ray_cluster import connect, require_ray

logger = logging.getLogger(__name__)

Job = dict[str, Any]


def code_modules() -> list[str]:
    """The source folders a task needs: ``bench`` and ``reprogram`` of this checkout."""
    return [str(Path(module.__file__ or "").parent) for module in (bench, reprogram)]


def task_options(job: Job) -> dict[str, Any]:
    """Resources of one fit: its torch threads as CPUs, and a GPU for a CUDA device."""
    gpus = 1 if str(job["device"]).startswith("cuda") else 0
    return {"num_cpus": job["threads"], "num_gpus": gpus, "max_retries": 0}


def cause(exc: BaseException) -> BaseException:
    """The fit's own exception inside a Ray task error (whose text holds a traceback)."""
    inner = getattr(exc, "cause", None)
    return inner if isinstance(inner, BaseException) else exc


def run_jobs_on_ray(jobs: Sequence[Job], address: str, run_one: Callable[[Job], Job],
                    done: Callable[[Job], None],
                    failed: Callable[[Job, BaseException], None]) -> None:
    """Run every job (in the order given) as a Ray task on ``address`` (``auto``, ``local``
    or a cluster's address), calling ``done(row)`` as each finishes and
    ``failed(job, error)`` for one that raises; Ray is shut down at the end."""
    ray = require_ray()
    try:
        how = connect(address, runtime_env={"py_modules": code_modules()})
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    print(f"ray: {how}; {len(jobs)} fits to run", file=sys.stderr, flush=True)
    try:
        remote = ray.remote(run_one)
        pending = {remote.options(**task_options(job)).remote(job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as exc:  # reported with the job; the grid goes on
                    failed(job, cause(exc))
                else:
                    done(row)
    finally:
        ray.shutdown()
