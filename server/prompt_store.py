"""Hosted prompts: validated uploads, stored atomically on disk, served from the registry.

A prompt's id is the first :data:`ID_HEX` hex digits of the SHA-256 of its file's bytes, so
re-uploading the same file is idempotent and the id names exactly one artifact. Every upload is
validated before anything is written: the size cap, :func:`~reprogram.artifact.loads_prompt`
(format, schema version, digest, tensors) and
:func:`~reprogram.artifact.check_compatible` against the served model (input size, class
count, weights SHA-256). A valid prompt is written to ``DIR/{id}.safetensors`` through a
temporary file in the same folder, ``fsync`` and ``os.replace`` (then the folder is synced),
so a crash or ``kill -9`` mid-upload leaves either the whole file or none. At startup every
``*.safetensors`` file in the folder is loaded; invalid or incompatible ones are logged and
skipped, and leftover temporary files are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from reprogram.artifact import check_compatible, loads_prompt
from reprogram.errors import ArtifactError, ReprogramError
from server.hosted import PromptServable, SharedOracle
from server.inference import HTTPStatusError, NotFound, NotReady, Registry, TooLarge

logger = logging.getLogger(__name__)

ID_HEX = 16
SUFFIX = ".safetensors"
TMP_PREFIX = ".upload-"


class IncompatiblePrompt(ArtifactError):
    """A valid prompt made for another model (422)."""

    status_code = 422


class NameConflict(HTTPStatusError):
    """A prompt id that is already the name of a served model (409)."""

    status_code = 409


class StorageError(HTTPStatusError):
    """The prompt could not be written to the prompts folder (507)."""

    status_code = 507


def prompt_id(data: bytes) -> str:
    """The id of a prompt file: the first :data:`ID_HEX` hex digits of SHA-256(bytes)."""
    return hashlib.sha256(data).hexdigest()[:ID_HEX]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old state or all of ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class PromptStore:
    """The hosted prompts of one app: ids -> :class:`PromptServable`, mirrored on disk.

    The store needs the oracle through which prompts query the model; until :meth:`attach`
    is called (the model is still loading) uploads are answered 503.
    """

    def __init__(self, registry: Registry, directory: str | Path | None, *, max_bytes: int,
                 max_images: int, max_pixels: int) -> None:
        self.registry = registry
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self.max_images = max_images
        self.max_pixels = max_pixels
        self._shared: SharedOracle | None = None
        self._prompts: dict[str, PromptServable] = {}
        self._paths: dict[str, Path] = {}  # id -> its file, for prompts stored on disk
        self._lock = threading.RLock()

    def attach(self, shared: SharedOracle) -> None:
        """Use ``shared`` for every prompt from now on (call once the model is loaded)."""
        self._shared = shared

    def _oracle(self) -> SharedOracle:
        if self._shared is None:
            raise NotReady("the model is still loading; retry the prompt upload shortly")
        return self._shared

    def _validate(self, data: bytes, label: str) -> PromptServable:
        """Parse and check prompt bytes against the served model; nothing is stored."""
        if len(data) > self.max_bytes:
            raise TooLarge(f"expected a prompt file of at most {self.max_bytes} bytes, got"
                           f" {len(data)} in {label}")
        prompt = loads_prompt(data)
        shared = self._oracle()
        info = shared.oracle.info
        try:
            check_compatible(prompt, info.input_size, info.num_classes, info.fingerprint)
        except ArtifactError as exc:
            raise IncompatiblePrompt(f"{label} does not fit the served model {info.name!r}:"
                                     f" {exc}") from None
        return PromptServable(prompt_id(data), prompt, shared, data=data,
                              created=time.time(), max_images=self.max_images,
                              max_pixels=self.max_pixels)

    def add(self, data: bytes, *, label: str = "upload",
            persist: bool = True) -> tuple[PromptServable, bool]:
        """Validate, store and serve prompt bytes; returns ``(servable, created)``.

        Raises (nothing stored): :class:`TooLarge` (413), :class:`ArtifactError` (400),
        :class:`IncompatiblePrompt` (422), :class:`NameConflict` (409), :class:`StorageError`.
        """
        pid = prompt_id(data)
        existing = self._existing(pid, data)
        if existing is not None:
            return existing, False
        servable = self._validate(data, label)
        with self._lock:
            existing = self._existing(pid, data)
            if existing is not None:
                return existing, False
            if pid in self.registry.names():
                raise NameConflict(f"prompt id {pid!r} is already the name of a served model")
            if persist and self.directory is not None:
                path = self.directory / f"{pid}{SUFFIX}"
                try:
                    write_atomic(path, data)
                except OSError as exc:
                    raise StorageError(f"cannot store the prompt in {str(self.directory)!r}:"
                                       f" {exc.strerror or exc}") from None
                servable.created = path.stat().st_mtime
                self._paths[pid] = path
            self._prompts[pid] = servable
            self.registry.add(servable)
        logger.info("prompt %s added (%d target classes, %s program)", pid,
                    len(servable.class_names), servable.prompt.program.kind)
        return servable, True

    def _existing(self, pid: str, data: bytes) -> PromptServable | None:
        """The hosted prompt with these exact bytes, if any (409 on a shortened-id clash)."""
        with self._lock:
            servable = self._prompts.get(pid)
        if servable is None:
            return None
        if servable.sha256 != hashlib.sha256(data).hexdigest():
            raise NameConflict(f"prompt id {pid!r} is taken by a different file")
        return servable

    def add_file(self, path: str | Path) -> PromptServable:
        """Serve a prompt file given on the command line (stored too when a folder is set)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"cannot read prompt file {str(path)!r}: {exc.strerror}") from None
        return self.add(data, label=repr(str(path)))[0]

    def load_directory(self) -> int:
        """Serve every valid prompt in the folder; log and skip the others. Returns the count."""
        if self.directory is None or not self.directory.is_dir():
            return 0
        for tmp in self.directory.glob(f"{TMP_PREFIX}*.tmp"):
            logger.warning("removing %s, left over from an interrupted upload", tmp.name)
            tmp.unlink(missing_ok=True)
        loaded = 0
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                data = path.read_bytes()
                servable = self._validate(data, repr(path.name))
                if path.stem != servable.prompt_id:
                    logger.warning("%s holds prompt %s; serving it under its content id",
                                   path.name, servable.prompt_id)
                servable.created = path.stat().st_mtime
            except (ReprogramError, OSError) as exc:
                logger.warning("skipping prompt file %s: %s", path.name, exc)
                continue
            with self._lock:
                if servable.prompt_id in self._prompts:
                    logger.warning("skipping %s: a copy of prompt %s", path.name,
                                   servable.prompt_id)
                    continue
                if servable.prompt_id in self.registry.names():
                    logger.warning("skipping %s: its id is the name of a served model",
                                   path.name)
                    continue
                self._prompts[servable.prompt_id] = servable
                self._paths[servable.prompt_id] = path
                self.registry.add(servable)
            loaded += 1
        logger.info("loaded %d prompt(s) from %s", loaded, self.directory)
        return loaded

    def get(self, pid: str) -> PromptServable:
        """The prompt ``pid`` (404 if unknown)."""
        with self._lock:
            servable = self._prompts.get(pid)
        if servable is None:
            raise NotFound(f"unknown prompt {pid!r}; GET /v1/prompts lists the hosted prompts")
        return servable

    def list(self) -> list[PromptServable]:
        """Every hosted prompt, oldest first."""
        with self._lock:
            return sorted(self._prompts.values(), key=lambda s: (s.created, s.prompt_id))

    def delete(self, pid: str) -> None:
        """Stop serving ``pid`` and remove its file (404 if unknown)."""
        with self._lock:
            self.get(pid)
            path = self._paths.get(pid)
            if path is not None:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    raise StorageError(f"cannot delete prompt {pid!r}: {exc.strerror}") from None
                _fsync_dir(path.parent)
                del self._paths[pid]
            del self._prompts[pid]
            self.registry.remove(pid)
        logger.info("prompt %s deleted", pid)
