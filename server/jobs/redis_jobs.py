"""Tuning jobs in Redis: one queue and one set of records for every replica of a server.

With ``--state redis://...`` a job submitted to any replica is listed, followed and cancelled
on every replica, and runs on whichever replica's runner claims it first. Layout (``P`` is the
key prefix, ``reprogram:`` by default):

- ``P fits``: a hash, job id -> the record's JSON (:class:`~server.jobs.store.Job`);
- ``P fit:{id}:data``: the data set as an uncompressed tar of the job folder's ``data/`` or
  ``data.pt`` (written with the record in one transaction: an acknowledged job is whole);
- ``P fit:{id}:progress``, ``:checkpoint``, ``:result``, ``:prompt``: what the job's worker
  writes in its local folder, copied by the runner that runs it (progress and checkpoint at
  each turn of its loop when they change, the rest when the worker ends, before the record
  says so);
- ``P fit:{id}:cancel``: the cancel flag, seen by the runner that runs the job;
- ``P fit:{id}:lease``: which runner runs the job, with a :data:`LEASE_S` expiry that runner
  renews. A replica that dies stops renewing: once the lease has expired, any replica's runner
  queues the job again and the next claim resumes it from the last checkpoint copied to
  Redis, so it ends with the parameters of an uninterrupted fit.

State changes are compare-and-set transactions (``WATCH``/``MULTI``): a queued job is claimed
by one runner only, and a cancel never races a claim. ``--jobs-dir`` is then each replica's
own scratch folder, not shared state.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import secrets
import shutil
import socket
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.gate import visible_to
from server.inference import NotFound
from server.jobs.store import (
    CANCEL,
    CHECKPOINT,
    DATA_DIR,
    DATA_TENSORS,
    PROGRESS,
    PROMPT,
    RECORD,
    RESULT,
    Job,
    JobStore,
    _Owned,
)
from server.state.errors import StateUnavailable, call, redis_errors

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

LEASE_S = 10.0  # a runner that has not renewed its job's lease for this long is gone
RENEW_S = 2.0  # how often a runner renews its leases and looks for orphaned jobs
SHARED_FILES = {"progress": PROGRESS, "checkpoint": CHECKPOINT}

Changes = dict[str, Any] | Callable[[Job], dict[str, Any]]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _tar(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in (DATA_DIR, DATA_TENSORS):
            if (folder / name).exists():
                archive.add(folder / name, arcname=name)
    return buffer.getvalue()


class RedisJobs(JobStore):
    """The jobs of every replica that shares the Redis behind ``client``; ``directory`` is
    this replica's scratch folder, where its workers run their jobs."""

    shared = True

    def __init__(self, client: redis.Redis, directory: str | Path, *, where: str = "redis",
                 prefix: str = "reprogram:") -> None:
        self._redis = client
        self._where = where
        self._prefix = prefix
        self._index = f"{prefix}fits"
        self.runner_id = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self._pushed: dict[tuple[str, str], float] = {}  # (job, file) -> mtime copied
        self._renewed = 0.0
        self._recovered = 0.0
        super().__init__(directory)

    def _load(self) -> None:
        for tmp in self.directory.glob(".new-*"):  # a submission cut short
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("tuning jobs in %s (scratch folder %s)", self._where, self.directory)

    def _key(self, job_id: str, part: str) -> str:
        return f"{self._prefix}fit:{job_id}:{part}"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return call(self._where, what, fn, *args, **kwargs)

    # -- records -----------------------------------------------------------------------

    def _job(self, job_id: str) -> Job | None:
        raw = self._call("read the tuning job", self._redis.hget, self._index, job_id)
        return None if raw is None else Job(**json.loads(raw))

    def all(self) -> builtins.list[Job]:
        rows = self._call("list the tuning jobs", self._redis.hgetall, self._index)
        jobs = [Job(**json.loads(raw)) for raw in rows.values()]
        return sorted(jobs, key=lambda j: j.created)

    def get(self, job_id: str, owner: str | None = None) -> Job:
        job = self._job(job_id)
        if job is None or not visible_to(owner)(_Owned(job)):
            raise NotFound(f"unknown tuning job {job_id!r}; GET /v1/fits lists yours")
        return job

    def list(self, owner: str | None = None) -> builtins.list[Job]:
        visible = visible_to(owner)
        return [j for j in self.all() if visible(_Owned(j))]

    def create(self, staged: Path, *, owner: str | None, config: dict[str, Any],
               dataset: dict[str, Any]) -> Job:
        job = Job(id=f"fit-{secrets.token_hex(8)}", owner=owner, config=config,
                  dataset=dataset)
        data = _tar(staged)

        def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(self._key(job.id, "data"), data)
            pipe.hset(self._index, job.id, json.dumps(asdict(job)))
            pipe.execute()

        try:
            self._call("queue the tuning job", run)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        logger.info("job %s queued for %s in %s", job.id, owner or "an open server", self._where)
        return job

    def _cas(self, job_id: str, check: Callable[[Job], bool], changes: Changes,
             also: Callable[[Any], None] | None = None,
             guard: tuple[str, Callable[[Any], bool]] | None = None) -> Job | None:
        """Apply ``changes`` (a dict, or a function of the record) to the record if
        ``check(record)`` holds, atomically, with the writes ``also`` adds to the same
        transaction; ``guard`` is a key to watch too and a test of the pipe that must hold.
        None if a check did not hold."""
        import redis as redis_module

        while True:
            try:
                with self._redis.pipeline(transaction=True) as pipe:
                    pipe.watch(self._index, *([guard[0]] if guard else []))
                    if guard is not None and not guard[1](pipe):
                        return None
                    raw = pipe.hget(self._index, job_id)
                    if raw is None:
                        raise NotFound(f"unknown tuning job {job_id!r}")
                    job = Job(**json.loads(raw))
                    if not check(job):
                        return None
                    job = replace(job, **changes(job) if callable(changes) else changes)
                    pipe.multi()
                    pipe.hset(self._index, job_id, json.dumps(asdict(job)))
                    if also is not None:
                        also(pipe)
                    pipe.execute()
                    return job
            except redis_module.WatchError:
                continue  # another replica wrote a job in between: read again
            except redis_errors() as exc:
                raise StateUnavailable.of(self._where, "update the tuning job", exc) from None

    def update(self, job_id: str, **changes: Any) -> Job:
        job = self._cas(job_id, lambda _: True, changes)
        assert job is not None
        return job

    def cancel_queued(self, job_id: str) -> Job | None:
        return self._cas(job_id, lambda j: j.state == "queued",
                         {"state": "cancelled", "finished": time.time()})

    # -- the worker's files, shared ----------------------------------------------------

    def progress(self, job_id: str) -> dict[str, Any]:
        raw = self._call("read the job's progress", self._redis.get,
                         self._key(job_id, "progress"))
        doc = json.loads(raw) if raw else {}
        return doc if isinstance(doc, dict) else {}

    def result(self, job_id: str) -> dict[str, Any]:
        raw = self._call("read the job's result", self._redis.get, self._key(job_id, "result"))
        doc = json.loads(raw) if raw else {}
        return doc if isinstance(doc, dict) else {}

    def prompt_bytes(self, job_id: str) -> bytes:
        data = self._call("read the job's prompt", self._redis.get, self._key(job_id, "prompt"))
        if data is None:
            raise NotFound(f"tuning job {job_id!r} has no stored prompt")
        return bytes(data)

    def _push(self, job_id: str, *, final: bool = False) -> None:
        folder = self.folder(job_id)
        files = dict(SHARED_FILES, **({"result": RESULT, "prompt": PROMPT} if final else {}))
        for part, name in files.items():
            path = folder / name
            try:
                stamp = path.stat().st_mtime_ns
            except OSError:
                continue
            if self._pushed.get((job_id, part)) == stamp:
                continue
            self._call("copy the job's progress", self._redis.set, self._key(job_id, part),
                       path.read_bytes())
            self._pushed[(job_id, part)] = stamp

    def publish(self, job_id: str) -> None:
        self._push(job_id, final=True)

    # -- claims, leases, cancellation --------------------------------------------------

    def claim(self, job: Job) -> Job | None:
        lease = self._key(job.id, "lease")

        def changes(old: Job) -> dict[str, Any]:
            return {"state": "running", "started": old.started or time.time(),
                    "attempts": old.attempts + 1}

        def take(pipe: Any) -> None:
            pipe.set(lease, self.runner_id, px=int(LEASE_S * 1000))

        claimed = self._cas(job.id, lambda j: j.state == "queued", changes, also=take)
        if claimed is not None:
            self._materialize(claimed)
        return claimed

    def _materialize(self, job: Job) -> None:
        """The job's folder as a worker needs it: record, data set, and the checkpoint and
        progress of an earlier attempt (on any replica)."""
        folder = self.folder(job.id)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        data = self._call("read the job's data set", self._redis.get, self._key(job.id, "data"))
        with tarfile.open(fileobj=io.BytesIO(data or b""), mode="r") as archive:
            archive.extractall(folder, filter="data")
        (folder / RECORD).write_text(json.dumps(asdict(job)), encoding="utf-8")
        for part, name in SHARED_FILES.items():
            blob = self._call("read the job's checkpoint", self._redis.get,
                              self._key(job.id, part))
            if blob is not None:
                (folder / name).write_bytes(blob)
                self._pushed[(job.id, part)] = (folder / name).stat().st_mtime_ns

    def request_cancel(self, job_id: str) -> None:
        self._call("cancel the tuning job", self._redis.set, self._key(job_id, "cancel"), b"1")

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._call("read the tuning job", self._redis.exists,
                               self._key(job_id, "cancel")))

    def sync(self, running: builtins.list[str]) -> set[str]:
        lost: set[str] = set()
        renew = time.monotonic() - self._renewed >= RENEW_S
        for job_id in running:
            try:
                self._push(job_id)
                if self.cancel_requested(job_id):
                    (self.folder(job_id) / CANCEL).touch()
                if renew and not self._renew(job_id):
                    lost.add(job_id)
            except StateUnavailable as exc:  # keep the worker; the lease outlasts short gaps
                logger.warning("job %s: %s", job_id, exc)
        if renew:
            self._renewed = time.monotonic()
        return lost

    def _renew(self, job_id: str) -> bool:
        """Extend our lease on the job; False if another runner holds it now."""
        lease = self._key(job_id, "lease")
        holder = self._call("renew the job's lease", self._redis.get, lease)
        if holder is None:  # expired while Redis was away: take it back unless requeued
            job = self._job(job_id)
            if job is None or job.state != "running":
                return False
            return bool(self._call("renew the job's lease", self._redis.set, lease,
                                   self.runner_id, px=int(LEASE_S * 1000), nx=True))
        if _text(holder) != self.runner_id:
            logger.warning("job %s: another replica runs it now; stopping this worker", job_id)
            return False
        self._call("renew the job's lease", self._redis.pexpire, lease, int(LEASE_S * 1000))
        return True

    def recover(self) -> None:
        if time.monotonic() - self._recovered < RENEW_S:
            return
        self._recovered = time.monotonic()
        for job in self.all():
            if job.state != "running":
                continue
            lease = self._key(job.id, "lease")
            if self._call("read the job's lease", self._redis.exists, lease):
                continue
            def unleased(pipe: Any, key: str = lease) -> bool:
                return not pipe.exists(key)

            requeued = self._cas(job.id, lambda j: j.state == "running", {"state": "queued"},
                                 guard=(lease, unleased))
            if requeued is not None:
                logger.warning("job %s: its replica stopped renewing it; queued again", job.id)
