"""``HttpOracle``: a model behind an Open Inference Protocol (KServe V2) REST API.

It discovers the input shape, class names and output kind from the model metadata (with
overrides for servers that do not say), sends 8-bit images by default as binary tensors, splits
a query into requests of at most the server's batch cap with a bounded number in flight over
one persistent connection pool, and retries connection errors, 5xx and 429 with exponential
backoff and jitter, honouring ``Retry-After``. Any other 4xx is a clear :class:`OracleError`.
The API key travels in a header and is never logged. Without a model name it serves the first
model the server lists (V2 repository index, or our native ``/v1/models``), else ``default``.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

import httpx
import numpy as np
import torch

from reprogram import protocol
from reprogram.errors import (
    BudgetExhausted,
    ConfigError,
    OracleError,
    ProtocolError,
    ReprogramError,
)
from reprogram.oracles import ModelInfo, Oracle, WireDtype, parse_output_kind

log = logging.getLogger(__name__)

# 429 asks the client to come back (no other 4xx is retried: a retry cannot change the answer,
# and a 401/403 retried in a loop looks like key guessing); every 5xx is transient except
# "not implemented" (501) and "HTTP version not supported" (505), which a retry cannot cure.
RETRY_STATUS = frozenset({429})
NO_RETRY_5XX = frozenset({501, 505})


def _retryable(status: int) -> bool:
    return status in RETRY_STATUS or (status >= 500 and status not in NO_RETRY_5XX)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter; ``Retry-After`` wins when the server sends it."""

    max_retries: int = 8
    base: float = 0.25
    cap: float = 30.0
    # Retries of a connection that fails before the server has ever answered (nothing listens
    # there, a wrong host): a mistyped endpoint fails in about a second, not after minutes of
    # backoff. Once the server has answered, a refused connection is a restart and gets
    # ``max_retries``.
    connect_retries: int = 2

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        backoff = min(self.cap, self.base * 2.0**attempt) * rng.uniform(0.5, 1.0)
        return max(retry_after, 0.0) if retry_after is not None else backoff


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from ``Retry-After``: delay-seconds or an HTTP-date (RFC 9110 10.2.3),
    capped at 300 s; ``None`` when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is always GMT
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), 300.0)


def _listed_models(listing: Any) -> list[str]:
    """Ready model names from a V2 repository index (``[{"name", "state"}, ...]``) or from
    our ``/v1/models`` (``{"models": [name, ...]}``)."""
    if isinstance(listing, dict):
        listing = [{"name": n} for n in listing.get("models") or []]
    if not isinstance(listing, list):
        return []
    return [str(m["name"]) for m in listing if isinstance(m, dict) and m.get("name")
            and str(m.get("state") or "READY").upper() == "READY"]


class _Refused(OracleError):
    """A 4xx answer that a retry cannot change."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


_V2_DATATYPE = {"uint8": "UINT8", "fp32": "FP32"}


def _split_unquoted(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside double-quoted strings (backslash escapes honoured)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def server_timing(header: str) -> dict[str, float]:
    """Seconds per metric of a W3C ``Server-Timing`` header (``name;dur=MS;desc="...", ...``).

    The first ``dur`` of a metric counts; metrics without a valid one are left out, and a
    metric named twice adds up."""
    result: dict[str, float] = {}
    for metric in _split_unquoted(header, ","):
        name, *params = (part.strip() for part in _split_unquoted(metric, ";"))
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() != "dur":
                continue
            try:
                ms = float(value.strip().strip('"'))
            except ValueError:
                ms = math.nan
            if name and math.isfinite(ms) and ms >= 0:
                result[name] = result.get(name, 0.0) + ms / 1e3
            break  # the first dur only
    return result


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
        input_size: tuple[int, int] | None = None,
        class_names: tuple[str, ...] | None = None,
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
        if max_batch is not None and max_batch < 1:
            raise ConfigError(f"expected max_batch >= 1, got {max_batch}")
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"expected an http(s):// endpoint URL, got {url!r}")
        self.model_name = model or ""
        self.wire: WireDtype = wire
        self.binary = binary
        self.max_in_flight = max_in_flight
        self.retry = retry or RetryPolicy()
        self.retries = 0
        self._answered = False  # has the server ever answered? (see RetryPolicy)
        # client seconds per stage; server_* come from the W3C Server-Timing header where the
        # server sends one (reprogram-server does; other V2 servers may not)
        self.timings = {"encode": 0.0, "http": 0.0, "decode": 0.0, "server_decode": 0.0,
                        "server_forward": 0.0, "server_encode": 0.0}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # retries, jitter and timings are shared by the pool
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(
            timeout=timeout, headers=headers,
            limits=httpx.Limits(max_connections=max_in_flight,
                                max_keepalive_connections=max_in_flight))
        if client is not None and api_key:
            self._client.headers.update(headers)
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight) if max_in_flight > 1 else None
        try:
            self.model_name = model or self._pick_model()
            meta = self._discover()
            try:
                self._info = self._configure(meta, output_kind=output_kind,
                                             input_name=input_name, input_size=input_size,
                                             class_names=class_names, max_batch=max_batch)
            except ReprogramError:
                raise
            except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
                raise OracleError(f"unreadable metadata of model {self.model_name!r}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _configure(self, meta: dict[str, Any], *, output_kind: str | None,
                   input_name: str | None, input_size: tuple[int, int] | None,
                   class_names: tuple[str, ...] | None, max_batch: int | None) -> ModelInfo:
        """Input/output names, batch cap and :class:`ModelInfo` from V2 model metadata; the
        arguments override what the metadata says (or fill in what it does not)."""
        params: dict[str, Any] = dict(meta.get("parameters") or {})
        inputs = meta.get("inputs") or [{}]
        outputs = meta.get("outputs") or [{}]
        shape = list(inputs[0].get("shape") or [])
        size = input_size or params.get("input_size") or (
            shape[-2:] if len(shape) == 4 else None)
        if not size or len(size) != 2 or min(int(v) for v in size) < 1:
            raise OracleError(f"model {self.model_name!r} metadata gives no input size "
                              f"(inputs shape {shape}); pass input_size=(H, W)")
        self.input_name = input_name or inputs[0].get("name") or "image"
        self._check_wire(inputs[0], params)
        self.output_name = str(outputs[0].get("name") or "probs")
        kind = output_kind or params.get("output_kind") or {
            "logits": "logits", "label": "label"}.get(self.output_name, "probs")
        k = (outputs[0].get("shape") or [-1, 0])[-1]
        if parse_output_kind(str(kind))[0] == "label" or not isinstance(k, int) or k < 1:
            k = 0  # labels reveal no class count: the names must come from the metadata
        names = class_names or params.get("class_names") or [str(i) for i in range(k)]
        if not names:
            raise OracleError(f"model {self.model_name!r} metadata gives no class count; "
                              "pass class_names")
        cap = params.get("max_batch_size")
        self.max_batch = int(max_batch or cap or 256)
        return ModelInfo(
            name=str(meta.get("name", self.model_name)),
            input_size=(int(size[0]), int(size[1])),
            class_names=tuple(str(n) for n in names),
            output_kind=str(kind),
            wire_dtype=self.wire,
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
        limit = self.retry.max_retries
        for attempt in range(self.retry.max_retries + 1):
            retry_after: float | None = None
            try:
                response = self._client.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, httpx.ConnectError) and not self._answered:
                    limit = min(limit, self.retry.connect_retries)
                    why += f" (is a server running at {self.url}?)"
            else:
                self._answered, limit = True, self.retry.max_retries
                if response.status_code < 400:
                    return response
                message = protocol.error_message(response.content)
                if not _retryable(response.status_code):
                    raise _Refused(f"{method} {path} was refused with HTTP "
                                   f"{response.status_code}: {message}", response.status_code)
                why = f"HTTP {response.status_code}: {message}"
                retry_after = _retry_after(response)
            if attempt >= limit:
                raise OracleError(f"{method} {path} failed after {attempt + 1} attempts: {why}")
            with self._lock:
                wait = self.retry.delay(attempt, retry_after, self._rng)
                self.retries += 1
            log.log(logging.WARNING if self._answered else logging.INFO,
                    "%s %s: %s; retrying in %.2fs", method, path, why, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _pick_model(self) -> str:
        """The first model the server lists: V2 repository index (Triton, MLServer), then our
        ``/v1/models``; ``default`` when it lists none. Auth and other errors propagate."""
        for method, path in (("POST", "/v2/repository/index"), ("GET", "/v1/models")):
            try:
                response = self._request(method, path, json={"ready": True}
                                         if method == "POST" else None)
            except _Refused as exc:
                if exc.status in (400, 404, 405, 501):  # the server has no such listing
                    continue
                raise
            try:
                names = _listed_models(response.json())
            except ValueError:
                continue
            if names:
                if len(names) > 1:
                    log.info("server lists models %s; using %r (choose with model=)", names,
                             names[0])
                return names[0]
        return "default"

    def _check_wire(self, image: dict[str, Any], params: dict[str, Any]) -> None:
        """Fail early when the server says it does not take the wire datatype."""
        accepted = {str(image.get("datatype") or "").upper(),
                    *(str(d).upper() for d in (image.get("parameters") or {}).get(
                        "also_accepts") or []),
                    *(str(d).upper() for d in params.get("input_datatypes") or [])} - {""}
        want = _V2_DATATYPE[self.wire]
        if accepted and want not in accepted:
            other = next((w for w, d in _V2_DATATYPE.items() if d in accepted), None)
            hint = f"; use wire={other!r} (--wire {other})" if other else ""
            raise ConfigError(f"expected the endpoint to accept {want} images for wire "
                              f"{self.wire!r}, got {sorted(accepted)}{hint}")

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
        server = server_timing(response.headers.get("server-timing", ""))
        with self._lock:
            self.timings["encode"] += t1 - t0
            self.timings["http"] += t2 - t1
            self.timings["decode"] += time.perf_counter() - t2
            for name in ("decode", "forward", "encode"):
                self.timings[f"server_{name}"] += server.get(name, 0.0)
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
        scores = np.ascontiguousarray(out, dtype=np.float32)
        if not np.isfinite(scores).all():
            raise OracleError("expected finite scores from the endpoint, got NaN or Inf")
        return torch.from_numpy(scores)

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            if self.wire == "uint8":
                arr = torch.round(x.detach().cpu() * 255.0).to(torch.uint8).numpy()
            else:
                arr = x.detach().cpu().to(torch.float32).numpy()
        chunks = [arr[i : i + self.max_batch] for i in range(0, len(arr), self.max_batch)]
        if self.max_requests is not None and self.requests_used + len(chunks) > self.max_requests:
            raise BudgetExhausted(f"request cap {self.max_requests} would be exceeded: "
                                  f"{self.requests_used} used, {len(chunks)} more needed")
        if self._pool is not None and len(chunks) > 1:
            outs = list(self._pool.map(self._infer_chunk, chunks))
        else:
            outs = [self._infer_chunk(c) for c in chunks]
        scores = torch.cat([self._scores(o, len(c)) for o, c in zip(outs, chunks, strict=True)])
        return scores.to(x.device), len(chunks)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
