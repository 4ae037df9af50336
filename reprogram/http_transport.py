"""HTTP exchanges with a model server: retries, backoff and one-line failure messages.

:class:`Transport` sends one request at a time per caller over a shared ``httpx.Client`` and
retries what a retry can cure: connection errors, 429 and 5xx, with exponential backoff and
full jitter, honouring ``Retry-After``. It stops early where a retry cannot help: any other 4xx
(a refusal), 501/505, and a *deterministic* 5xx, the same status and body for the same request
several times in a row (a predictor that crashes on this input crashes again); and every
request's retrying ends within :attr:`RetryPolicy.deadline` seconds. Failures are
:class:`~reprogram.errors.UpstreamError` subclasses whose message is one line: the status and
at most the first line of the server's error text, never its whole body (tracebacks, paths).
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from reprogram.errors import (
    ConfigError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

# 429 asks the client to come back (no other 4xx is retried: a retry cannot change the answer,
# and a 401/403 retried in a loop looks like key guessing); every 5xx is transient except
# "not implemented" (501) and "HTTP version not supported" (505), which a retry cannot cure.
RETRY_STATUS = frozenset({429})
NO_RETRY_5XX = frozenset({501, 505})
EXCERPT_CHARS = 160
REPLICA_COOLDOWN_S = 5.0


def _retryable(status: int) -> bool:
    return status in RETRY_STATUS or (status >= 500 and status not in NO_RETRY_5XX)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter; ``Retry-After`` wins when the server sends it.

    ``identical_5xx``: this many identical 5xx answers in a row (503 apart, which asks to come
    back) mark the failure as deterministic and end the retries. ``deadline``: seconds one
    request may spend retrying, waits included."""

    max_retries: int = 8
    base: float = 0.25
    cap: float = 30.0
    # Retries of a connection that fails before the server has ever answered (nothing listens
    # there, a wrong host): a mistyped endpoint fails in about a second, not after minutes of
    # backoff. Once the server has answered, a refused connection is a restart and gets
    # ``max_retries``.
    connect_retries: int = 2
    identical_5xx: int = 3
    deadline: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.connect_retries < 0 or self.identical_5xx < 1:
            raise ConfigError(f"expected non-negative retry counts and identical_5xx >= 1, "
                              f"got {self}")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        backoff = min(self.cap, self.base * 2.0**attempt) * rng.uniform(0.5, 1.0)
        return max(retry_after, 0.0) if retry_after is not None else backoff


# what `reprogram serve` uses in front of an endpoint: a client waiting on a proxied request
# gets an answer (or a 502/503/504) in seconds, not after a fit's patient minute of retries
SERVE_RETRY = RetryPolicy(max_retries=3, base=0.2, cap=2.0, identical_5xx=2, deadline=10.0)


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from ``Retry-After``: delay-seconds or an HTTP-date (RFC 9110 10.2.3),
    capped at 300 s; ``None`` when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is always GMT
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), 300.0)


def looks_like_html(body: bytes) -> bool:
    head = body[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or (
        head.startswith(b"<") and b"<html" in body[:4096].lower())


def excerpt(body: bytes) -> str:
    """One line about an error body: the first line of a V2/KServe ``error`` (or ``detail``,
    ``message``) text, at most 160 characters; "an HTML page"; "N bytes" otherwise."""
    text: str | None = None
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if isinstance(obj, dict):
        for key in ("error", "detail", "message", "msg"):
            if isinstance(obj.get(key), str):
                text = obj[key]
                break
    if text is None:
        if looks_like_html(body):
            return "an HTML page"
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return f"{len(body)} bytes"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else "an empty body"
    return first if len(first) <= EXCERPT_CHARS else first[: EXCERPT_CHARS - 3] + "..."


class Refused(UpstreamError):
    """A 4xx answer that a retry cannot change."""

    def __init__(self, message: str, status: int, body: bytes = b"") -> None:
        super().__init__(message, public_message=f"the upstream model server refused the "
                                                 f"request (HTTP {status})")
        self.status = status
        self.body = body[:4096]


def replica_urls(url: str) -> list[str]:
    """The base URLs of an endpoint: one, or several comma-separated replicas of one model."""
    urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
    for u in urls or [url]:
        if not u.startswith(("http://", "https://")):
            raise ConfigError(f"expected an http(s):// endpoint URL, got {u!r}")
    if len(set(urls)) != len(urls):
        raise ConfigError(f"expected distinct replica URLs, got {url!r}")
    return urls


class Replicas:
    """Round-robin over replica URLs; one that fails to connect sits out :attr:`cooldown` s."""

    def __init__(self, urls: list[str], cooldown: float = REPLICA_COOLDOWN_S) -> None:
        self.urls = urls
        self.cooldown = cooldown
        self._down: dict[str, float] = {}
        self._next = 0
        self._lock = threading.Lock()

    def pick(self) -> str:
        """The next replica that is up (the one down the longest if none is)."""
        with self._lock:
            now = time.monotonic()
            n = len(self.urls)
            for i in range(n):
                url = self.urls[(self._next + i) % n]
                if self._down.get(url, 0.0) <= now:
                    self._next = (self._next + i + 1) % n
                    return url
            return min(self.urls, key=lambda u: self._down.get(u, 0.0))

    def failed(self, url: str) -> bool:
        """Mark ``url`` down; True when another replica is up to try at once."""
        with self._lock:
            now = time.monotonic()
            self._down[url] = now + self.cooldown
            return any(self._down.get(u, 0.0) <= now for u in self.urls if u != url)


class Transport:
    """One endpoint's HTTP client: base URL(s), API key header, connection pool, retries.

    ``url`` may list several replicas of one model, comma-separated: requests go to them in
    turn over one keep-alive pool (a connection per replica and caller, so no replica gets
    every request), and a replica that stops answering is skipped for a few seconds, its
    request sent at once to the next one, so a fit survives a replica's death."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 retry: RetryPolicy | None = None, client: httpx.Client | None = None,
                 max_connections: int = 4, seed: int = 0) -> None:
        self.replicas = Replicas(replica_urls(url))
        self.url = ",".join(self.replicas.urls)
        max_connections *= len(self.replicas.urls)
        self.retry = retry or RetryPolicy()
        self.retries = 0
        self.answered = False  # has the server ever answered? (see RetryPolicy)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # retries and jitter are shared by the callers
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(
            timeout=timeout, headers=headers,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections))
        if client is not None and api_key:
            self.client.headers.update(headers)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP exchange with retries; raises an :class:`UpstreamError` when it cannot
        succeed (:class:`Refused` for a 4xx other than 429)."""
        policy = self.retry
        start = time.monotonic()
        limit = policy.max_retries
        last: tuple[int, bytes] | None = None
        same = 0
        for attempt in range(policy.max_retries + 1):
            wait_hint: float | None = None
            failure: type[UpstreamError] = UpstreamUnavailable
            base = self.replicas.pick()
            try:
                response = self.client.request(method, f"{base}{path}", **kwargs)
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if (len(self.replicas.urls) > 1 and not isinstance(exc, httpx.TimeoutException)
                        and self.replicas.failed(base)):
                    log.warning("%s %s: replica %s: %s; trying the next replica", method,
                                path, base, why)
                    continue
                if isinstance(exc, httpx.TimeoutException):
                    failure = UpstreamTimeout
                elif isinstance(exc, httpx.ConnectError) and not self.answered:
                    limit = min(limit, policy.connect_retries)
                    why += f" (is a server running at {self.url}?)"
            else:
                self.answered, limit = True, policy.max_retries
                status = response.status_code
                if status < 400:
                    return response
                text = excerpt(response.content)
                if not _retryable(status):
                    raise Refused(f"{method} {path} was refused with HTTP {status}: {text}",
                                  status, response.content)
                key = (status, response.content)
                same = same + 1 if key == last else 1
                last = key
                why = f"HTTP {status}: {text}"
                wait_hint = retry_after(response)
                if status not in (429, 503):
                    failure = UpstreamError
                    if same >= policy.identical_5xx:
                        raise UpstreamError(
                            f"{method} {path}: the model server failed with {why} ({same} "
                            f"identical answers to the same request: not retried further)",
                            public_message=f"the upstream model server failed (HTTP {status})")
            with self._lock:
                wait = policy.delay(attempt, wait_hint, self._rng)
            elapsed = time.monotonic() - start
            if attempt >= limit or elapsed + wait > policy.deadline:
                raise failure(f"{method} {path} failed after {attempt + 1} attempts: {why} "
                              f"(the model server at {self.url}, {elapsed:.1f} s)",
                              public_message=_PUBLIC[failure])
            with self._lock:
                self.retries += 1
            log.log(logging.WARNING if self.answered else logging.INFO,
                    "%s %s: %s; retrying in %.2fs", method, path, why, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        """The JSON body of a successful exchange; a one-line :class:`UpstreamError` when the
        body is not JSON (an HTML page from a web server or a login wall, say)."""
        response = self.request(method, path, **kwargs)
        return parse_json(response, f"{method} {path}", what)

    def close(self) -> None:
        self.client.close()


_PUBLIC: dict[type[UpstreamError], str] = {
    UpstreamError: "the upstream model server failed",
    UpstreamUnavailable: "the upstream model server is unavailable",
    UpstreamTimeout: "the upstream model server did not answer in time",
}


def parse_json(response: httpx.Response, where: str, what: str) -> Any:
    """``response``'s JSON, else an :class:`UpstreamError` naming what came instead."""
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        got = "an HTML page" if looks_like_html(response.content) else (
            f"{len(response.content)} bytes of {response.headers.get('content-type') or 'data'}")
        raise UpstreamError(f"{where}: expected {what} as JSON, got {got}; is the URL an "
                            "inference endpoint (see --protocol)?",
                            public_message="the upstream model server answered "
                                           "something unreadable") from None


def _split_unquoted(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside double-quoted strings (backslash escapes honoured)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def server_timing(header: str) -> dict[str, float]:
    """Seconds per metric of a W3C ``Server-Timing`` header (``name;dur=MS;desc="...", ...``).

    The first ``dur`` of a metric counts; metrics without a valid one are left out, and a
    metric named twice adds up."""
    result: dict[str, float] = {}
    for metric in _split_unquoted(header, ","):
        name, *params = (part.strip() for part in _split_unquoted(metric, ";"))
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() != "dur":
                continue
            try:
                ms = float(value.strip().strip('"'))
            except ValueError:
                ms = math.nan
            if name and math.isfinite(ms) and ms >= 0:
                result[name] = result.get(name, 0.0) + ms / 1e3
            break  # the first dur only
    return result
