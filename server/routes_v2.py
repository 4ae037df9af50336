"""Open Inference Protocol (KServe V2) REST routes.

Health, server and model metadata, model readiness and infer, each model route also under
``/versions/{version}``. Infer reads the raw body so that both JSON tensors and the binary
tensor extension work; the ``classification`` output parameter returns Triton-style
``"score:index:label"`` strings. With output kind ``label`` the only score is the one-hot
``1`` of the predicted class, so ``classification`` gives one entry per image whatever ``k``.
Readiness is false while the server drains after SIGTERM. Infer refuses an empty rate-limit
bucket before reading the body, bounds JSON nesting and size before parsing, the decoded
pixels, repeated outputs and the answer's size (:mod:`server.limits`), stops at the request's
deadline (:mod:`server.budget`), and charges the images to the caller
(:mod:`server.admission`).
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import reprogram
from reprogram import codecs, protocol
from reprogram.errors import ProtocolError
from reprogram.protocol import InferenceRequest, InferenceResponse, OutputTensor, RequestedOutput
from server.admission import Admission, admission_for, lookup
from server.budget import check_deadline
from server.gate import caller_of, visible_to
from server.inference import INPUT_NAME, MODEL_VERSION, Registry, Servable, TooLarge
from server.limits import (
    PixelBudget,
    check_distinct_outputs,
    check_json_structure,
    check_response_size,
    response_floor,
)
from server.openapi import errors, schema_ref
from server.settings import Settings

router = APIRouter(prefix="/v2", tags=["v2"])

EXTENSIONS = ["binary_tensor_data", "classification"]


class Live(BaseModel):
    """``GET /v2/health/live``."""

    live: bool


class Ready(BaseModel):
    """``GET /v2/health/ready``: ``reason`` says why not when ``ready`` is false;
    ``degraded`` says what does not work while the models still answer (the shared state)."""

    ready: bool
    reason: str | None = None
    degraded: str | None = None


class ModelReady(BaseModel):
    """``GET /v2/models/{model_name}/ready``."""

    name: str
    ready: bool


_READY = {"model": Ready, "description": "not ready: loading, failed, or shutting down"}
_MODEL_READY = {"model": ModelReady, "description": "the model is still loading or failed"}
_INFER_OK = {"description": "the outputs: JSON, or a JSON header plus binary tensors",
             "content": {"application/json": {"schema": schema_ref(InferenceResponse)},
                         "application/octet-stream": {"schema": {"type": "string",
                                                                 "format": "binary"}}}}
_INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": schema_ref(InferenceRequest)},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor extension: JSON header of"
                f" {protocol.HEADER_LENGTH} bytes, then raw little-endian tensors",
            },
        },
    }
}


def registry_of(request: Request) -> Registry:
    """The app's model registry."""
    registry: Registry = request.app.state.registry
    return registry


def _version() -> str:
    return getattr(reprogram, "__version__", None) or _dist_version()


def _dist_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reprogram")
    except PackageNotFoundError:
        return "0"


@router.get("/health/live")
def live() -> Live:
    """Liveness: the process answers."""
    return Live(live=True)


@router.get("/health/ready", response_model=Ready, responses={503: _READY})
def ready(request: Request) -> JSONResponse:
    """Readiness: 200 when every configured model is loaded; 503 with the reason before and
    while draining. With the shared state (Redis) down the models still answer, so it stays
    200 and ``degraded`` says what does not (prompts and shared limits): a load balancer keeps
    sending inference, and one Redis outage does not take every replica out of service."""
    reason = _not_ready(request)
    if reason is not None:
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)
    shared = getattr(request.app.state, "shared", None)
    problem = None if shared is None else shared.problem()
    return JSONResponse({"ready": True} if problem is None
                        else {"ready": True, "degraded": problem})


def _not_ready(request: Request) -> str | None:
    if getattr(request.app.state, "draining", False):
        return "shutting down"
    if not registry_of(request).ready():
        return "a model is loading or failed to load; POST /v2/repository/index says which"
    return None


@router.get("", responses=errors())
def server_metadata() -> protocol.ServerMetadata:
    """Server name, version and supported protocol extensions."""
    return protocol.ServerMetadata(name="reprogram", version=_version(), extensions=EXTENSIONS)


class IndexEntry(BaseModel):
    """One row of ``POST /v2/repository/index`` (Triton's and KServe's repository extension)."""

    name: str
    version: str | None = None
    state: str
    reason: str = ""


@router.post("/repository/index", responses=errors(400, 413))
async def repository_index(request: Request) -> list[IndexEntry]:
    """Every source model with its state (``READY``, ``LOADING``, ``UNAVAILABLE``); body
    ``{"ready": true}`` lists only the ready ones. Hosted prompts are listed at /v1/prompts."""
    body = await request.body()
    check_json_structure(body, max_depth=4, max_elements=64)  # a small options object
    try:
        options = json.loads(body) if body.strip() else {}
    except ValueError:
        raise ProtocolError("expected a JSON object such as {\"ready\": true}, got invalid"
                            " JSON") from None
    ready = options.get("ready", False) if isinstance(options, dict) else None
    if not isinstance(ready, bool):
        raise ProtocolError(f"expected a JSON object with an optional boolean 'ready', got"
                            f" {body[:80]!r}")
    store = getattr(request.app.state, "prompts", None)
    prompts = {p.name for p in store.list()} if store is not None else set()
    rows = [IndexEntry(name=n, version=MODEL_VERSION if state == "READY" else None, state=state,
                       reason=why)
            for n, state, why in registry_of(request).states() if n not in prompts]
    return [r for r in rows if r.state == "READY" or not ready]


_META_ERRORS = errors(404, 503)


@router.get("/models/{model_name}", response_model_exclude_none=True, responses=_META_ERRORS)
@router.get("/models/{model_name}/versions/{version}", response_model_exclude_none=True,
            responses=_META_ERRORS)
def model_metadata(
    model_name: str, request: Request, version: str | None = None
) -> protocol.ModelMetadata:
    """Inputs, outputs and ``parameters`` (class names, input size, output kind ...)."""
    return lookup(request, model_name, version).metadata()


_READY_ERRORS = {**errors(404), 503: _MODEL_READY}


@router.get("/models/{model_name}/ready", response_model=ModelReady, responses=_READY_ERRORS)
@router.get("/models/{model_name}/versions/{version}/ready", response_model=ModelReady,
            responses=_READY_ERRORS)
def model_ready(model_name: str, request: Request, version: str | None = None) -> JSONResponse:
    """200 with ``ready: true`` once loaded; 503 while loading; 404 for unknown models."""
    visible = visible_to(caller_of(request).owner)
    ok = registry_of(request).status(model_name, version, visible=visible)
    return JSONResponse({"name": model_name, "ready": ok}, status_code=200 if ok else 503)


_INFER_RESPONSES = {200: _INFER_OK, **errors(400, 403, 404, 408, 413, 429, 503)}


@router.post("/models/{model_name}/infer", openapi_extra=_INFER_OPENAPI,
             response_class=Response, responses=_INFER_RESPONSES)
@router.post("/models/{model_name}/versions/{version}/infer", openapi_extra=_INFER_OPENAPI,
             response_class=Response, responses=_INFER_RESPONSES)
async def infer(model_name: str, request: Request, version: str | None = None) -> Response:
    """Run the model on input ``image`` (UINT8 0..255 or FP32 0..1, ``[N,3,H,W]``)."""
    admission = admission_for(request)
    admission.precheck()
    servable = lookup(request, model_name, version)
    body = await request.body()
    settings: Settings = request.app.state.settings
    body = decompress(body, request.headers.get("content-encoding"), settings.max_body_bytes)
    content, headers = await run_in_threadpool(run_infer, servable, body, dict(request.headers),
                                                admission, settings)
    return Response(content=content, headers=headers)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (as tritonclient may send), capped at ``limit``."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    enc = encoding.strip().lower()
    if enc not in ("gzip", "deflate"):
        raise ProtocolError(f"expected Content-Encoding gzip, deflate or identity, got {enc!r}")
    inflater = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"expected a valid {enc} body, got {exc}") from None
    if len(out) > limit:
        raise TooLarge(f"expected a decompressed body of at most {limit} bytes, got more")
    return out


def run_infer(servable: Servable, body: bytes, headers: dict[str, str],
              admission: Admission | None = None,
              settings: Settings | None = None) -> tuple[bytes, dict]:
    """Decode, validate, run and encode one inference request (runs in a worker thread).

    ``settings`` gives the JSON caps (defaults without); ``admission`` charges the images.
    """
    caps = settings or Settings()
    t0 = time.perf_counter()
    head_length = protocol.parse_header_length(headers, len(body))
    check_json_structure(body if head_length is None else body[:head_length],
                         max_depth=caps.max_json_depth, max_elements=caps.max_json_elements)
    req, tensors = protocol.decode_request(body, headers)
    from server.zero_shot import parse_query

    query = parse_query(servable, tensors, req.parameters, INPUT_NAME)
    labels = query.labels if query is not None else None
    requested = _requested_outputs(req, servable)
    images = tensors[INPUT_NAME]
    n = int(images.shape[0]) if images.ndim else 1
    if images.ndim == 4:
        PixelBudget(caps.max_request_pixels).take(
            n * int(images.shape[2]) * int(images.shape[3]),
            f"{n} images of {images.shape[2]}x{images.shape[3]}")
    check_response_size(_answer_floor(servable, n, requested), caps.max_response_bytes,
                        before=True)
    check_deadline("before inference")
    times = [t0, time.perf_counter()]

    def answer() -> tuple[bytes, dict[str, str]]:  # all of it charged, or refunded together
        scores = (servable.infer(images) if query is None
                  else servable.infer_labels(images, query))  # type: ignore[attr-defined]
        times.append(time.perf_counter())
        check_deadline("after inference")
        outputs = [_output_tensor(servable, scores, name, binary, k, labels)
                   for name, binary, k in requested]
        content, out_headers = protocol.encode_response(
            model_name=servable.name, model_version=servable.version, request_id=req.id,
            outputs=outputs)
        check_response_size(len(content), caps.max_response_bytes)
        times.append(time.perf_counter())
        return content, out_headers

    if admission is None:
        content, out_headers = answer()
    else:
        with admission.charge(n):
            content, out_headers = answer()
    # W3C Server-Timing (milliseconds): lets a client split a round trip into the server's
    # decoding, model forward pass (including any wait for the model) and encoding
    if caps.server_timing:
        stages = zip(("decode", "forward", "encode"), times, times[1:], strict=False)
        out_headers["Server-Timing"] = ", ".join(f"{name};dur={(end - start) * 1e3:.3f}"
                                                 for name, start, end in stages)
    return content, out_headers


def _answer_floor(servable: Servable, n: int, requested: list[tuple[str, bool, int]]) -> int:
    """The fewest bytes the answer to ``n`` images can take (see ``response_floor``)."""
    classes = len(servable.class_names)
    total = 0
    for _, binary, k in requested:
        per_image = 1 if servable.output.kind == "label" else min(k, classes) if k else classes
        total += response_floor(n, per_image, binary)
    return total


def _flag(params: dict[str, Any] | None, key: str, default: bool) -> bool:
    if not params or key not in params:
        return default
    value = params[key]
    if not isinstance(value, bool):
        raise ProtocolError(f"expected a boolean for parameter {key!r}, got {value!r}")
    return value


def _requested_outputs(
    req: InferenceRequest, servable: Servable
) -> list[tuple[str, bool, int]]:
    """``(name, binary, class_count)`` per requested output (all outputs when none listed)."""
    default_binary = _flag(req.parameters, "binary_data_output", False)
    wanted = req.outputs or [RequestedOutput(name=servable.output.output_name)]
    result = []
    for out in wanted:
        if out.name != servable.output.output_name:
            raise ProtocolError(
                f"expected output name {servable.output.output_name!r}, got {out.name!r}"
            )
        count = (out.parameters or {}).get("classification", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ProtocolError(
                f"expected a non-negative integer 'classification' count, got {count!r}"
            )
        result.append((out.name, _flag(out.parameters, "binary_data", default_binary), count))
    check_distinct_outputs(name for name, _, _ in result)
    return result


def _output_tensor(
    servable: Servable, scores: np.ndarray, name: str, binary: bool, class_count: int,
    labels: tuple[str, ...] | None = None,
) -> OutputTensor:
    names = labels if labels is not None else servable.class_names
    if not class_count:
        return OutputTensor(name=name, array=scores, binary=binary,
                            datatype=servable.output.datatype)
    if servable.output.kind == "label":
        onehot = np.zeros((scores.shape[0], len(names)), dtype=np.float32)
        onehot[np.arange(scores.shape[0]), scores] = 1.0
        scores, class_count = onehot, 1
    elif servable.output.k is not None:
        class_count = min(class_count, servable.output.k)
    strings = codecs.encode_classification(scores, class_count, names)
    return OutputTensor(name=name, array=strings, binary=binary, datatype="BYTES")
