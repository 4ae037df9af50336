"""Operations routes: Prometheus ``/metrics`` and the caller's own ``/v1/usage``.

Both need a key when the server has keys (give Prometheus one: ``authorization`` in its scrape
config); only the health probes are open.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from server.gate import caller_of
from server.observability import Metrics
from server.openapi import errors
from server.quota import Ledger

router = APIRouter(tags=["operations"])


class UsageReport(BaseModel):
    """``GET /v1/usage``: the caller's counters and limits (``None``: unlimited)."""

    key: str
    images: int
    requests: int
    rate_limited: int
    quota_refused: int
    images_per_minute: int | None
    images_available_now: int | None
    quota_images: int | None
    quota_remaining: int | None


_METRICS_OK = {"description": "Prometheus text exposition format",
               "content": {"text/plain": {"schema": {"type": "string"}}}}


@router.get("/metrics", response_class=Response, responses={200: _METRICS_OK, **errors()})
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latency, errors, images per key, queue depth."""
    registry: Metrics = request.app.state.metrics
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/usage", responses=errors())
def usage(request: Request) -> UsageReport:
    """Images and requests of the caller's key (its address on a server without keys), with
    its rate limit and quota."""
    ledger: Ledger = request.app.state.ledger
    caller = caller_of(request)
    return UsageReport(key=caller.name, **ledger.report(caller.meter))
