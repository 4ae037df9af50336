"""Run queued tuning jobs in worker processes, at most ``workers`` at once, fairly per key.

A thread of the server process starts each job in a spawned process
(:func:`server.jobs.worker.run_job`), away from the request path, and reaps it: exit 0 ->
the prompt is registered as a hosted prompt owned by the job's key and the job
``succeeded``; the cancel flag -> ``cancelled``; anything else -> ``failed`` with the
worker's error in words. The next job goes to the key with the fewest running jobs, then the
key that started one longest ago (round robin), then that key's oldest job. Stopping the
runner kills its workers and leaves their jobs ``running``: the next start queues them again
and they resume from their checkpoints.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from server.inference import HTTPStatusError
from server.jobs.store import CANCEL, PROMPT, RESULT, Job, JobStore
from server.jobs.worker import EXIT_CANCELLED, run_job

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2

# prompt bytes, owner, label -> hosted prompt id
Register = Callable[[bytes, "str | None", str], str]


class JobConflict(HTTPStatusError):
    """A job that has already ended (409)."""

    status_code = 409


@dataclass
class _Running:
    process: BaseProcess
    owner: str | None


class JobRunner:
    """Starts and reaps the workers of ``store``'s queued jobs."""

    def __init__(self, store: JobStore, *, workers: int, source: dict[str, Any], threads: int,
                 register: Register, ready: Callable[[], bool] = lambda: True) -> None:
        self.store = store
        self.workers = workers
        self.source = source
        self.threads = threads
        self.register = register
        self.ready = ready
        self._running: dict[str, _Running] = {}
        self._last_start: dict[str | None, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._spawn = multiprocessing.get_context("spawn")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fit-runner")
        self._thread.start()

    def stop(self) -> None:
        """Kill the workers; their jobs stay ``running`` and resume at the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            for entry in self._running.values():
                entry.process.kill()
                entry.process.join(timeout=5)
            self._running.clear()

    def wake(self) -> None:
        self._wake.set()

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def cancel(self, job_id: str, owner: str | None) -> Job:
        """Cancel a queued job at once, or flag a running one (its worker stops at its next
        step); 409 for a job that has ended."""
        job = self.store.get(job_id, owner)
        if job.final:
            raise JobConflict(f"tuning job {job_id!r} has already {job.state}; nothing to cancel")
        self.store.request_cancel(job_id)
        job = self.store.cancel_queued(job_id) or self.store.get(job_id)
        self._wake.set()
        return job

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
                self._reap()
                self.store.recover()
                if self.ready():
                    self._fill()
            except Exception:  # the loop must outlive any one job's trouble
                logger.exception("tuning-job runner error")
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    def _next(self) -> Job | None:
        queued = [j for j in self.store.all() if j.state == "queued"]
        if not queued:
            return None
        with self._lock:
            busy = [r.owner for r in self._running.values()]

        def rank(job: Job) -> tuple[int, float, float]:
            return (busy.count(job.owner), self._last_start.get(job.owner, 0.0), job.created)

        return min(queued, key=rank)

    def _fill(self) -> None:
        while self.running() < self.workers and not self._stop.is_set():
            job = self._next()
            if job is None:
                return
            folder = self.store.folder(job.id)
            if self.store.cancel_requested(job.id):
                self.store.cancel_queued(job.id)
                continue
            if (folder / RESULT).exists():  # the server stopped between the end and the record
                self.store.publish(job.id)
                if _finished_ok(folder):
                    self._succeed(job)
                else:
                    self._fail(job, _error(folder, None))
                continue
            claimed = self.store.claim(job)
            if claimed is None:  # another replica's runner took it, or it was cancelled
                continue
            process = self._spawn.Process(target=run_job, name=f"fit-{job.id}",
                                          args=(str(folder), self.source, self.threads))
            process.start()
            with self._lock:
                self._running[job.id] = _Running(process, job.owner)
            self._last_start[job.owner] = time.monotonic()
            logger.info("job %s started (pid %s, attempt %d)", job.id, process.pid,
                        claimed.attempts)

    def _sync(self) -> None:
        """Share the running jobs' progress; stop the workers of jobs that another replica
        runs now (their record is that replica's to write)."""
        with self._lock:
            ids = list(self._running)
        if not ids:
            return
        for job_id in self.store.sync(ids):
            with self._lock:
                entry = self._running.pop(job_id, None)
            if entry is not None:
                entry.process.kill()
                entry.process.join(timeout=5)

    def _reap(self) -> None:
        with self._lock:
            done = [(jid, r) for jid, r in self._running.items() if not r.process.is_alive()]
        for job_id, entry in done:
            entry.process.join()
            code = entry.process.exitcode
            with self._lock:
                del self._running[job_id]
            self.store.publish(job_id)
            job = self.store.get(job_id)
            folder = self.store.folder(job_id)
            if (folder / CANCEL).exists() or code == EXIT_CANCELLED:
                images = int(self.store.progress(job_id).get("images") or 0)
                self.store.update(job_id, state="cancelled", finished=time.time(),
                                  images=images)
                logger.info("job %s cancelled", job_id)
            elif code == 0 and _finished_ok(folder):
                self._succeed(job)
            else:
                self._fail(job, _error(folder, code))

    def _succeed(self, job: Job) -> None:
        folder = self.store.folder(job.id)
        summary = json.loads((folder / RESULT).read_text(encoding="utf-8"))
        try:
            pid = self.register((folder / PROMPT).read_bytes(), job.owner, f"job {job.id}")
        except Exception as exc:  # e.g. the store is full: the job failed, in words
            self._fail(job, f"cannot host the learned prompt: {exc}")
            return
        self.store.update(job.id, state="succeeded", finished=time.time(), prompt_id=pid,
                          images=int(summary.get("images", 0)), error=None)
        logger.info("job %s succeeded: prompt %s", job.id, pid)

    def _fail(self, job: Job, error: str) -> None:
        images = int(self.store.progress(job.id).get("images") or 0)
        self.store.update(job.id, state="failed", finished=time.time(), error=error,
                          images=images)
        logger.warning("job %s failed: %s", job.id, error)


def _finished_ok(folder: Any) -> bool:
    try:
        summary = json.loads((folder / RESULT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and "error" not in summary and (folder / PROMPT).is_file()


def _error(folder: Any, code: int | None) -> str:
    try:
        summary = json.loads((folder / RESULT).read_text(encoding="utf-8"))
        if isinstance(summary, dict) and isinstance(summary.get("error"), str):
            return str(summary["error"])
    except (OSError, ValueError):
        pass
    if code is not None and code < 0:
        return f"the worker process was killed by signal {-code} (out of memory?)"
    return f"the worker process exited with code {code} without a result"

