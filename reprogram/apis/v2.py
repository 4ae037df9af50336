"""The Open Inference Protocol (KServe V2) REST dialect.

Metadata may say only what the specification requires, or less: no ``inputs``/``outputs`` (the
KServe Python server's default), ``parameters: {}``, dynamic shapes (``-1``). The input layout
is read from the shape (``[-1, 3, H, W]`` NCHW, ``[-1, H, W, 3]`` NHWC), the size from its
positive dimensions; whatever is missing comes from :class:`~reprogram.apis.EndpointOptions`.

Tensors go as binary data (the ``binary_tensor_data`` extension) where the server supports it
and as JSON otherwise: ``tensor_format="auto"`` reads the extensions listed by ``GET /v2``,
and where the server lists none, tries binary and falls back to JSON by itself, once, after a
first failed binary request, saying so in the log.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

import numpy as np

from reprogram import protocol
from reprogram.apis import Described, Dialect, Layout
from reprogram.errors import (
    ConfigError,
    OracleError,
    ProtocolError,
    UpstreamError,
    UpstreamUnavailable,
)
from reprogram.http_transport import Refused

log = logging.getLogger(__name__)

BINARY_EXTENSION = "binary_tensor_data"
_DATATYPE = {"uint8": "UINT8", "fp32": "FP32"}
_INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT16", "UINT32", "UINT64"})


def layout_of(shape: list[Any], declared: Any = None) -> Layout:
    """NCHW or NHWC from a rank-4 input shape (channels of 3 on one side only), else from a
    declared ``layout``/``data_format`` parameter, else NCHW."""
    if isinstance(declared, str) and declared.upper() in ("NCHW", "NHWC"):
        return declared.upper()  # type: ignore[return-value]
    if isinstance(declared, str) and declared.lower() in ("channels_last", "channels_first"):
        return "NHWC" if declared.lower() == "channels_last" else "NCHW"
    if len(shape) == 4 and shape[3] == 3 and shape[1] != 3:
        return "NHWC"
    return "NCHW"


def _size_from(shape: list[Any], layout: Layout) -> tuple[int, int] | None:
    if len(shape) != 4:
        return None
    h, w = (shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3])
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return h, w
    return None


class V2(Dialect):
    protocol = "v2"

    labels: tuple[str, ...] | None = None  # candidate labels sent with every request
    template: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.binary = self.options.tensor_format != "json"
        self._settled = self.options.tensor_format != "auto"
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.input_name = "image"
        self.output_name: str | None = None
        self.layout: Layout = "NCHW"

    # ---------------------------------------------------------------- metadata
    def describe(self) -> Described:
        meta = self.transport.json("GET", f"/v2/models/{self.model}", "model metadata")
        if not isinstance(meta, dict):
            raise OracleError(f"expected a JSON object as model metadata, got {meta!r:.100}")
        if self.options.tensor_format == "auto":
            self._choose_format()
        try:
            return self._read(meta)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise OracleError(f"unreadable metadata of model {self.model!r}: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _read(self, meta: dict[str, Any]) -> Described:
        opts = self.options
        params: dict[str, Any] = dict(meta.get("parameters") or {})
        image = (meta.get("inputs") or [{}])[0]
        output = (meta.get("outputs") or [{}])[0]
        shape = list(image.get("shape") or [])
        self.layout = opts.layout or layout_of(shape, params.get("layout") or params.get(
            "data_format"))
        self.input_name = opts.input_name or image.get("name") or "image"
        self.output_name = output.get("name") or None
        kind = opts.output_kind or params.get("output_kind")
        if kind is None and str(output.get("datatype") or "").upper() in _INT_TYPES:
            kind = "label"  # an integer output holds class indices
        out_shape = output.get("shape") or []
        k = out_shape[-1] if out_shape and kind != "label" else None
        names = opts.class_names or params.get("class_names")
        size = opts.input_size or params.get("input_size") or _size_from(shape, self.layout)
        cap = params.get("max_batch_size") or (shape[0] if shape and isinstance(
            shape[0], int) and shape[0] > 0 else None)
        accepts = {str(image.get("datatype") or "").upper(),
                   *(str(d).upper() for d in (image.get("parameters") or {}).get(
                       "also_accepts") or []),
                   *(str(d).upper() for d in params.get("input_datatypes") or [])} - {""}
        labels = _extra_input(meta, "labels", "BYTES")
        labels_input = "labels" if labels is not None else None
        raw_zs = params.get("zero_shot")
        zero_shot: dict[str, Any] = raw_zs if isinstance(raw_zs, dict) else {}
        context = _extra_input(meta, "context", "FP32")
        width = (context.get("shape") or [None])[-1] if labels_input and context else None
        identity = {"name": str(meta.get("name", self.model)),
                    "versions": meta.get("versions"), "platform": meta.get("platform") or None,
                    "weights_sha256": params.get("weights_sha256"),
                    "input_shape": shape or None, "output_shape": out_shape or None}
        return Described(
            name=str(meta.get("name", self.model)),
            input_size=(int(size[0]), int(size[1])) if size else None,
            layout=self.layout,
            class_names=tuple(str(n) for n in names) if names else None,
            num_classes=int(k) if isinstance(k, int) and k > 0 else None,
            output_kind=str(kind) if kind else None, max_batch=int(cap) if cap else None,
            accepts=frozenset(accepts), identity=identity, labels_input=labels_input,
            template=str(zero_shot["template"]) if zero_shot.get("template") else None,
            context_width=int(width) if isinstance(width, int) and width > 0 else None)

    def _choose_format(self) -> None:
        """Binary or JSON from the extensions ``GET /v2`` lists; undecided when it lists none."""
        try:
            server = self.transport.json("GET", "/v2", "server metadata")
        except (Refused, UpstreamError):
            return
        extensions = server.get("extensions") if isinstance(server, dict) else None
        if not isinstance(extensions, list):
            return
        self._settled = True
        self.binary = BINARY_EXTENSION in extensions
        if not self.binary:
            log.info("the server lists no %s extension (%s): sending JSON tensors",
                     BINARY_EXTENSION, ", ".join(map(str, extensions)) or "none")

    def summary(self) -> str:
        how = "binary" if self.binary else "JSON"
        return f"v2 ({how} tensors{'' if self._settled else ', JSON if binary fails'})"

    # ---------------------------------------------------------------- inference
    def infer(self, images: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        """One request; ``context``: a zero-shot model's CoOp context vectors (FP32
        ``[M, W]`` or ``[K, M, W]``) sent with the labels, in the template's place."""
        if self.layout == "NHWC":
            images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        binary = self.binary
        try:
            return self._post(images, binary, context)
        except (Refused, UpstreamError) as exc:
            if self._settled or not binary or not _maybe_binary(exc):
                raise
            first = exc
        try:
            out = self._post(images, False, context)
        except (Refused, UpstreamError):
            raise first from None
        with self._lock:
            if not self._settled:
                self._settled, self.binary = True, False
                log.warning("the server failed a binary-tensor request (%s); sending JSON "
                            "tensors from now on", str(first).split(": ", 1)[-1][:120])
        return out

    def _post(self, images: np.ndarray, binary: bool, context: np.ndarray | None = None
              ) -> np.ndarray:
        t0 = time.perf_counter()
        outputs = None if self.output_name is None else [protocol.RequestedOutput(
            name=self.output_name, parameters={"binary_data": binary})]
        inputs: dict[str, Any] = {self.input_name: images}
        parameters: dict[str, Any] = {}
        if self.labels is not None:  # a zero-shot model: the candidate labels, every time
            inputs["labels"] = np.array(self.labels, dtype=object)
            if context is not None:
                inputs["context"] = np.ascontiguousarray(context, dtype=np.float32)
            elif self.template is not None:
                parameters["template"] = self.template
        body, headers = protocol.encode_request(inputs, outputs, binary=binary,
                                                request_id=str(next(self._ids)),
                                                parameters=parameters or None)
        t1 = time.perf_counter()
        response = self.transport.request("POST", f"/v2/models/{self.model}/infer",
                                          content=body, headers=headers)
        t2 = time.perf_counter()
        try:
            arrays, _ = protocol.decode_response(response.content, response.headers)
        except ProtocolError as exc:
            raise UpstreamError(f"unreadable inference response: {exc}".splitlines()[0],
                                public_message="the upstream model server answered "
                                               "something unreadable") from None
        self.add_times(t1 - t0, t2 - t1, time.perf_counter() - t2, response.headers)
        if self.output_name is None:
            if not arrays:
                raise UpstreamError("expected an output tensor in the response, got none")
            return next(iter(arrays.values()))
        if self.output_name not in arrays:
            raise UpstreamError(f"expected output {self.output_name!r} in the response, got "
                                f"{sorted(arrays)}")
        return arrays[self.output_name]


def _extra_input(meta: dict[str, Any], name: str, datatype: str) -> dict[str, Any] | None:
    """The metadata of input ``name`` of ``datatype`` after the image (a zero-shot model's
    ``labels`` or ``context``), or None."""
    return next((t for t in (meta.get("inputs") or [])[1:] if isinstance(t, dict)
                 and t.get("name") == name and str(t.get("datatype", "")).upper() == datatype),
                None)


def _maybe_binary(exc: Exception) -> bool:
    """Whether a failure could be a server's answer to a binary body it cannot read: a 400,
    415 or 422 refusal, or a 5xx other than 503 (unavailable, which says nothing of it)."""
    if isinstance(exc, Refused):
        return exc.status in (400, 415, 422)
    return not isinstance(exc, UpstreamUnavailable)


def check_datatype(accepts: frozenset[str], tensor_dtype: str, wire: str) -> None:
    """Fail early when the model says it does not take the wire's datatype."""
    want = _DATATYPE[tensor_dtype]
    if accepts and want not in accepts:
        other = next((w for w, d in _DATATYPE.items() if d in accepts), None)
        hint = f"; use wire={other!r} (--wire {other})" if other else ""
        raise ConfigError(f"expected the endpoint to accept {want} images for wire "
                          f"{wire!r}, got {sorted(accepts)}{hint}")
