"""Open Inference Protocol (KServe V2) REST routes.

Health, server and model metadata, model readiness and infer, each model route also under
``/versions/{version}``. Infer reads the raw body so that both JSON tensors and the binary
tensor extension work; the ``classification`` output parameter returns Triton-style
``"score:index:label"`` strings. With output kind ``label`` the only score is the one-hot
``1`` of the predicted class, so ``classification`` gives one entry per image whatever ``k``.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

import reprogram
from reprogram import protocol
from reprogram.errors import ProtocolError
from reprogram.protocol import InferenceRequest, OutputTensor, RequestedOutput
from server.inference import INPUT_NAME, Registry, Servable, TooLarge

router = APIRouter(prefix="/v2", tags=["v2"])

EXTENSIONS = ["binary_tensor_data", "classification"]

_INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": InferenceRequest.model_json_schema()},
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
def live() -> dict[str, bool]:
    """Liveness: the process answers."""
    return {"live": True}


@router.get("/health/ready", responses={503: {"description": "not ready"}})
def ready(request: Request) -> JSONResponse:
    """Readiness: 200 when every configured model is loaded, 503 before."""
    ok = registry_of(request).ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("")
def server_metadata() -> protocol.ServerMetadata:
    """Server name, version and supported protocol extensions."""
    return protocol.ServerMetadata(name="reprogram", version=_version(), extensions=EXTENSIONS)


@router.get("/models/{model_name}", response_model_exclude_none=True)
@router.get("/models/{model_name}/versions/{version}", response_model_exclude_none=True)
def model_metadata(
    model_name: str, request: Request, version: str | None = None
) -> protocol.ModelMetadata:
    """Inputs, outputs and ``parameters`` (class names, input size, output kind ...)."""
    return registry_of(request).get(model_name, version).metadata()


@router.get("/models/{model_name}/ready", responses={503: {"description": "not ready"}})
@router.get(
    "/models/{model_name}/versions/{version}/ready", responses={503: {"description": "not ready"}}
)
def model_ready(model_name: str, request: Request, version: str | None = None) -> JSONResponse:
    """200 with ``ready: true`` once loaded; 503 while loading; 404 for unknown models."""
    ok = registry_of(request).status(model_name, version)
    return JSONResponse({"name": model_name, "ready": ok}, status_code=200 if ok else 503)


@router.post("/models/{model_name}/infer", openapi_extra=_INFER_OPENAPI)
@router.post("/models/{model_name}/versions/{version}/infer", openapi_extra=_INFER_OPENAPI)
async def infer(model_name: str, request: Request, version: str | None = None) -> Response:
    """Run the model on input ``image`` (UINT8 0..255 or FP32 0..1, ``[N,3,H,W]``)."""
    servable = registry_of(request).get(model_name, version)
    body = await request.body()
    limit: int = request.app.state.settings.max_body_bytes
    body = decompress(body, request.headers.get("content-encoding"), limit)
    content, headers = await run_in_threadpool(run_infer, servable, body, dict(request.headers))
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


def run_infer(servable: Servable, body: bytes, headers: dict[str, str]) -> tuple[bytes, dict]:
    """Decode, validate, run and encode one inference request (runs in a worker thread)."""
    req, tensors = protocol.decode_request(body, headers)
    if list(tensors) != [INPUT_NAME]:
        raise ProtocolError(f"expected one input named {INPUT_NAME!r}, got {list(tensors)}")
    requested = _requested_outputs(req, servable)
    scores = servable.infer(tensors[INPUT_NAME])
    outputs = [_output_tensor(servable, scores, name, binary, k) for name, binary, k in requested]
    return protocol.encode_response(
        model_name=servable.name,
        model_version=servable.version,
        request_id=req.id,
        outputs=outputs,
    )


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
    return result


def _output_tensor(
    servable: Servable, scores: np.ndarray, name: str, binary: bool, class_count: int
) -> OutputTensor:
    if not class_count:
        return OutputTensor(name=name, array=scores, binary=binary,
                            datatype=servable.output.datatype)
    if servable.output.kind == "label":
        onehot = np.zeros((scores.shape[0], len(servable.class_names)), dtype=np.float32)
        onehot[np.arange(scores.shape[0]), scores] = 1.0
        scores, class_count = onehot, 1
    elif servable.output.k is not None:
        class_count = min(class_count, servable.output.k)
    strings = protocol.encode_classification(scores, class_count, servable.class_names)
    return OutputTensor(name=name, array=strings, binary=binary, datatype="BYTES")
