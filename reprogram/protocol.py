"""Open Inference Protocol (KServe V2) messages and body framing, shared by server and client.

The V2 REST protocol (https://kserve.github.io/website/docs/concepts/architecture/data-plane/
v2-protocol) sends tensors as JSON ``{"name", "shape", "datatype", "data"}`` with ``data``
flattened in row-major order (nested lists are accepted too). The *binary tensor data*
extension (Triton) appends raw little-endian tensor bytes after the JSON header: the header
length travels in the HTTP header ``Inference-Header-Content-Length`` and each binary tensor
announces its byte count in ``parameters.binary_data_size``. ``BYTES`` elements are sent as a
4-byte little-endian length followed by the bytes.

Client side: :func:`encode_request` and :func:`decode_response`. Server side: the mirror
:func:`decode_request` and :func:`encode_response`. Every malformed message raises
:class:`~reprogram.errors.ProtocolError` with an "expected X, got Y" message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reprogram.codecs import (
    as_numpy,
    datatype_of,
    from_json_data,
    from_raw,
    numpy_dtype,
    to_json_data,
    to_raw,
)
from reprogram.errors import ProtocolError
from reprogram.strict import parse_count

HEADER_LENGTH = "Inference-Header-Content-Length"
"""HTTP header carrying the byte length of the JSON part of a binary-extension body."""

JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"


_MAX_LISTED_ERRORS = 3

# ----------------------------------------------------------------------------------------------
# pydantic messages


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


Shape = list[Annotated[int, Field(strict=True, ge=0)]]


class _Tensor(_Message):
    """A named tensor in a request or response (``data`` absent when sent as binary)."""

    name: str
    shape: Shape
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestInput(_Tensor):
    """One input tensor of an inference request (``data`` absent when sent as binary)."""


class RequestedOutput(_Message):
    """An output the client asks for; ``parameters`` may hold ``binary_data``/``classification``."""

    name: str
    parameters: dict[str, Any] | None = None

    @classmethod
    def make(
        cls, name: str, *, binary_data: bool | None = None, class_count: int = 0
    ) -> RequestedOutput:
        """Build a requested output as tritonclient does (``class_count`` > 0: top-k strings)."""
        params: dict[str, Any] = {}
        if binary_data is not None:
            params["binary_data"] = binary_data
        if class_count:
            params["classification"] = class_count
        return cls(name=name, parameters=params or None)


class InferenceRequest(_Message):
    """The JSON part of ``POST /v2/models/{m}/infer``."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestedOutput] | None = None


class ResponseOutput(_Tensor):
    """One output tensor of an inference response (``data`` absent when sent as binary)."""


class InferenceResponse(_Message):
    """The JSON part of an inference response."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(_Message):
    """An input or output in model metadata; ``-1`` in ``shape`` is a variable dimension."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None


class ModelMetadata(_Message):
    """``GET /v2/models/{m}``: what a client needs to build requests and read responses."""

    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] | None = None


class ServerMetadata(_Message):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class ErrorResponse(_Message):
    """Body of every 4xx/5xx response."""

    error: str


M = TypeVar("M", bound=BaseModel)


def parse_message(model: type[M], obj: object, what: str) -> M:
    """Validate a decoded JSON object as ``model``; errors become :class:`ProtocolError`."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object for the {what}, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise ProtocolError(f"invalid {what}: {validation_summary(exc)}") from None


def validation_summary(exc: ValidationError) -> str:
    """A one-line digest of a pydantic error: ``loc: message; ...``."""
    parts = []
    for err in exc.errors()[:_MAX_LISTED_ERRORS]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - _MAX_LISTED_ERRORS
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


# ----------------------------------------------------------------------------------------------
# body framing


def parse_header_length(headers: Mapping[str, str] | None, body_size: int) -> int | None:
    """Read ``Inference-Header-Content-Length`` (case-insensitive, ASCII digits only, between 1
    and ``body_size``); ``None`` when absent."""
    if not headers:
        return None
    wanted = HEADER_LENGTH.lower()
    value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    if value is None:
        return None
    if body_size < 1:
        raise ProtocolError(f"expected a body after the {HEADER_LENGTH} header, got none")
    return parse_count(value, f"{HEADER_LENGTH} (the JSON header's byte count, at most the"
                       f" body size)", minimum=1, maximum=body_size)


def _split_body(body: bytes, header_length: int | None, what: str) -> tuple[Any, memoryview]:
    head = body if header_length is None else body[:header_length]
    try:
        obj = json.loads(head)
    except (ValueError, RecursionError) as exc:
        hint = "" if header_length is not None else f" (binary bodies need {HEADER_LENGTH})"
        raise ProtocolError(f"expected a JSON {what}, got malformed JSON: {exc}{hint}") from None
    rest = memoryview(body)[len(head) :]
    return obj, rest


def _binary_size(params: dict[str, Any] | None, name: str) -> int | None:
    if not params or "binary_data_size" not in params:
        return None
    size = params["binary_data_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ProtocolError(
            f"expected a non-negative integer binary_data_size for {name!r}, got {size!r}"
        )
    return size


def _read_tensors(
    entries: Sequence[_Tensor], rest: memoryview, what: str
) -> dict[str, np.ndarray]:
    sizes = [_binary_size(e.parameters, e.name) for e in entries]
    announced = sum(s for s in sizes if s is not None)
    if announced != len(rest):
        relation = "shorter" if len(rest) < announced else "longer"
        raise ProtocolError(
            f"binary {what} body is {relation} than announced: expected {announced} bytes of"
            f" tensor data after the JSON header (sum of binary_data_size), got {len(rest)}"
        )
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for entry, size in zip(entries, sizes, strict=True):
        if entry.name in tensors:
            raise ProtocolError(f"expected unique tensor names, got {entry.name!r} twice")
        numpy_dtype(entry.datatype)
        if size is not None:
            if entry.data is not None:
                raise ProtocolError(
                    f"expected either 'data' or binary_data_size for {entry.name!r}, got both"
                )
            chunk = rest[offset : offset + size]
            offset += size
            tensors[entry.name] = from_raw(chunk, entry.shape, entry.datatype, entry.name)
        else:
            if entry.data is None:
                raise ProtocolError(
                    f"expected 'data' or parameters.binary_data_size for {entry.name!r}, got"
                    " neither"
                )
            tensors[entry.name] = from_json_data(
                entry.data, entry.shape, entry.datatype, entry.name
            )
    return tensors


@dataclass(frozen=True)
class OutputTensor:
    """An output to encode in a response: its array, datatype, and whether to send it raw."""

    name: str
    array: np.ndarray
    binary: bool = False
    datatype: str | None = None
    parameters: Mapping[str, Any] | None = None


def _frame(header: dict[str, Any], raws: Iterable[bytes]) -> tuple[bytes, dict[str, str]]:
    try:
        head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        raise ProtocolError(f"expected finite numbers in JSON tensor data, got {exc}") from None
    raw = b"".join(raws)
    if not raw and not _has_binary(header):
        return head, {"Content-Type": JSON_CONTENT_TYPE}
    return head + raw, {
        "Content-Type": BINARY_CONTENT_TYPE,
        HEADER_LENGTH: str(len(head)),
    }


def _has_binary(header: dict[str, Any]) -> bool:
    tensors = header.get("inputs") or header.get("outputs") or []
    return any("binary_data_size" in (t.get("parameters") or {}) for t in tensors)


def _tensor_entry(
    name: str, array: np.ndarray, datatype: str, binary: bool, params: Mapping[str, Any] | None
) -> tuple[dict[str, Any], bytes | None]:
    entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
    parameters = dict(params or {})
    raw = None
    if binary:
        raw = to_raw(array, datatype)
        parameters["binary_data_size"] = len(raw)
    else:
        entry["data"] = to_json_data(array)
    if parameters:
        entry["parameters"] = parameters
    return entry, raw


# ----------------------------------------------------------------------------------------------
# client side


def encode_request(
    inputs: Mapping[str, Any],
    outputs: Sequence[RequestedOutput] | None = None,
    *,
    binary: bool = True,
    binary_output: bool | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode an inference request body; returns ``(body, headers)`` to POST.

    ``inputs`` maps names to numpy arrays or torch tensors (datatype from the dtype: uint8 ->
    ``UINT8``, float32 -> ``FP32`` ...). ``binary`` sends inputs as raw bytes (binary tensor
    extension) instead of JSON ``data``. ``binary_output`` sets the request parameter
    ``binary_data_output`` (outputs default to raw bytes). ``outputs`` lists the wanted outputs
    (see :meth:`RequestedOutput.make`); ``None`` asks for all of them.
    """
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    params = dict(parameters or {})
    if binary_output is not None:
        params["binary_data_output"] = binary_output
    if params:
        header["parameters"] = params
    entries, raws = [], []
    for name, value in inputs.items():
        array = as_numpy(value)
        entry, raw = _tensor_entry(name, array, datatype_of(array), binary, None)
        entries.append(entry)
        if raw is not None:
            raws.append(raw)
    header["inputs"] = entries
    if outputs is not None:
        header["outputs"] = [o.model_dump(exclude_none=True) for o in outputs]
    return _frame(header, raws)


def decode_response(
    body: bytes, headers: Mapping[str, str] | None = None
) -> tuple[dict[str, np.ndarray], InferenceResponse]:
    """Decode an inference response body into ``({name: array}, response message)``."""
    obj, rest = _split_body(body, parse_header_length(headers, len(body)), "inference response")
    response = parse_message(InferenceResponse, obj, "inference response")
    return _read_tensors(response.outputs, rest, "response"), response


# ----------------------------------------------------------------------------------------------
# server side


def decode_request(
    body: bytes, headers: Mapping[str, str] | None = None
) -> tuple[InferenceRequest, dict[str, np.ndarray]]:
    """Decode an inference request body into ``(request message, {name: array})``."""
    obj, rest = _split_body(body, parse_header_length(headers, len(body)), "inference request")
    request = parse_message(InferenceRequest, obj, "inference request")
    return request, _read_tensors(request.inputs, rest, "request")


def encode_response(
    *,
    model_name: str,
    outputs: Sequence[OutputTensor],
    model_version: str | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode an inference response; returns ``(body, headers)``.

    Outputs with ``binary=True`` go as raw bytes after the JSON header and the headers then
    carry ``Inference-Header-Content-Length``; otherwise the body is plain JSON.
    """
    header: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        header["model_version"] = model_version
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = dict(parameters)
    entries, raws = [], []
    for out in outputs:
        datatype = out.datatype or datatype_of(out.array)
        entry, raw = _tensor_entry(out.name, out.array, datatype, out.binary, out.parameters)
        entries.append(entry)
        if raw is not None:
            raws.append(raw)
    header["outputs"] = entries
    return _frame(header, raws)


def error_message(body: bytes) -> str:
    """The ``error`` text of an error response body (the raw text if it is not V2 JSON)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body[:500].decode("utf-8", "replace")
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return str(obj["error"])
    return body[:500].decode("utf-8", "replace")
