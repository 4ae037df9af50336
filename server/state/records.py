"""Where hosted prompts are kept: the record of each one (bytes, owners, time of upload).

:class:`PromptRecords` is the seam (DESIGN.md section 9): the prompt store validates and
serves prompts; a records backend only keeps them. Two backends:

- :class:`FolderRecords` (the default): in memory, mirrored in a folder when one is given.
  A prompt is ``DIR/{id}.safetensors``; its owners are ``DIR/{id}.owners.json``, written
  (atomically) *before* the prompt file, so a crash never leaves a private prompt without its
  owners (an orphan owners file is removed at startup, like leftover temporary files). Every
  write goes through a temporary file in the same folder, ``fsync`` and ``os.replace``.
- :class:`~server.state.redis_records.RedisRecords`: one Redis shared by every replica.

A backend is ``shared`` when other processes may change it: the store then reads the record of
a prompt again before it serves it (a replica that did not take an upload serves it at once,
and a prompt deleted on one replica is gone from all).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from reprogram import fsutil
from server.inference import HTTPStatusError

logger = logging.getLogger(__name__)

ID_HEX = 16
SUFFIX = ".safetensors"
TMP_PREFIX = ".upload-"
OWNERS_SUFFIX = ".owners.json"


class StorageError(HTTPStatusError):
    """The prompt could not be written to the prompts folder (507)."""

    status_code = 507


def prompt_id(data: bytes) -> str:
    """The id of a prompt file: the first :data:`ID_HEX` hex digits of SHA-256(bytes)."""
    return hashlib.sha256(data).hexdigest()[:ID_HEX]


@dataclass(frozen=True)
class RecordHead:
    """What is known of a stored prompt without reading its bytes."""

    prompt_id: str
    sha256: str
    owners: frozenset[str]  # empty: the operator's prompt, visible to every key
    created: float  # seconds since the epoch
    label: str = ""  # where it is kept, for messages ("prompt file X.safetensors")

    def with_owners(self, owners: frozenset[str]) -> RecordHead:
        return replace(self, owners=owners)

    @classmethod
    def of(cls, data: bytes, owners: frozenset[str], created: float | None = None) -> RecordHead:
        digest = hashlib.sha256(data).hexdigest()
        return cls(digest[:ID_HEX], digest, owners, time.time() if created is None else created)

    def describe(self) -> str:
        return self.label or f"stored prompt {self.prompt_id}"


class PromptRecords(Protocol):
    """Keeps prompt records; raises ``StateUnavailable`` (503) when its storage is down."""

    shared: bool

    def write(self, head: RecordHead, data: bytes | None) -> RecordHead:
        """Store ``head`` (and ``data``, the prompt's bytes; None: only the owners change);
        returns the head as stored (its ``created`` may be the storage's own clock)."""

    def remove(self, pid: str) -> None:
        """Forget prompt ``pid`` (nothing happens if it is unknown)."""

    def heads(self, pid: str | None = None) -> dict[str, RecordHead]:
        """Every stored prompt's head by id, or only ``pid``'s (empty if unknown)."""

    def read(self, pid: str) -> bytes | None:
        """The bytes of prompt ``pid`` (None if it is unknown)."""


def _owners_path(path: Path) -> Path:
    return path.parent / f"{path.stem}{OWNERS_SUFFIX}"


def read_owners(path: Path) -> frozenset[str]:
    """The owners of the prompt file ``path`` (empty when it has no owners file)."""
    side = _owners_path(path)
    if not side.exists():
        return frozenset()
    names = json.loads(side.read_text(encoding="utf-8"))
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"expected a non-empty JSON list of key names in {side.name}")
    return frozenset(names)


class FolderRecords:
    """Prompt records in this process's memory, mirrored in ``directory`` when given."""

    shared = False

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._heads: dict[str, RecordHead] = {}
        self._data: dict[str, bytes] = {}
        self._paths: dict[str, Path] = {}
        self._lock = threading.Lock()
        if self.directory is not None and self.directory.is_dir():
            self._sweep(self.directory)
            self._scan(self.directory)

    def _sweep(self, folder: Path) -> None:
        for tmp in folder.glob(f"{TMP_PREFIX}*.tmp"):
            logger.warning("removing %s, left over from an interrupted upload", tmp.name)
            tmp.unlink(missing_ok=True)
        for side in folder.glob(f"*{OWNERS_SUFFIX}"):
            stem = side.name[: -len(OWNERS_SUFFIX)]
            if not (folder / f"{stem}{SUFFIX}").exists():
                logger.warning("removing %s, left over from an interrupted upload", side.name)
                side.unlink(missing_ok=True)

    def _scan(self, folder: Path) -> None:
        for path in sorted(folder.glob(f"*{SUFFIX}")):
            try:
                data = path.read_bytes()
                head = replace(RecordHead.of(data, read_owners(path), path.stat().st_mtime),
                               label=f"prompt file {path.name}")
            except (OSError, ValueError) as exc:
                logger.warning("skipping prompt file %s: %s", path.name, exc)
                continue
            if head.prompt_id in self._heads:
                logger.warning("skipping %s: a copy of prompt %s", path.name, head.prompt_id)
                continue
            if path.stem != head.prompt_id:
                logger.warning("%s holds prompt %s; serving it under its content id",
                               path.name, head.prompt_id)
            self._heads[head.prompt_id] = head
            self._data[head.prompt_id] = data
            self._paths[head.prompt_id] = path

    def _write_owners(self, path: Path, owners: frozenset[str]) -> None:
        fsutil.write_atomic(_owners_path(path), json.dumps(sorted(owners)).encode("utf-8"),
                            prefix=TMP_PREFIX)

    def write(self, head: RecordHead, data: bytes | None) -> RecordHead:
        with self._lock:
            if self.directory is not None:
                head = self._write_files(head, data)
            self._heads[head.prompt_id] = head
            if data is not None:
                self._data[head.prompt_id] = data
            return head

    def _write_files(self, head: RecordHead, data: bytes | None) -> RecordHead:
        assert self.directory is not None
        path = self._paths.get(head.prompt_id, self.directory / f"{head.prompt_id}{SUFFIX}")
        try:
            if data is None:
                self._write_owners(path, head.owners)
                return head
            if head.owners:  # first: a crash must not leave a private prompt public
                self._write_owners(path, head.owners)
            fsutil.write_atomic(path, data, prefix=TMP_PREFIX)
        except OSError as exc:
            if data is not None:
                _owners_path(path).unlink(missing_ok=True)
            raise StorageError(f"cannot store the prompt in {str(self.directory)!r}:"
                               f" {exc.strerror or exc}") from None
        self._paths[head.prompt_id] = path
        return replace(head, created=path.stat().st_mtime)

    def remove(self, pid: str) -> None:
        with self._lock:
            path = self._paths.get(pid)
            if path is not None:
                try:  # the prompt first: a crash leaves an orphan owners file, not a public one
                    path.unlink(missing_ok=True)
                    _owners_path(path).unlink(missing_ok=True)
                except OSError as exc:
                    raise StorageError(f"cannot delete prompt {pid!r}: {exc.strerror}") from None
                fsutil.fsync_dir(path.parent)
                del self._paths[pid]
            self._heads.pop(pid, None)
            self._data.pop(pid, None)

    def heads(self, pid: str | None = None) -> dict[str, RecordHead]:
        with self._lock:
            if pid is None:
                return dict(self._heads)
            head = self._heads.get(pid)
            return {} if head is None else {pid: head}

    def read(self, pid: str) -> bytes | None:
        with self._lock:
            return self._data.get(pid)
