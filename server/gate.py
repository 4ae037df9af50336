"""API keys and the caller of each request.

Keys come from a file (one per line, ``name:key`` or a bare ``key``; blank lines and ``#``
comments skipped) and/or the environment variable ``REPROGRAM_API_KEYS`` (comma-separated
entries of the same form); see :func:`load_api_keys`. A request presents its key as
``X-API-Key: KEY`` or ``Authorization: Bearer KEY`` (``X-API-Key`` wins when both are sent);
:class:`KeyRing` compares the SHA-256 of it with ``hmac.compare_digest`` against that of every
configured key (equal lengths, no early exit: timing reveals neither which key matched, nor
how much of it, nor its length).

:class:`GateMiddleware` runs before any body is read: it identifies the :class:`Caller`
(the key's *name*, never the key) and, when keys are configured, answers 401
``{"error": ...}`` with ``WWW-Authenticate: Bearer`` on every path except :data:`OPEN_PATHS`
(health probes, the OpenAPI schema and its docs pages: they describe the API, not its data).
Without keys the server is open and each client address is its own caller (for rate limits).

Hosted prompts are owned by the keys that uploaded them: :func:`visible_to` hides a prompt from
other keys, which then get 404 exactly as for an unknown id.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from reprogram.errors import ConfigError
from server.console import is_console_path
from server.settings import ApiKey, check_keys

logger = logging.getLogger(__name__)

ENV_VAR = "REPROGRAM_API_KEYS"
SCOPE_KEY = "reprogram.caller"
ANONYMOUS = "anonymous"
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs",
                        "/docs/oauth2-redirect", "/redoc"})
MIN_KEY_LENGTH = 16


def parse_keys(lines: Iterable[str], where: str) -> list[ApiKey]:
    """API keys from ``name:key`` or ``key`` entries (blank and ``#`` lines skipped)."""
    keys = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            keys.append(ApiKey.parse(text))
        except ConfigError as exc:
            raise ConfigError(f"{where}, entry {number}: {exc}") from None
    return keys


def load_api_keys(path: str | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[ApiKey, ...]:
    """Keys from the file ``path`` (if given) and ``$REPROGRAM_API_KEYS`` (if set)."""
    keys: list[ApiKey] = []
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read API keys file {path!r}: {exc}") from None
        keys += parse_keys(text.splitlines(), f"API keys file {path!r}")
        if not keys:
            raise ConfigError(f"expected at least one key in API keys file {path!r}, got none")
    env = os.environ if environ is None else environ
    if env.get(ENV_VAR, "").strip():
        keys += parse_keys(env[ENV_VAR].split(","), f"${ENV_VAR}")
    check_keys(tuple(keys))
    for key in keys:
        if len(key.secret) < MIN_KEY_LENGTH:
            logger.warning("API key %r is shorter than %d characters; use long random keys",
                           key.name, MIN_KEY_LENGTH)
    return tuple(keys)


def _digest(key: str) -> bytes:
    """SHA-256 of a key: equal-length operands for ``compare_digest`` (hides the key length)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyRing:
    """The configured keys; :meth:`identify` maps a presented key to its name."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = [(k.name, _digest(k.secret)) for k in keys]

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured (the server requires one)."""
        return bool(self._keys)

    def identify(self, presented: str | None) -> str | None:
        """The name of the key ``presented``, or None (compared in constant time)."""
        if presented is None or not self._keys:
            return None
        given = _digest(presented)
        found = None
        for name, secret in self._keys:  # every key is compared: no early exit
            if hmac.compare_digest(given, secret) and found is None:
                found = name
        return found


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in ``X-API-Key`` or ``Authorization: Bearer`` (None when neither is sent)."""
    key = headers.get("x-api-key")
    if key is not None:
        return key.strip()
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


@dataclass
class Caller:
    """Who sent a request, and what it did (filled in as the request is handled).

    ``name`` is the key name (or :data:`ANONYMOUS` on an open server) and labels metrics and
    logs; ``client`` is the peer address; ``meter`` is the key the quotas count under (the key
    name, else the address); ``owner`` owns uploaded prompts (None on an open server: every
    prompt is visible to everyone).
    """

    name: str = ANONYMOUS
    client: str = "-"
    meter: str = "-"
    owner: str | None = None
    images: int = 0
    model: str | None = None


def caller_of(conn: HTTPConnection | Scope) -> Caller:
    """The :class:`Caller` of a request (a fresh anonymous one outside the middleware)."""
    scope = conn.scope if isinstance(conn, HTTPConnection) else conn
    caller = scope.get(SCOPE_KEY)
    if not isinstance(caller, Caller):
        caller = Caller()
        scope[SCOPE_KEY] = caller
    return caller


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1")
            for k, v in scope.get("headers") or []}


class GateMiddleware:
    """Identify the caller; with keys configured, 401 without a valid key (except health)."""

    def __init__(self, app: ASGIApp, keyring: KeyRing,
                 unauthorized: Callable[[str], Any]) -> None:
        self.app = app
        self.keyring = keyring
        self.unauthorized = unauthorized

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        caller = caller_of(scope)
        peer = scope.get("client")
        caller.client = peer[0] if peer else "-"
        if not self.keyring.enabled:
            caller.meter = f"client:{caller.client}"
            await self.app(scope, receive, send)
            return
        presented = presented_key(_headers(scope))
        name = self.keyring.identify(presented)
        path = scope.get("path", "")
        if name is None and path not in OPEN_PATHS and not is_console_path(path):
            why = "missing API key" if presented is None else "invalid API key"
            response = self.unauthorized(
                f"{why}: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
            await response(scope, receive, send)
            return
        if name is not None:
            caller.name = caller.meter = caller.owner = name
        await self.app(scope, receive, send)


def visible_to(owner: str | None) -> Callable[[Any], bool]:
    """Predicate: may ``owner`` see this servable? Prompts with owners are private to them;
    everything else (the source model, operator-provided prompts) is public."""

    def visible(servable: Any) -> bool:
        owners = getattr(servable, "owners", None)
        return owner is None or not owners or owner in owners

    return visible
