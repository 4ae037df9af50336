"""The OpenAPI description of the error answers, and of API-key security.

Every error is ``{"error": str}`` (:class:`~reprogram.protocol.ErrorResponse`); each route
declares the statuses it can answer with :func:`errors`, so generated clients and schema-based
fuzzers (schemathesis) see an accurate contract. :func:`install_openapi` adds the two ways to
send a key (``Authorization: Bearer`` and ``X-API-Key``) as security schemes, required on every
operation but the health probes when keys are configured.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from reprogram.protocol import ErrorResponse, InferenceRequest, InferenceResponse

WHY: dict[int, str] = {
    400: "malformed request (the message says what was expected)",
    401: "missing or invalid API key (only when the server has keys)",
    403: "the key's images quota is spent, or the operation is not allowed for it (tuning"
         " jobs off, fit quota spent, prompt download not allowed)",
    404: "unknown model, version or prompt (other keys' prompts are unknown too)",
    408: "the body did not arrive within --body-timeout (the connection is closed)",
    409: "the prompt id is taken, or the tuning job has already ended",
    413: "over a size cap: body bytes, images per request, pixels per image or request, JSON"
         " size, answer size",
    415: "an upload that is not a PNG or JPEG image",
    422: "invalid query parameters, a prompt made for another model, or a data set or fit"
         " config that cannot be trained on",
    429: "rate limit reached: retry after Retry-After seconds (or too many unfinished tuning"
         " jobs for the key)",
    503: "the model is still loading, failed to load, or the server is shutting down; or the"
         " request ran past --request-timeout (Retry-After)",
    507: "the prompt cannot be stored",
}
OPEN_OPERATIONS = frozenset({"/v2/health/live", "/v2/health/ready"})
EXTRA_MODELS: tuple[type[BaseModel], ...] = (InferenceRequest, InferenceResponse)
_REF = "#/components/schemas/{model}"


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    """A reference to ``model`` in the components (for hand-written request/response bodies;
    the model must be in :data:`EXTRA_MODELS` or used by a route)."""
    return {"$ref": _REF.format(model=model.__name__)}


def _add_models(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in EXTRA_MODELS:
        body = model.model_json_schema(ref_template=_REF)
        for name, sub in body.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components.setdefault(model.__name__, body)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses`` for error statuses ``codes`` (401 is always added)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted({401, *codes}):
        entry: dict[str, Any] = {"model": ErrorResponse, "description": WHY[code]}
        if code == 429:
            entry["headers"] = {"Retry-After": {
                "description": "whole seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 0}}}
        if code == 401:
            entry["headers"] = {"WWW-Authenticate": {
                "description": "the authentication scheme: Bearer", "schema": {"type": "string"}}}
        out[code] = entry
    return out


def _fix_validation_errors(schema: dict[str, Any]) -> None:
    """FastAPI documents 422 as ``HTTPValidationError``; ours is ``{"error": str}`` too."""
    ref = {"application/json": {"schema": schema_ref(ErrorResponse)}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if "422" in operation.get("responses", {}):
                operation["responses"]["422"] = {"description": WHY[422], "content": ref}
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def install_openapi(app: FastAPI, auth: bool) -> None:
    """Build ``/openapi.json`` once, with the API-key security schemes when ``auth``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                             description=app.description, routes=app.routes)
        _add_models(schema)
        _fix_validation_errors(schema)
        if auth:
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearer"] = {"type": "http", "scheme": "bearer"}
            schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            for path, operations in schema.get("paths", {}).items():
                if path in OPEN_OPERATIONS:
                    continue
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}, {"apiKey": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
