"""Hosted prompts: validated uploads, stored atomically on disk, served from the registry.

A prompt's id is the first :data:`ID_HEX` hex digits of the SHA-256 of its file's bytes, so
re-uploading the same file is idempotent and the id names exactly one artifact. Every upload is
validated before anything is written: the size cap, then
:func:`~reprogram.artifact.loads_prompt` (format, schema version, bounded JSON, digest,
tensors, finite values) with :func:`~reprogram.artifact.check_compatible` against the served
model (input size, class count, weights SHA-256) run on the file's header before any tensor
is built. A valid prompt is written to ``DIR/{id}.safetensors`` through a
temporary file in the same folder, ``fsync`` and ``os.replace`` (then the folder is synced),
so a crash or ``kill -9`` mid-upload leaves either the whole file or none. At startup every
``*.safetensors`` file in the folder is loaded; invalid or incompatible ones are logged and
skipped, and leftover temporary files are removed.

With API keys, a prompt is owned by the keys that uploaded it (``owner``; None on an open
server): the names are kept in ``DIR/{id}.owners.json``, written (atomically) *before* the
prompt file, so a crash never leaves a private prompt without its owners (an orphan owners
file is removed at startup). Other keys get 404 for it, exactly as for an unknown id; a key
that uploads the same bytes becomes a co-owner, and deleting removes only the caller's
ownership until none is left. Prompts without owners (uploaded to an open server, or given on
the command line) are visible to every key and cannot be deleted through a key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from reprogram import fsutil
from reprogram.artifact import check_compatible, loads_prompt
from reprogram.artifact_check import PromptHeader
from reprogram.errors import ArtifactError, ReprogramError
from server.gate import visible_to
from server.hosted import PromptServable, SharedOracle
from server.inference import HTTPStatusError, NotFound, NotReady, Registry, TooLarge

logger = logging.getLogger(__name__)

ID_HEX = 16
SUFFIX = ".safetensors"
TMP_PREFIX = ".upload-"
OWNERS_SUFFIX = ".owners.json"


class IncompatiblePrompt(ArtifactError):
    """A valid prompt made for another model (422)."""

    status_code = 422


class NameConflict(HTTPStatusError):
    """A prompt id that is already the name of a served model (409)."""

    status_code = 409


class Forbidden(HTTPStatusError):
    """A prompt the caller may use but not delete (403)."""

    status_code = 403


class StorageError(HTTPStatusError):
    """The prompt could not be written to the prompts folder (507)."""

    status_code = 507


def prompt_id(data: bytes) -> str:
    """The id of a prompt file: the first :data:`ID_HEX` hex digits of SHA-256(bytes)."""
    return hashlib.sha256(data).hexdigest()[:ID_HEX]


def write_atomic(path: Path, data: bytes) -> None:
    """Write a prompt-store file atomically (its temporary files are swept at startup)."""
    fsutil.write_atomic(path, data, prefix=TMP_PREFIX)


def owners_path(path: Path) -> Path:
    """The owners file of the prompt file ``path``."""
    return path.parent / f"{path.stem}{OWNERS_SUFFIX}"


def read_owners(path: Path) -> set[str]:
    """The owners of the prompt file ``path`` (empty when it has no owners file)."""
    side = owners_path(path)
    if not side.exists():
        return set()
    names = json.loads(side.read_text(encoding="utf-8"))
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ArtifactError(f"expected a non-empty JSON list of key names in {side.name}")
    return set(names)


def _write_owners(path: Path, owners: set[str]) -> None:
    write_atomic(owners_path(path), json.dumps(sorted(owners)).encode("utf-8"))


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
        # serve prompts whose model identity cannot be checked against this one
        # (`reprogram serve --allow-unverified-model`)
        self.allow_unverified = False

    def attach(self, shared: SharedOracle) -> None:
        """Use ``shared`` for every prompt from now on (call once the model is loaded)."""
        self._shared = shared

    @property
    def ready(self) -> bool:
        """Whether the model is loaded (prompts can be added)."""
        return self._shared is not None

    def serves_vit(self) -> bool | None:
        """Whether the model prompts run on is a ViT (token prompts fit it); None while it
        loads."""
        if self._shared is None:
            return None
        try:
            self._shared.oracle.token_adapter()
        except ReprogramError:
            return False
        return True

    def _oracle(self) -> SharedOracle:
        if self._shared is None:
            raise NotReady("the model is still loading; retry the prompt upload shortly")
        return self._shared

    def _validate(self, data: bytes, label: str) -> PromptServable:
        """Parse and check prompt bytes against the served model; nothing is stored."""
        if len(data) > self.max_bytes:
            raise TooLarge(f"expected a prompt file of at most {self.max_bytes} bytes, got"
                           f" {len(data)} in {label}")
        shared = self._oracle()

        def compatible(header: PromptHeader) -> None:  # before any tensor is built
            try:
                shared.oracle.adopt_vocabulary(header.source.get("vocabulary"))
                info = shared.oracle.info
                check_compatible(header, info.input_size, info.num_classes, info.fingerprint,
                                 allow_unverified=self.allow_unverified,
                                 oracle=shared.oracle)
            except ArtifactError as exc:
                raise IncompatiblePrompt(f"{label} does not fit the served model"
                                         f" {shared.oracle.info.name!r}: {exc}") from None

        prompt = loads_prompt(data, check=compatible)
        return PromptServable(prompt_id(data), prompt, shared, data=data,
                              created=time.time(), max_images=self.max_images,
                              max_pixels=self.max_pixels)

    def add(self, data: bytes, *, label: str = "upload", persist: bool = True,
            owner: str | None = None) -> tuple[PromptServable, bool]:
        """Validate, store and serve prompt bytes for ``owner``; returns ``(servable, created)``
        (``created`` is False when the caller could already see these exact bytes).

        Raises (nothing stored): :class:`TooLarge` (413), :class:`ArtifactError` (400),
        :class:`IncompatiblePrompt` (422), :class:`NameConflict` (409), :class:`StorageError`.
        """
        pid = prompt_id(data)
        with self._lock:
            existing = self._existing(pid, data)
            if existing is not None:
                return self._share(existing, owner)
        servable = self._validate(data, label)
        with self._lock:
            existing = self._existing(pid, data)
            if existing is not None:
                return self._share(existing, owner)
            if pid in self.registry.names():
                raise NameConflict(f"prompt id {pid!r} is already the name of a served model")
            owners = {owner} if owner is not None else set()
            if persist and self.directory is not None:
                path = self.directory / f"{pid}{SUFFIX}"
                try:
                    if owners:  # first: a crash must not leave a private prompt public
                        _write_owners(path, owners)
                    write_atomic(path, data)
                except OSError as exc:
                    owners_path(path).unlink(missing_ok=True)
                    raise StorageError(f"cannot store the prompt in {str(self.directory)!r}:"
                                       f" {exc.strerror or exc}") from None
                servable.created = path.stat().st_mtime
                self._paths[pid] = path
            servable.owners = owners
            self._prompts[pid] = servable
            self.registry.add(servable)
        logger.info("prompt %s added (%d target classes, %s program)", pid,
                    len(servable.class_names), servable.prompt.program.kind)
        return servable, True

    def _share(self, servable: PromptServable, owner: str | None) -> tuple[PromptServable, bool]:
        """Make an already hosted prompt visible to ``owner`` (call with the lock held)."""
        if owner is None or visible_to(owner)(servable):
            return servable, False
        owners = servable.owners | {owner}
        path = self._paths.get(servable.prompt_id)
        if path is not None:
            try:
                _write_owners(path, owners)
            except OSError as exc:
                raise StorageError(f"cannot store the prompt's owners: {exc.strerror}") from None
        servable.owners = owners
        logger.info("prompt %s shared with key %s", servable.prompt_id, owner)
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
        for side in self.directory.glob(f"*{OWNERS_SUFFIX}"):
            stem = side.name[: -len(OWNERS_SUFFIX)]
            if not (self.directory / f"{stem}{SUFFIX}").exists():
                logger.warning("removing %s, left over from an interrupted upload", side.name)
                side.unlink(missing_ok=True)
        loaded = 0
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                data = path.read_bytes()
                owners = read_owners(path)
                servable = self._validate(data, repr(path.name))
                servable.owners = owners
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

    def get(self, pid: str, owner: str | None = None) -> PromptServable:
        """The prompt ``pid`` as ``owner`` sees it (404 if unknown or another key's)."""
        with self._lock:
            servable = self._prompts.get(pid)
        if servable is None or not visible_to(owner)(servable):
            raise NotFound(f"unknown prompt {pid!r}; GET /v1/prompts lists the hosted prompts")
        return servable

    def list(self, owner: str | None = None) -> list[PromptServable]:
        """Every hosted prompt ``owner`` may see, oldest first."""
        visible = visible_to(owner)
        with self._lock:
            shown = [s for s in self._prompts.values() if visible(s)]
        return sorted(shown, key=lambda s: (s.created, s.prompt_id))

    def delete(self, pid: str, owner: str | None = None) -> None:
        """Stop serving ``pid`` for ``owner`` (404 if unknown or another key's; 403 for a
        prompt without owners when ``owner`` is given); remove it when no owner is left."""
        with self._lock:
            servable = self.get(pid, owner)
            path = self._paths.get(pid)
            if owner is not None:
                if not servable.owners:
                    raise Forbidden(f"prompt {pid!r} is provided by the operator and cannot be"
                                    " deleted with an API key")
                remaining = servable.owners - {owner}
                if remaining:
                    if path is not None:
                        try:
                            _write_owners(path, remaining)
                        except OSError as exc:
                            raise StorageError(f"cannot delete prompt {pid!r}:"
                                               f" {exc.strerror}") from None
                    servable.owners = remaining
                    logger.info("prompt %s no longer shared with key %s", pid, owner)
                    return
            if path is not None:
                try:  # the prompt first: a crash leaves an orphan owners file, not a public prompt
                    path.unlink(missing_ok=True)
                    owners_path(path).unlink(missing_ok=True)
                except OSError as exc:
                    raise StorageError(f"cannot delete prompt {pid!r}: {exc.strerror}") from None
                fsutil.fsync_dir(path.parent)
                del self._paths[pid]
            del self._prompts[pid]
            self.registry.remove(pid)
        logger.info("prompt %s deleted", pid)
