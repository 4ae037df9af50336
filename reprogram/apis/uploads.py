"""APIs that take one image file per request and answer class names.

``torchserve``: TorchServe's inference API, ``POST /predictions/{model}`` with the PNG/JPEG
bytes as the body; its stock image classifier answers the top 5 as ``{name: probability}``.
``labels``: an image-upload API answering ``[{label, score}, ...]`` (or our
``{"predictions": [{"top": [...]}]}``): a multipart upload (field ``files``) to the endpoint
URL itself, or, when the URL is a server root, to our ``/v1/models/{m}/predict?top_k=K``.

Neither says what input size its model takes (it resizes what it gets): frames are
``--input-size`` (default 224x224; our ``/v1/models/{m}`` says its own) and the names make a
:class:`~reprogram.vocabulary.Vocabulary`. Requests go one image at a time, a bounded number
in flight (``HttpOracle(max_in_flight=...)``).
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from reprogram.apis import UPLOAD_SIZE, Answer, Described, Dialect
from reprogram.errors import ConfigError, UpstreamError
from reprogram.http_transport import Refused, parse_json
from reprogram.vocabulary import named_row
from reprogram.wire import encode_image

log = logging.getLogger(__name__)


class _Uploads(Dialect):
    def _size(self, said: tuple[int, int] | None = None) -> tuple[int, int]:
        size = self.options.input_size or said
        if size is None:
            log.info("the endpoint gives no input size: sending %dx%d frames (--input-size)",
                     *UPLOAD_SIZE)
            size = UPLOAD_SIZE
        return size

    def _described(self, name: str, size: tuple[int, int], identity: dict[str, Any]
                   ) -> Described:
        if self.wire.kind == "fp32":
            raise ConfigError(f"expected an image wire (png, jpeg:Q) for the {self.protocol} "
                              "protocol, got fp32")
        names = self.options.class_names
        kind = self.options.output_kind or "topk-names:5"
        return Described(name=name, input_size=size, class_names=names, named=True,
                         output_kind=kind, max_batch=1, identity=identity)

    def _file(self, images: np.ndarray) -> bytes:
        if len(images) != 1:
            raise ConfigError(f"expected one image per request, got {len(images)}")
        return encode_image(images[0], self.wire)

    def _answer(self, response: Any, where: str, t: tuple[float, float, float]) -> Answer:
        row = named_row(parse_json(response, where, "class names with scores"), where)
        self.add_times(t[1] - t[0], t[2] - t[1], time.perf_counter() - t[2], response.headers)
        return [row]

    def _post(self, path: str, **kwargs: Any) -> Any:
        try:
            return self.transport.request("POST", path, **kwargs)
        except Refused as exc:
            if exc.status == 415 and self.wire.kind == "png":
                raise UpstreamError(f"{exc} (the API may take JPEG only: --wire jpeg:90)",
                                    public_message=exc.public_message) from None
            raise


class TorchServe(_Uploads):
    protocol = "torchserve"

    def describe(self) -> Described:
        if not self.model:
            raise ConfigError("expected the model name for a TorchServe endpoint (its "
                              "inference API lists none), got none; pass --endpoint-model NAME")
        health = self.transport.json("GET", "/ping", "health status")
        if isinstance(health, dict) and str(health.get("status", "")).lower() not in (
                "healthy", ""):
            log.warning("TorchServe at %s reports %r", self.transport.url, health.get("status"))
        return self._described(self.model, self._size(), {"name": self.model})

    def infer(self, images: np.ndarray) -> Answer:
        t0 = time.perf_counter()
        data = self._file(images)
        t1 = time.perf_counter()
        response = self._post(f"/predictions/{self.model}", content=data,
                              headers={"Content-Type": self.wire.content_type})
        return self._answer(response, f"POST /predictions/{self.model}",
                            (t0, t1, time.perf_counter()))


class Labels(_Uploads):
    protocol = "labels"

    def describe(self) -> Described:
        root = urlsplit(self.transport.url).path.strip("/") == ""
        said: tuple[int, int] | None = None
        name = self.model
        if root:  # our server: /v1/models/{m} says the input size
            info = self.transport.json("GET", f"/v1/models/{self.model}", "model info")
            size = info.get("input_size") if isinstance(info, dict) else None
            if isinstance(size, list) and len(size) == 2:
                said = (int(size[0]), int(size[1]))
            self.path = f"/v1/models/{self.model}/predict?top_k={self.options.top_k}"
        else:
            self.path, name = "", urlsplit(self.transport.url).path.strip("/")
        return self._described(name, self._size(said), {"name": name})

    def infer(self, images: np.ndarray) -> Answer:
        t0 = time.perf_counter()
        data = self._file(images)
        suffix = "jpg" if self.wire.kind == "jpeg" else "png"
        t1 = time.perf_counter()
        response = self._post(self.path, files={"files": (f"image.{suffix}", data,
                                                          self.wire.content_type)})
        return self._answer(response, f"POST {self.path or self.transport.url}",
                            (t0, t1, time.perf_counter()))
