"""The server's state behind one seam (DESIGN.md section 9): hosted prompts and usage.

``--state local`` (the default: nothing to install) keeps prompts in this process, mirrored
in ``--prompts-dir``, and counts usage in memory. ``--state redis://HOST:PORT/DB`` keeps both
in one Redis that every replica shares: a prompt uploaded to one replica is served by all at
once, and a key's rate limit and quota hold across all of them together.

:func:`open_state` builds a :class:`State` from the settings; routes reach prompts through
:class:`~server.prompt_store.PromptStore` and usage through the ledger, never the backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from reprogram.errors import ConfigError
from server.quota import Ledger
from server.settings import check_state_url
from server.state.errors import RETRY_AFTER_S, StateUnavailable, redis_errors
from server.state.records import FolderRecords, PromptRecords

__all__ = ["RETRY_AFTER_S", "State", "StateUnavailable", "check_state_url", "open_state"]

CONNECT_TIMEOUT_S = 1.0
SOCKET_TIMEOUT_S = 2.0
HEALTH_CACHE_S = 1.0


def _where(url: str) -> str:
    parts = urlsplit(url)  # never the password
    return f"redis at {parts.hostname}:{parts.port or 6379}{parts.path or ''}"


@dataclass
class State:
    """Prompt records, the usage ledger, and how to tell whether their storage answers."""

    backend: str  # "local", or where Redis is (no password)
    records: PromptRecords
    ledger: Ledger
    _client: object | None = None
    _checked: tuple[float, str | None] = field(default=(0.0, None))

    @property
    def client(self) -> Any:
        """The Redis client of a shared state (None for the local one)."""
        return self._client

    def problem(self) -> str | None:
        """None when the state answers; else why not (cached for a second)."""
        if self._client is None:
            return None
        stamp, why = self._checked
        now = time.monotonic()
        if now - stamp < HEALTH_CACHE_S:
            return why
        try:
            self._client.ping()  # type: ignore[attr-defined]
            why = None
        except redis_errors() as exc:
            why = str(StateUnavailable.of(self.backend, "serve prompts or shared limits", exc))
        self._checked = (now, why)
        return why


def open_state(url: str, *, prompts_dir: str | None, images_per_minute: int | None,
               quota_images: int | None) -> State:
    """The state ``url`` names (see :func:`check_state_url`); Redis is not contacted yet."""
    url = check_state_url(url)
    if url == "local":
        return State("local", FolderRecords(prompts_dir),
                     Ledger(images_per_minute=images_per_minute, quota_images=quota_images))
    if prompts_dir is not None:
        raise ConfigError("expected --prompts-dir or --state redis://..., not both: with Redis"
                          " the prompts are kept in Redis")
    try:
        import redis
    except ImportError:
        raise ConfigError("--state redis:// needs the redis package: pip install"
                          " 'reprogram[redis]'") from None
    from server.state.redis_ledger import RedisLedger
    from server.state.redis_records import RedisRecords

    client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                  socket_timeout=SOCKET_TIMEOUT_S)
    where = _where(url)
    return State(where, RedisRecords(client, where=where),
                 RedisLedger(client, images_per_minute=images_per_minute,
                             quota_images=quota_images), client)
