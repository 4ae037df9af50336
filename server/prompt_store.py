"""Hosted prompts: validated uploads, kept by a records backend, served from the registry.

A prompt's id is the first :data:`ID_HEX` hex digits of the SHA-256 of its file's bytes, so
re-uploading the same file is idempotent and the id names exactly one artifact. Every upload is
validated before anything is stored: the size cap, then
:func:`~reprogram.artifact.loads_prompt` (format, schema version, bounded JSON, digest,
tensors, finite values) with :func:`~reprogram.artifact.check_compatible` against the served
model (input size, class count, weights SHA-256) run on the file's header before any tensor
is built. Where prompts are kept is the records backend's business
(:mod:`server.state.records`): a folder written atomically (the default), or a Redis shared
by every replica. At startup every stored prompt is loaded; invalid or incompatible ones are
logged and skipped.

With API keys, a prompt is owned by the keys that uploaded it (``owner``; None on an open
server). Other keys get 404 for it, exactly as for an unknown id; a key that uploads the same
bytes becomes a co-owner, and deleting removes only the caller's ownership until none is left.
Prompts without owners (uploaded to an open server, or given on the command line) are visible
to every key and cannot be deleted through a key.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from reprogram.artifact import check_compatible, loads_prompt
from reprogram.artifact_check import PromptHeader
from reprogram.errors import ArtifactError, ReprogramError
from reprogram.oracles import Oracle
from reprogram.vlm import bind_prompt_labels
from server.gate import visible_to
from server.hosted import PromptServable, SharedOracle
from server.inference import HTTPStatusError, NotFound, NotReady, Registry, TooLarge
from server.state.records import (
    ID_HEX,
    OWNERS_SUFFIX,
    SUFFIX,
    FolderRecords,
    PromptRecords,
    RecordHead,
    StorageError,
    prompt_id,
)

__all__ = ["ID_HEX", "OWNERS_SUFFIX", "SUFFIX", "Forbidden", "IncompatiblePrompt",
           "NameConflict", "PromptStore", "StorageError", "prompt_id"]

logger = logging.getLogger(__name__)


class IncompatiblePrompt(ArtifactError):
    """A valid prompt made for another model (422)."""

    status_code = 422


class NameConflict(HTTPStatusError):
    """A prompt id that is already the name of a served model (409)."""

    status_code = 409


class Forbidden(HTTPStatusError):
    """A prompt the caller may use but not delete (403)."""

    status_code = 403


class PromptStore:
    """The hosted prompts of one app: ids -> :class:`PromptServable`, kept in ``records``.

    The store needs the oracle through which prompts query the model; until :meth:`attach`
    is called (the model is still loading) uploads are answered 503. With shared records
    (Redis), every lookup reads the prompt's record first, so what another replica uploaded
    or deleted holds here at once; a prompt's bytes never change under its id (the id is
    their hash), so a servable built once is reused for as long as its record exists.
    """

    def __init__(self, registry: Registry, records: PromptRecords | None = None, *,
                 max_bytes: int, max_images: int, max_pixels: int) -> None:
        self.registry = registry
        self.records: PromptRecords = records if records is not None else FolderRecords(None)
        self.max_bytes = max_bytes
        self.max_images = max_images
        self.max_pixels = max_pixels
        self._shared: SharedOracle | None = None
        self._prompts: dict[str, PromptServable] = {}
        self._rejected: dict[str, str] = {}  # sha256 of records that failed validation -> why
        self._lock = threading.RLock()
        # serve prompts whose model identity cannot be checked against this one
        # (`reprogram serve --allow-unverified-model`)
        self.allow_unverified = False
        if self.records.shared:
            registry.resolver = self._resolve

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

    def _validate(self, data: bytes, label: str, head: RecordHead) -> PromptServable:
        """Parse and check prompt bytes against the served model; nothing is stored."""
        if len(data) > self.max_bytes:
            raise TooLarge(f"expected a prompt file of at most {self.max_bytes} bytes, got"
                           f" {len(data)} in {label}")
        shared = self._oracle()

        def check(oracle: Oracle, header: PromptHeader) -> None:
            oracle.adopt_vocabulary(header.source.get("vocabulary"))
            bind_prompt_labels(oracle, header)
            info = oracle.info
            check_compatible(header, info.input_size, info.num_classes, info.fingerprint,
                             allow_unverified=self.allow_unverified, oracle=oracle)

        def compatible(header: PromptHeader) -> None:  # before any tensor is built
            try:
                shared.run(lambda oracle: check(oracle, header))
            except ReprogramError as exc:
                raise IncompatiblePrompt(f"{label} does not fit the served model"
                                         f" {shared.oracle.info.name!r}: {exc}") from None

        prompt = loads_prompt(data, check=compatible)
        servable = PromptServable(head.prompt_id, prompt, shared, data=data,
                                  created=head.created, max_images=self.max_images,
                                  max_pixels=self.max_pixels)
        servable.owners = set(head.owners)
        return servable

    def _serve(self, servable: PromptServable) -> None:
        """Serve ``servable`` under its id (call with the lock held)."""
        self._prompts[servable.prompt_id] = servable
        self.registry.add(servable)

    def _unserve(self, pid: str) -> None:
        """Stop serving ``pid`` here (call with the lock held)."""
        if self._prompts.pop(pid, None) is not None:
            self.registry.remove(pid)

    def add(self, data: bytes, *, label: str = "upload", persist: bool = True,
            owner: str | None = None) -> tuple[PromptServable, bool]:
        """Validate, store and serve prompt bytes for ``owner``; returns ``(servable, created)``
        (``created`` is False when the caller could already see these exact bytes).

        Raises (nothing stored): :class:`TooLarge` (413), :class:`ArtifactError` (400),
        :class:`IncompatiblePrompt` (422), :class:`NameConflict` (409), :class:`StorageError`,
        ``StateUnavailable`` (503).
        """
        head = RecordHead.of(data, frozenset({owner} if owner is not None else ()))
        existing = self._existing(head)
        if existing is not None:
            return self._share(existing, owner)
        servable = self._validate(data, label, head)
        with self._lock:
            existing = self._existing(head)
            if existing is not None:
                return self._share(existing, owner)
            if head.prompt_id in self.registry.names():
                raise NameConflict(f"prompt id {head.prompt_id!r} is already the name of a"
                                   " served model")
            if persist:
                servable.created = self.records.write(head, data).created
            self._serve(servable)
        logger.info("prompt %s added (%d target classes, %s program)", head.prompt_id,
                    len(servable.class_names), servable.prompt.program.kind)
        return servable, True

    def _share(self, servable: PromptServable, owner: str | None) -> tuple[PromptServable, bool]:
        """Make an already hosted prompt visible to ``owner``."""
        if owner is None or visible_to(owner)(servable):
            return servable, False
        with self._lock:
            owners = frozenset(servable.owners | {owner})
            head = RecordHead(servable.prompt_id, servable.sha256, owners, servable.created)
            self.records.write(head, None)
            servable.owners = set(owners)
        logger.info("prompt %s shared with key %s", servable.prompt_id, owner)
        return servable, True

    def _existing(self, head: RecordHead) -> PromptServable | None:
        """The hosted prompt with these exact bytes, if any (409 on a shortened-id clash)."""
        servable = self._current(head.prompt_id)
        if servable is None:
            return None
        if servable.sha256 != head.sha256:
            raise NameConflict(f"prompt id {head.prompt_id!r} is taken by a different file")
        return servable

    def add_file(self, path: str | Path) -> PromptServable:
        """Serve a prompt file given on the command line (stored too when a folder is set)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"cannot read prompt file {str(path)!r}: {exc.strerror}") from None
        return self.add(data, label=repr(str(path)))[0]

    def load(self) -> int:
        """Serve every valid stored prompt; log and skip the others. Returns the count."""
        loaded = sum(self._take(head) is not None for head in self.records.heads().values())
        logger.info("loaded %d stored prompt(s)", loaded)
        return loaded

    def _take(self, head: RecordHead) -> PromptServable | None:
        """Build and serve the stored prompt ``head`` (None when it is invalid or gone)."""
        if head.sha256 in self._rejected:
            return None
        data = self.records.read(head.prompt_id)
        if data is None:
            return None
        try:
            servable = self._validate(data, repr(head.describe()), head)
        except ReprogramError as exc:
            logger.warning("skipping %s: %s", head.describe(), exc)
            self._rejected[head.sha256] = str(exc)
            return None
        with self._lock:
            if head.prompt_id in self._prompts:
                return self._prompts[head.prompt_id]
            if head.prompt_id in self.registry.names():
                logger.warning("skipping stored prompt %s: its id is the name of a served"
                               " model", head.prompt_id)
                return None
            self._serve(servable)
        return servable

    def _current(self, pid: str) -> PromptServable | None:
        """The servable of ``pid`` as its record says now (shared records are read again)."""
        if not self.records.shared:
            with self._lock:
                return self._prompts.get(pid)
        head = self.records.heads(pid).get(pid)
        with self._lock:
            servable = self._prompts.get(pid)
            if head is None or (servable is not None and servable.sha256 != head.sha256):
                self._unserve(pid)
                return None
            if servable is not None:
                servable.owners = set(head.owners)
                return servable
        return self._take(head) if self.ready else None

    def _resolve(self, name: str) -> None:
        """Bring the registry's entry for ``name`` up to date with the shared records."""
        with self._lock:
            known = name in self._prompts
        if known or (len(name) == ID_HEX and all(c in "0123456789abcdef" for c in name)
                     and name not in self.registry.names()):
            self._current(name)

    def _refresh_all(self) -> None:
        """Bring every prompt up to date with the shared records (a no-op for local ones)."""
        if not self.records.shared:
            return
        heads = self.records.heads()
        with self._lock:
            for pid in [p for p in self._prompts if p not in heads]:
                self._unserve(pid)
            for pid, head in heads.items():
                servable = self._prompts.get(pid)
                if servable is not None:
                    servable.owners = set(head.owners)
        for pid, head in heads.items():
            if pid not in self._prompts and self.ready:
                self._take(head)

    def get(self, pid: str, owner: str | None = None) -> PromptServable:
        """The prompt ``pid`` as ``owner`` sees it (404 if unknown or another key's)."""
        servable = self._current(pid)
        if servable is None or not visible_to(owner)(servable):
            raise NotFound(f"unknown prompt {pid!r}; GET /v1/prompts lists the hosted prompts")
        return servable

    def list(self, owner: str | None = None) -> list[PromptServable]:
        """Every hosted prompt ``owner`` may see, oldest first."""
        self._refresh_all()
        visible = visible_to(owner)
        with self._lock:
            shown = [s for s in self._prompts.values() if visible(s)]
        return sorted(shown, key=lambda s: (s.created, s.prompt_id))

    def delete(self, pid: str, owner: str | None = None) -> None:
        """Stop serving ``pid`` for ``owner`` (404 if unknown or another key's; 403 for a
        prompt without owners when ``owner`` is given); remove it when no owner is left."""
        servable = self.get(pid, owner)
        with self._lock:
            if owner is not None:
                if not servable.owners:
                    raise Forbidden(f"prompt {pid!r} is provided by the operator and cannot be"
                                    " deleted with an API key")
                remaining = frozenset(servable.owners - {owner})
                if remaining:
                    head = RecordHead(pid, servable.sha256, remaining, servable.created)
                    self.records.write(head, None)
                    servable.owners = set(remaining)
                    logger.info("prompt %s no longer shared with key %s", pid, owner)
                    return
            self.records.remove(pid)
            self._unserve(pid)
        logger.info("prompt %s deleted", pid)
