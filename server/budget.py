"""Time limits of one request: a body-read timeout and a deadline for the whole request.

:class:`TimeBudgetMiddleware` starts both clocks when a request's headers have arrived:

- the body must arrive within ``body_timeout`` seconds (``--body-timeout``): each read of the
  body waits at most for what is left of that time, then the request is answered 408 with
  ``Connection: close`` (a client that sends half a body and stalls holds nothing for longer);
- the request must be answered within ``request_timeout`` seconds (``--request-timeout``):
  the deadline travels with the request in a context variable (copied into the worker thread
  that runs inference), and the work checks it between its stages with
  :func:`check_deadline` and while it waits for a model with :func:`holding`. Past it the
  request is answered 503 with ``Retry-After``; the work stops at the next check, so a
  request stays at most one forward chunk past its deadline.

Outside a request (tests, the library) there is no deadline and the checks do nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ClassVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reprogram.errors import ReprogramError

_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("reprogram_deadline",
                                                              default=None)


class BodyTimeout(ReprogramError, RuntimeError):
    """The body did not arrive within ``--body-timeout`` (408; the connection is closed)."""

    status_code = 408
    headers: ClassVar[dict[str, str]] = {"Connection": "close"}


class DeadlineExceeded(ReprogramError, RuntimeError):
    """The request ran past ``--request-timeout`` (503)."""

    status_code = 503
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


def remaining() -> float | None:
    """Seconds left before the current request's deadline (None outside a request)."""
    budget = _DEADLINE.get()
    return None if budget is None else budget[0] - time.monotonic()


def check_deadline(stage: str) -> None:
    """Raise :class:`DeadlineExceeded` if the current request is past its deadline."""
    budget = _DEADLINE.get()
    if budget is not None and time.monotonic() > budget[0]:
        raise _exceeded(budget[1], stage)


def _exceeded(limit: float, stage: str) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"expected the request to finish within {limit:g} s (--request-timeout), got past it"
        f" {stage}; send fewer images per request, or retry when the server is less busy")


@contextmanager
def holding(lock: threading.Lock, what: str) -> Iterator[None]:
    """Hold ``lock``, waiting at most until the current request's deadline for it."""
    budget = _DEADLINE.get()
    if budget is None:
        with lock:
            yield
        return
    if not lock.acquire(timeout=max(0.0, budget[0] - time.monotonic())):
        raise _exceeded(budget[1], f"while waiting for {what}")
    try:
        yield
    finally:
        lock.release()


class TimeBudgetMiddleware:
    """Start a request's body-read timeout and deadline (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, body_timeout: float, request_timeout: float) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.request_timeout = request_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        body_by = start + self.body_timeout
        received = 0
        done = False

        async def timed_receive() -> Message:
            nonlocal received, done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, body_by - time.monotonic()))
            except TimeoutError:
                raise BodyTimeout(
                    f"expected the request body within {self.body_timeout:g} s"
                    f" (--body-timeout), got {received} bytes by then; send the whole body"
                    " at once") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        token = _DEADLINE.set((start + self.request_timeout, self.request_timeout))
        try:
            await self.app(scope, timed_receive, send)
        finally:
            _DEADLINE.reset(token)
