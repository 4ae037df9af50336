"""What the routes do around inference: find the servable the caller may see, meter images.

:func:`lookup` returns a model or prompt by name, hiding other keys' prompts (404, and left out
of the "expected one of" list). :class:`Admission` charges a request's images to the caller's
rate limit and quota (:class:`~server.quota.Ledger`; refunded when the request fails), counts
them in the metrics and the access log, and keeps the inference queue depth while the call
waits for and runs on the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from fastapi import Request

from server.gate import Caller, caller_of, visible_to
from server.inference import Registry, Servable
from server.observability import Metrics
from server.quota import Ledger, QuotaExhausted, RateLimited

T = TypeVar("T")


def lookup(request: Request, name: str, version: str | None = None) -> Servable:
    """The servable ``name`` as the caller may see it (404 for other keys' prompts)."""
    registry: Registry = request.app.state.registry
    caller = caller_of(request)
    servable = registry.get(name, version, visible=visible_to(caller.owner))
    caller.model = servable.name
    return servable


class Admission:
    """Meter one request's images against its caller's limits (see :mod:`server.quota`)."""

    def __init__(self, ledger: Ledger, metrics: Metrics, caller: Caller) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.caller = caller

    def _rejected(self, reason: str) -> None:
        self.metrics.rejected.labels(self.caller.name, reason).inc()

    def precheck(self) -> None:
        """429 at once when the caller's bucket is empty (before the body is read)."""
        try:
            self.ledger.precheck(self.caller.meter)
        except RateLimited:
            self._rejected("rate")
            raise

    @contextmanager
    def charge(self, n: int) -> Iterator[None]:
        """Admit ``n`` images (429/403 otherwise) for the inference inside the ``with``."""
        meter = self.caller.meter
        try:
            self.ledger.admit(meter, n)
        except RateLimited:
            self._rejected("rate")
            raise
        except QuotaExhausted:
            self._rejected("quota")
            raise
        try:
            with self.metrics.inference():
                yield
        except BaseException:  # no answer, no charge (bad input or a failure of ours)
            self.ledger.refund(meter, n)
            raise
        self.metrics.images.labels(self.caller.name).inc(n)
        self.caller.images += n

    def run(self, n: int, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` with ``n`` images charged (for ``run_in_threadpool``)."""
        with self.charge(n):
            return fn(*args)


def admission_for(request: Request) -> Admission:
    """The :class:`Admission` of a request."""
    ledger: Ledger = request.app.state.ledger
    metrics: Metrics = request.app.state.metrics
    return Admission(ledger, metrics, caller_of(request))
