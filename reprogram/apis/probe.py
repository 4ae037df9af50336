"""``--protocol auto``: find out which API an endpoint speaks, in a few cheap GETs.

In order: a V2 server answers ``GET /v2/health/ready`` (or ``GET /v2``) with JSON; TorchServe's
inference API answers ``GET /ping`` with ``{"status": ...}``; a KServe V1 / TF-Serving server
answers ``GET /v1/models/{m}`` with its readiness (``ready``, ``model_version_status``); any
other URL is tried as V2. What was found is logged in one line by
``HttpOracle``. An endpoint that answers none of these with JSON (a web page, say) is a
one-line error naming what came back.
"""

from __future__ import annotations

import logging
from typing import Any

from reprogram.apis import ProtocolName
from reprogram.errors import UpstreamError
from reprogram.http_transport import Refused, Transport, looks_like_html

log = logging.getLogger(__name__)


def _get(transport: Transport, path: str) -> tuple[int, Any, bytes] | None:
    """``(status, JSON or None, body)`` of one GET, None when nothing answered usefully."""
    try:
        response = transport.request("GET", path)
    except Refused as exc:
        return exc.status, None, exc.body
    except UpstreamError:
        if not transport.answered:  # nothing listens there: no point asking on other routes
            raise
        return None
    try:
        return response.status_code, response.json(), response.content
    except ValueError:
        return response.status_code, None, response.content


def detect(transport: Transport, model: str | None) -> ProtocolName:
    """The protocol ``transport``'s endpoint speaks (see the module docstring)."""
    seen: list[bytes] = []
    for path in ("/v2/health/ready", "/v2"):
        got = _get(transport, path)
        if got and got[0] < 400 and isinstance(got[1], dict):
            return "v2"
        if got:
            seen.append(got[2])
    got = _get(transport, "/ping")
    if got and got[0] < 400 and isinstance(got[1], dict) and "status" in got[1]:
        return "torchserve"
    if got:
        seen.append(got[2])
    if model:
        got = _get(transport, f"/v1/models/{model}")
        if got and got[0] < 400 and isinstance(got[1], dict):
            if "ready" in got[1] or "model_version_status" in got[1]:
                return "kserve-v1"
            if "class_names" in got[1]:
                return "labels"
    if any(looks_like_html(b) for b in seen):
        raise UpstreamError(f"cannot tell which inference API {transport.url} speaks: it "
                            "answered HTML pages to GET /v2, /ping and /v1/models/...; is it an "
                            "inference endpoint? (name one with --protocol "
                            "v2|kserve-v1|torchserve|labels)",
                            public_message="the upstream endpoint speaks no known inference "
                                           "API")
    log.info("%s shows no health route of any known API; trying V2", transport.url)
    return "v2"
