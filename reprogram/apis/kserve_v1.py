"""KServe V1 / TF-Serving REST: ``POST /v1/models/{m}:predict`` with ``{"instances": [...]}``,
``{"predictions": [...]}`` back.

Each instance is one image as nested lists, channel-first (``[3, H, W]``) or, with
``layout="NHWC"`` (TF-Serving's convention), ``[H, W, 3]``: 0..255 integers on the uint8
wire, floats in [0, 1] on fp32. The protocol has no model metadata beyond readiness, so the
input size comes from ``--input-size``; the class count from the first answer. Predictions are
score vectors, or ``{name: score}`` objects (TorchServe's shape), which make the answers named.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from reprogram.apis import Answer, Described, Dialect
from reprogram.errors import OracleError, UpstreamError
from reprogram.http_transport import parse_json
from reprogram.vocabulary import named_row


class KServeV1(Dialect):
    protocol = "kserve-v1"

    def describe(self) -> Described:
        status = self.transport.json("GET", f"/v1/models/{self.model}", "model status")
        if isinstance(status, dict) and status.get("ready") is False:
            raise OracleError(f"model {self.model!r} is not ready on {self.transport.url}")
        if self.options.input_size is None:
            raise OracleError(f"the KServe V1 endpoint gives no input size for model "
                              f"{self.model!r}; pass --input-size H,W")
        identity = {"name": str(status.get("name", self.model)) if isinstance(status, dict)
                    else self.model}
        return Described(name=identity["name"], input_size=self.options.input_size,
                         layout=self.options.layout or "NCHW",
                         class_names=self.options.class_names,
                         output_kind=self.options.output_kind, max_batch=self.options.max_batch,
                         identity=identity)

    def infer(self, images: np.ndarray) -> Answer:
        t0 = time.perf_counter()
        if (self.options.layout or "NCHW") == "NHWC":
            images = images.transpose(0, 2, 3, 1)
        body = json.dumps({"instances": images.tolist()}, separators=(",", ":")).encode()
        t1 = time.perf_counter()
        response = self.transport.request("POST", f"/v1/models/{self.model}:predict",
                                          content=body,
                                          headers={"Content-Type": "application/json"})
        t2 = time.perf_counter()
        answer = parse_json(response, f"POST /v1/models/{self.model}:predict", "predictions")
        preds = answer.get("predictions") if isinstance(answer, dict) else None
        if not isinstance(preds, list) or len(preds) != len(images):
            got = len(preds) if isinstance(preds, list) else type(preds).__name__
            raise UpstreamError(f"expected {len(images)} predictions in the answer, got {got}",
                                public_message="the upstream model server answered "
                                               "something unreadable")
        out: Answer
        if all(isinstance(p, dict) for p in preds):
            out = [named_row(p, "the predictions") for p in preds]
        else:
            out = _scores(preds)
        self.add_times(t1 - t0, t2 - t1, time.perf_counter() - t2, response.headers)
        return out


def _scores(preds: list[Any]) -> np.ndarray:
    try:
        out = np.asarray(preds, dtype=np.float32)
    except (TypeError, ValueError):
        raise UpstreamError("expected numeric predictions (one score vector or label per "
                            "image), got mixed values",
                            public_message="the upstream model server answered something "
                                           "unreadable") from None
    if out.ndim not in (1, 2):
        raise UpstreamError(f"expected predictions of rank 1 or 2, got shape {list(out.shape)}")
    return out.astype(np.int64) if out.ndim == 1 else out
