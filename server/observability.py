"""Prometheus metrics and structured access logs.

:class:`Metrics` owns one ``prometheus_client`` registry per app (no global state: several
apps can live in one process, as in the tests) with

- ``reprogram_http_requests_total{method, route, status}``: requests by route *template*
  (``/v2/models/{model_name}/infer``; ``<unmatched>`` for unknown paths) and status;
- ``reprogram_http_request_duration_seconds{method, route}``: latency histogram;
- ``reprogram_http_errors_total{status}``: 4xx/5xx answers by status code;
- ``reprogram_http_requests_in_flight`` and ``reprogram_inference_queue_depth`` (inference
  calls waiting for, or running on, a model);
- ``reprogram_images_inferred_total{key}`` and ``reprogram_rate_limited_total{key, reason}``
  per key name (``anonymous`` on a server without keys).

:class:`ObservabilityMiddleware` (the outermost middleware) times every request, counts it,
and writes one JSON line per request on the ``server.access`` logger: time, method, route
template, status, duration, images, key *name*, client address and model. Never the path's
query, headers, keys or image bytes.

Every label value comes from a closed set, so nothing a client sends (authenticated or not)
adds a time series: methods outside :data:`METHODS` count as ``OTHER``, paths as their route
template or ``<unmatched>``, statuses are the server's own, keys are configured names.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.gate import caller_of

access_logger = logging.getLogger("server.access")

UNMATCHED = "<unmatched>"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER_METHOD = "OTHER"


def method_label(scope: Scope) -> str:
    """The request method if it is a standard one, else :data:`OTHER_METHOD`."""
    method = scope.get("method")
    return method if method in METHODS else OTHER_METHOD
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class Metrics:
    """The server's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("reprogram_http_requests", "HTTP requests by route template,"
                                " method and status", ["method", "route", "status"], registry=r)
        self.latency = Histogram("reprogram_http_request_duration_seconds", "HTTP request"
                                 " latency by route template", ["method", "route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("reprogram_http_errors", "error answers (4xx and 5xx) by status"
                              " code", ["status"], registry=r)
        self.in_flight = Gauge("reprogram_http_requests_in_flight", "HTTP requests being"
                               " handled", registry=r)
        self.queue_depth = Gauge("reprogram_inference_queue_depth", "inference calls waiting"
                                 " for or running on a model", registry=r)
        self.images = Counter("reprogram_images_inferred", "images run through a model, by API"
                              " key name", ["key"], registry=r)
        self.rejected = Counter("reprogram_rate_limited", "requests refused by a rate limit"
                                " (rate) or quota (quota), by API key name",
                                ["key", "reason"], registry=r)

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Count an inference call in the queue depth while it waits and runs."""
        self.queue_depth.inc()
        try:
            yield
        finally:
            self.queue_depth.dec()


def route_template(scope: Scope, templates: list[tuple[re.Pattern[str], str]]) -> str:
    """The path template of the route that handled ``scope``; for requests answered before
    routing (a 401, an early 413) the schema's template the path matches; else ``<unmatched>``."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    for pattern, template in templates:
        if pattern.match(scope.get("path", "")):
            return template
    return UNMATCHED


class ObservabilityMiddleware:
    """Count, time and log every HTTP request (outermost: sees 401s, 413s and 500s too)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, fastapi_app: Any,
                 access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.fastapi_app = fastapi_app
        self.access_log = access_log
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    def templates(self) -> list[tuple[re.Pattern[str], str]]:
        """Regular expressions of the OpenAPI path templates (built on first use)."""
        if self._templates is None:
            paths = self.fastapi_app.openapi().get("paths", {})
            self._templates = [(compile_path(t)[0], t) for t in paths]
        return self._templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        caller = caller_of(scope)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            duration = time.perf_counter() - start
            route = route_template(scope, self.templates())
            method = method_label(scope)
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(duration)
            if status >= 400:
                self.metrics.errors.labels(str(status)).inc()
            if self.access_log and access_logger.isEnabledFor(logging.INFO):
                access_logger.info(json.dumps({
                    "ts": round(time.time(), 3), "method": method, "route": route,
                    "status": status, "duration_ms": round(duration * 1000.0, 2),
                    "images": caller.images, "key": caller.name, "client": caller.client,
                    "model": caller.model,
                }, separators=(",", ":")))
