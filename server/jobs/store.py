"""Tuning jobs on disk: one folder per job, each file with one writer.

``DIR/{id}/`` holds ``job.json`` (the record: owner, config, state, times, error, prompt id;
written by the server only), ``progress.json`` (step, images, validation accuracy and the
learning curve; written by the job's worker only), ``data/`` or ``data.pt`` (the data set),
``checkpoint.pt`` (the fit's checkpoint, for resuming), ``prompt.safetensors`` and
``result.json`` (written by the worker when the fit ends) and ``cancel`` (a flag the worker
checks at every step). Every file is written atomically, so a ``kill -9`` of the server or a
worker leaves each file whole or absent; a job found ``running`` at startup is queued again
and resumes from its checkpoint.
"""

from __future__ import annotations

import builtins
import json
import logging
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from reprogram.fsutil import write_atomic
from server.gate import visible_to
from server.inference import NotFound

logger = logging.getLogger(__name__)

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
RECORD = "job.json"
PROGRESS = "progress.json"
RESULT = "result.json"
PROMPT = "prompt.safetensors"
CHECKPOINT = "checkpoint.pt"
CANCEL = "cancel"
DATA_DIR = "data"
DATA_TENSORS = "data.pt"


@dataclass(frozen=True, kw_only=True)
class Job:
    """One tuning job's record (``job.json``)."""

    id: str
    owner: str | None
    config: dict[str, Any]
    dataset: dict[str, Any]
    state: State = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    prompt_id: str | None = None
    images: int = 0  # image evaluations used (known once the job ends)
    attempts: int = 0  # worker starts (a resumed job has more than one)

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @property
    def charge(self) -> int:
        """What the job counts against its key's ``--fit-quota``: its budget until it ends,
        then the images it used."""
        if self.final:
            return self.images
        return int(self.config.get("budget") or 0)


class JobStore:
    """The jobs of one server, in ``directory`` (thread-safe)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self._load()

    def _load(self) -> None:
        for record in sorted(self.directory.glob(f"*/{RECORD}")):
            try:
                job = Job(**json.loads(record.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("skipping job folder %s: %s", record.parent.name, exc)
                continue
            if job.state == "running":  # the server stopped under it: resume
                job = replace(job, state="queued")
                self._write(job)
            self._jobs[job.id] = job
        for tmp in self.directory.glob(".new-*"):  # a submission cut short
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("loaded %d tuning job(s) from %s", len(self._jobs), self.directory)

    def folder(self, job_id: str) -> Path:
        return self.directory / job_id

    def staging(self) -> Path:
        """A fresh folder to unpack a submission's data set into (see :meth:`create`)."""
        path = self.directory / f".new-{secrets.token_hex(8)}"
        path.mkdir()
        return path

    def _write(self, job: Job) -> None:
        write_atomic(self.folder(job.id) / RECORD, json.dumps(asdict(job)).encode("utf-8"))

    def create(self, staged: Path, *, owner: str | None, config: dict[str, Any],
               dataset: dict[str, Any]) -> Job:
        """Turn a staged folder (data set unpacked) into a queued job."""
        job = Job(id=f"fit-{secrets.token_hex(8)}", owner=owner, config=config,
                  dataset=dataset)
        staged.rename(self.folder(job.id))
        with self._lock:
            self._write(job)
            self._jobs[job.id] = job
        logger.info("job %s queued for %s", job.id, owner or "an open server")
        return job

    def update(self, job_id: str, **changes: Any) -> Job:
        with self._lock:
            job = replace(self._jobs[job_id], **changes)
            self._write(job)
            self._jobs[job_id] = job
            return job

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job as ``owner`` sees it: 404 if unknown or another key's."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or not visible_to(owner)(_Owned(job)):
            raise NotFound(f"unknown tuning job {job_id!r}; GET /v1/fits lists yours")
        return job

    def list(self, owner: str | None = None) -> list[Job]:
        """The jobs ``owner`` may see, oldest first."""
        with self._lock:
            jobs = list(self._jobs.values())
        visible = visible_to(owner)
        return sorted((j for j in jobs if visible(_Owned(j))), key=lambda j: j.created)

    def all(self) -> builtins.list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def progress(self, job_id: str) -> dict[str, Any]:
        """What the worker last reported (empty before its first step)."""
        return _json_file(self.folder(job_id) / PROGRESS)

    def result(self, job_id: str) -> dict[str, Any]:
        """The worker's summary of an ended fit (empty if none)."""
        return _json_file(self.folder(job_id) / RESULT)

    def prompt_bytes(self, job_id: str) -> bytes:
        """The learned artifact of a succeeded job."""
        return (self.folder(job_id) / PROMPT).read_bytes()

    # -- the runner's hooks: what a shared store (server.jobs.redis_jobs) does more --------

    def claim(self, job: Job) -> Job | None:
        """Mark a queued job ``running`` for this server's runner, its folder ready for a
        worker; None if it is no longer queued (another replica took it, or it was
        cancelled)."""
        with self._lock:
            if self._jobs[job.id].state != "queued":
                return None
        return self.update(job.id, state="running", started=job.started or time.time(),
                           attempts=job.attempts + 1)

    def cancel_queued(self, job_id: str) -> Job | None:
        """Cancel the job if it is still queued (None if it is not)."""
        with self._lock:
            if self._jobs[job_id].state != "queued":
                return None
            return self.update(job_id, state="cancelled", finished=time.time())

    def request_cancel(self, job_id: str) -> None:
        """Raise the job's cancel flag (its worker stops at its next step)."""
        (self.folder(job_id) / CANCEL).touch()

    def cancel_requested(self, job_id: str) -> bool:
        return (self.folder(job_id) / CANCEL).exists()

    def sync(self, running: builtins.list[str]) -> set[str]:
        """Called by the runner at every turn with the jobs its workers run: share their
        progress; the ids returned are no longer this runner's to run (stop them)."""
        return set()

    def publish(self, job_id: str) -> None:
        """Share an ended worker's result (and prompt) before the record says it ended."""

    def recover(self) -> None:
        """Queue again the running jobs whose runner is gone (a folder store does that at
        start, in :meth:`_load`)."""


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class _Owned:
    """A job seen through :func:`server.gate.visible_to`: a job without an owner (an open
    server) is everyone's; a key's job is its own."""

    job: Job

    @property
    def owners(self) -> set[str]:
        return {self.job.owner} if self.job.owner is not None else set()
