"""``HttpOracle``: a model behind an Open Inference Protocol (KServe V2) REST API.

It discovers the input shape, class names and output kind from the model metadata (with
overrides for servers that do not say), sends 8-bit images by default as binary tensors, splits
a query into requests of at most the server's batch cap with a bounded number in flight over
one persistent connection pool, and retries connection errors, 5xx and 429 with exponential
backoff and jitter, honouring ``Retry-After``. Any other 4xx is a clear :class:`OracleError`.
The API key travels in a header and is never logged.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import torch

from reprogram import protocol
from reprogram.errors import ConfigError, OracleError, ProtocolError
from reprogram.oracles import ModelInfo, Oracle, WireDtype, parse_output_kind

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter; ``Retry-After`` wins when the server sends it."""

    max_retries: int = 8
    base: float = 0.25
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        backoff = min(self.cap, self.base * 2.0**attempt) * rng.uniform(0.5, 1.0)
        return max(retry_after, 0.0) if retry_after is not None else backoff


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(float(value), 300.0)
    except ValueError:
        return None


class HttpOracle(Oracle):
    """Scores from a V2 inference server; not differentiable (use a ZO estimator)."""

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        wire: WireDtype = "uint8",
        binary: bool = True,
        output_kind: str | None = None,
        input_name: str | None = None,
        max_batch: int | None = None,
        max_in_flight: int = 4,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        client: httpx.Client | None = None,
        budget: int | None = None,
        max_requests: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(budget=budget, max_requests=max_requests)
        if wire not in ("uint8", "fp32"):
            raise ConfigError(f"expected wire uint8 or fp32, got {wire!r}")
        if max_in_flight < 1:
            raise ConfigError(f"expected max_in_flight >= 1, got {max_in_flight}")
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"expected an http(s):// endpoint URL, got {url!r}")
        self.model_name = model or "default"
        self.wire: WireDtype = wire
        self.binary = binary
        self.max_in_flight = max_in_flight
        self.retry = retry or RetryPolicy()
        self.retries = 0
        self.timings = {"encode": 0.0, "http": 0.0, "decode": 0.0}
        self._rng = random.Random(seed)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(
            timeout=timeout, headers=headers,
            limits=httpx.Limits(max_connections=max_in_flight,
                                max_keepalive_connections=max_in_flight))
        if client is not None and api_key:
            self._client.headers.update(headers)
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight) if max_in_flight > 1 else None
        meta = self._discover()
        params: dict[str, Any] = dict(meta.get("parameters") or {})
        inputs = meta.get("inputs") or [{}]
        outputs = meta.get("outputs") or [{}]
        shape = list(inputs[0].get("shape") or [])
        size = params.get("input_size") or (shape[-2:] if len(shape) == 4 else None)
        if not size or len(size) != 2:
            raise OracleError(f"model {self.model_name!r} metadata gives no input size "
                              f"(inputs shape {shape}); pass it explicitly")
        self.input_name = input_name or inputs[0].get("name") or "image"
        self.output_name = str(outputs[0].get("name") or "probs")
        kind = output_kind or params.get("output_kind") or {
            "logits": "logits", "label": "label"}.get(self.output_name, "probs")
        parse_output_kind(str(kind))
        k = (outputs[0].get("shape") or [-1, 0])[-1] if self.output_name != "label" else 0
        names = params.get("class_names") or [str(i) for i in range(int(k or 0))]
        if not names:
            raise OracleError(f"model {self.model_name!r} metadata gives no class count")
        cap = params.get("max_batch_size")
        self.max_batch = int(max_batch or cap or 256)
        self._info = ModelInfo(
            name=str(meta.get("name", self.model_name)),
            input_size=(int(size[0]), int(size[1])),
            class_names=tuple(str(n) for n in names),
            output_kind=str(kind),
            wire_dtype=wire,
            fingerprint={"endpoint": self.url, "name": str(meta.get("name", self.model_name)),
                         "platform": meta.get("platform"),
                         "weights_sha256": params.get("weights_sha256"),
                         "input_size": [int(size[0]), int(size[1])],
                         "num_classes": len(names)},
        )

    # ---------------------------------------------------------------- transport
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP exchange with retries; raises OracleError when it cannot succeed."""
        url = f"{self.url}{path}"
        for attempt in range(self.retry.max_retries + 1):
            retry_after: float | None = None
            try:
                response = self._client.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return response
                message = protocol.error_message(response.content)
                if response.status_code not in RETRY_STATUS:
                    raise OracleError(f"{method} {path} was refused with HTTP "
                                      f"{response.status_code}: {message}")
                why = f"HTTP {response.status_code}: {message}"
                retry_after = _retry_after(response)
            if attempt == self.retry.max_retries:
                raise OracleError(f"{method} {path} failed after {attempt + 1} attempts: {why}")
            wait = self.retry.delay(attempt, retry_after, self._rng)
            self.retries += 1
            log.warning("%s %s: %s; retrying in %.2fs", method, path, why, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _discover(self) -> dict[str, Any]:
        response = self._request("GET", f"/v2/models/{self.model_name}")
        try:
            meta = response.json()
        except ValueError as exc:
            raise OracleError(f"model metadata of {self.model_name!r} is not JSON") from exc
        if not isinstance(meta, dict):
            raise OracleError(f"expected a JSON object as model metadata, got {meta!r:.100}")
        return meta

    def _infer_chunk(self, images: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        body, headers = protocol.encode_request(
            {self.input_name: images},
            [protocol.RequestedOutput(name=self.output_name, parameters={
                "binary_data": self.binary})],
            binary=self.binary)
        t1 = time.perf_counter()
        response = self._request("POST", f"/v2/models/{self.model_name}/infer",
                                 content=body, headers=headers)
        t2 = time.perf_counter()
        try:
            arrays, _ = protocol.decode_response(response.content, response.headers)
        except ProtocolError as exc:
            raise OracleError(f"unreadable inference response: {exc}") from exc
        if self.output_name not in arrays:
            raise OracleError(f"expected output {self.output_name!r} in the response, got "
                              f"{sorted(arrays)}")
        out = arrays[self.output_name]
        self.timings["encode"] += t1 - t0
        self.timings["http"] += t2 - t1
        self.timings["decode"] += time.perf_counter() - t2
        return out

    # ---------------------------------------------------------------- Oracle hooks
    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def differentiable(self) -> bool:
        return False

    def _scores(self, out: np.ndarray, n: int) -> torch.Tensor:
        k = self._info.num_classes
        if self._info.base_kind == "label":
            labels = torch.from_numpy(out.reshape(-1).astype(np.int64))
            if labels.numel() != n or int(labels.min()) < 0 or int(labels.max()) >= k:
                raise OracleError(f"expected {n} labels in [0,{k}), got {out.shape}")
            return torch.nn.functional.one_hot(labels, k).to(torch.float32)
        if out.shape != (n, k):
            raise OracleError(f"expected scores of shape [{n},{k}], got {list(out.shape)}")
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            if self.wire == "uint8":
                arr = torch.round(x.detach() * 255.0).to(torch.uint8).numpy()
            else:
                arr = x.detach().to(torch.float32).numpy()
        chunks = [arr[i : i + self.max_batch] for i in range(0, len(arr), self.max_batch)]
        if self._pool is not None and len(chunks) > 1:
            outs = list(self._pool.map(self._infer_chunk, chunks))
        else:
            outs = [self._infer_chunk(c) for c in chunks]
        scores = torch.cat([self._scores(o, len(c)) for o, c in zip(outs, chunks, strict=True)])
        return scores, len(chunks)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> HttpOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
