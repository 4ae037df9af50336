"""``HttpOracle``: a model behind an inference API, as an :class:`~reprogram.oracles.Oracle`.

It speaks the Open Inference Protocol (KServe V2), KServe V1 / TF-Serving, TorchServe and
image-upload label APIs (:mod:`reprogram.apis`; ``protocol="auto"`` probes and logs one line
saying what it found), discovers what the endpoint reveals (input size and layout, class names,
output kind, batch cap) with overrides for what it leaves out, sends 8-bit images by default,
splits a query into requests of at most the batch cap (one image for upload APIs) with a
bounded number in flight over one connection pool, and retries what a retry can cure
(:mod:`reprogram.http_transport`). Where neither the metadata nor the caller says whether the
scores are probabilities or logits, one probe image decides from the values (rows of
non-negative numbers summing to 1 are probabilities), never from the output's name; the probe
counts as a query. The API key travels in a header and is never logged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

import httpx
import numpy as np
import torch

from reprogram.apis import Answer, Described, Dialect, EndpointOptions, ProtocolName
from reprogram.apis.kserve_v1 import KServeV1
from reprogram.apis.probe import detect
from reprogram.apis.uploads import Labels, TorchServe
from reprogram.apis.v2 import V2, check_datatype
from reprogram.errors import (
    BudgetExhausted,
    ConfigError,
    OracleError,
    UpstreamError,
)
from reprogram.http_transport import Refused, RetryPolicy, Transport, server_timing
from reprogram.oracles import ModelInfo, Oracle
from reprogram.vocabulary import Vocabulary
from reprogram.wire import parse_wire, to_uint8

__all__ = ["HttpOracle", "RetryPolicy", "server_timing"]

log = logging.getLogger(__name__)

DIALECTS: dict[str, type[Dialect]] = {"v2": V2, "kserve-v1": KServeV1,
                                      "torchserve": TorchServe, "labels": Labels}
DEFAULT_MAX_BATCH = 256


def _listed_models(listing: Any) -> list[str]:
    """Ready model names from a V2 repository index (``[{"name", "state"}, ...]``) or from
    ``/v1/models`` (``{"models": [name, ...]}``: ours and KServe's)."""
    if isinstance(listing, dict):
        listing = [{"name": n} for n in listing.get("models") or [] if isinstance(n, str)]
    if not isinstance(listing, list):
        return []
    return [str(m["name"]) for m in listing if isinstance(m, dict) and m.get("name")
            and str(m.get("state") or "READY").upper() == "READY"]


def kind_from_values(scores: np.ndarray) -> str:
    """``probs`` when every row is non-negative and sums to 1 (within 1e-3), else ``logits``."""
    rows = scores.reshape(scores.shape[0], -1).astype(np.float64)
    if (rows >= 0).all() and np.allclose(rows.sum(1), 1.0, atol=1e-3):
        return "probs"
    return "logits"


class HttpOracle(Oracle):
    """Scores from an inference endpoint; not differentiable (use a ZO estimator)."""

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        wire: str = "uint8",
        binary: bool | None = None,
        options: EndpointOptions | None = None,
        output_kind: str | None = None,
        input_name: str | None = None,
        input_size: tuple[int, int] | None = None,
        class_names: tuple[str, ...] | None = None,
        max_batch: int | None = None,
        protocol: ProtocolName | None = None,
        max_in_flight: int = 4,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        client: httpx.Client | None = None,
        budget: int | None = None,
        max_requests: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(budget=budget, max_requests=max_requests)
        if max_in_flight < 1:
            raise ConfigError(f"expected max_in_flight >= 1, got {max_in_flight}")
        self.options = _options(options, binary=binary, output_kind=output_kind,
                                input_name=input_name, input_size=input_size,
                                class_names=class_names, max_batch=max_batch, protocol=protocol)
        self.wire = parse_wire(wire)
        self.transport = Transport(url, api_key=api_key, timeout=timeout, retry=retry,
                                   client=client, max_connections=max_in_flight, seed=seed)
        self.url = self.transport.url
        self.model_name = model or ""
        self.max_in_flight = max_in_flight
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight) if max_in_flight > 1 else None
        self.vocabulary: Vocabulary | None = None
        try:
            self._connect(model)
        except BaseException:
            self.close()
            raise

    @property
    def retries(self) -> int:
        return self.transport.retries

    @property
    def timings(self) -> dict[str, float]:
        return self.dialect.timings

    # ---------------------------------------------------------------- discovery
    def _connect(self, model: str | None) -> None:
        opts = self.options
        protocol = opts.protocol
        if protocol == "auto":
            protocol = detect(self.transport, model)
        if not model and protocol in ("v2", "kserve-v1", "labels"):
            model = self._pick_model(protocol)
        self.model_name = model or ""
        self.protocol = protocol
        self.dialect = DIALECTS[protocol](self.transport, self.model_name, opts, self.wire)
        described = self.dialect.describe()
        if not described.named:
            if self.wire.is_image:
                raise ConfigError(f"expected wire uint8 or fp32 for the {protocol} protocol "
                                  f"(png and jpeg:Q are for upload APIs), got {self.wire}")
            check_datatype(described.accepts, self.wire.tensor_dtype, str(self.wire))
        self._described = described
        self._configure(described)
        if opts.protocol == "auto":
            log.info("endpoint %s speaks %s: model %r, %dx%d %s input, %s", self.url,
                     self.dialect.summary(), self.model_name, *self._info.input_size,
                     described.layout, self._what_it_reveals())

    def _what_it_reveals(self) -> str:
        info = self._info
        if self.vocabulary is not None:
            return (f"{info.output_kind} by name (vocabulary of {self.vocabulary.capacity} "
                    "slots)")
        return f"{info.output_kind} over {info.num_classes} classes"

    def _pick_model(self, protocol: str) -> str:
        """The first model the server lists: V2 repository index (Triton, MLServer), then
        ``/v1/models`` (ours, KServe); ``default`` when it lists none."""
        routes = [("POST", "/v2/repository/index")] if protocol == "v2" else []
        for method, path in [*routes, ("GET", "/v1/models")]:
            try:
                response = self.transport.request(method, path, json={"ready": True}
                                                  if method == "POST" else None)
            except Refused as exc:
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

    def _configure(self, d: Described) -> None:
        opts = self.options
        if d.input_size is None:
            raise OracleError(f"model {self.model_name!r} metadata gives no input size; pass "
                              "input_size=(H, W) (--input-size H,W)")
        self.input_size = d.input_size
        self.max_batch = int(opts.max_batch or d.max_batch or DEFAULT_MAX_BATCH)
        kind, names = d.output_kind, d.class_names
        if d.named:
            self.vocabulary = (Vocabulary(len(names), names, fixed=True) if names
                               else Vocabulary(opts.max_classes))
            self._kind = kind or "topk-names:5"
        else:
            k = len(names) if names else d.num_classes
            if kind is None or (k is None and kind != "label"):
                kind, k = self._probe(kind)
            if not names and not k:
                raise OracleError(f"model {self.model_name!r} metadata gives no class count; "
                                  "pass class_names (--class-names FILE)")
            self._kind = kind
            names = names or tuple(f"class_{i}" for i in range(int(k or 0)))
        self._names = names
        self._template: str | None = None  # a zero-shot model's, once labels are set
        self._version = -1
        self._cached: ModelInfo | None = None

    def _probe(self, kind: str | None) -> tuple[str, int | None]:
        """One mid-grey image: the class count, and the output kind from the values."""
        if not self.can_afford(1):
            raise BudgetExhausted("no budget left for the probe image that tells the output "
                                  "kind; pass --output")
        h, w = self.input_size
        grey = np.full((1, 3, h, w), 128, np.uint8)
        out = np.asarray(self.dialect.infer(grey if self.wire.kind != "fp32"
                                            else grey.astype(np.float32) / 255.0))
        self.images_used += 1
        self.requests_used += 1
        if kind is None:
            integer = out.ndim == 1 or np.issubdtype(out.dtype, np.integer)
            kind = "label" if integer else kind_from_values(out)
            log.info("model %r does not say what its output holds: %s, read from the "
                     "values of a probe image (--output overrides)", self.model_name, kind)
        return kind, (int(out.shape[-1]) if out.ndim == 2 and kind != "label" else None)

    # ---------------------------------------------------------------- Oracle hooks
    @property
    def info(self) -> ModelInfo:
        vocab = self.vocabulary
        version = len(vocab.names) if vocab is not None else 0
        if self._cached is None or version != self._version:
            names = vocab.slot_names() if vocab is not None else self._names or ()
            self._cached, self._version = self._make_info(tuple(names)), version
        return self._cached

    @property
    def _info(self) -> ModelInfo:
        return self.info

    def _make_info(self, names: tuple[str, ...]) -> ModelInfo:
        d = self._described
        fingerprint: dict[str, Any] = {
            "endpoint": self.url, "protocol": self.protocol, **d.identity,
            "input_size": list(self.input_size), "num_classes": len(names)}
        if self.vocabulary is not None:
            fingerprint["vocabulary"] = list(self.vocabulary.names)
        elif self._described.class_names:
            fingerprint["class_names"] = list(names)
        if self._template:
            fingerprint["template"] = self._template
        fingerprint.setdefault("weights_sha256", None)
        active = len(self.vocabulary.names) if self.vocabulary is not None else None
        return ModelInfo(name=d.name, input_size=self.input_size, class_names=names,
                         output_kind=self._kind, wire_dtype=str(self.wire),
                         fingerprint=fingerprint, active_classes=active)

    @property
    def differentiable(self) -> bool:
        return False

    @property
    def zero_shot(self) -> bool:
        """A V2 model with a ``labels`` input (:mod:`server.zero_shot`): it classifies among
        the candidate labels each request sends."""
        return self.protocol == "v2" and self._described.labels_input is not None

    def use_labels(self, names: tuple[str, ...], template: str | None = None) -> None:
        if not self.zero_shot:
            super().use_labels(names, template)
        dialect: Any = self.dialect
        dialect.labels = tuple(names)
        dialect.template = template or self._described.template
        self._names = tuple(names)
        self._template = dialect.template
        self._cached = None

    def context_width(self) -> int:
        """The width of a zero-shot model's ``context`` input (``reprogram-server
        --context-input``): CoOp's context vectors learned through the API."""
        width = self._described.context_width if self.zero_shot else None
        if not width:
            from reprogram.context import CONTEXT_NEEDS_WEIGHTS

            raise ConfigError(f"model {self.model_name!r} takes no context vectors; "
                              + CONTEXT_NEEDS_WEIGHTS)
        return int(width)

    def _query_context(self, x: torch.Tensor, contexts: torch.Tensor
                       ) -> tuple[torch.Tensor, int]:
        """One request per (context, chunk of at most ``max_batch`` images)."""
        chunks = self._chunks(x)
        dialect: Any = self.dialect  # a V2 dialect: only it takes context (see context_width)
        calls = [(c, ctx) for ctx in contexts.detach().cpu().to(torch.float32).numpy()
                 for c in chunks]
        return self._send([c for c, _ in calls],
                          [functools.partial(dialect.infer, c, ctx) for c, ctx in calls],
                          x.device)

    def adopt_vocabulary(self, names: Any) -> None:
        """Give a prompt's recorded class names their slots (names APIs only)."""
        if self.vocabulary is not None and names:
            self.vocabulary.adopt(str(n) for n in names)

    def _scores(self, out: Answer, n: int) -> torch.Tensor:
        if isinstance(out, list):
            if self.vocabulary is None or len(out) != n:
                raise UpstreamError(f"expected scores for {n} images, got {len(out)} named "
                                    "rows")
            return self.vocabulary.scores(out)
        k = self.info.num_classes
        if self.info.base_kind == "label":
            labels = torch.from_numpy(out.reshape(-1).astype(np.int64))
            if labels.numel() != n or int(labels.min()) < 0 or int(labels.max()) >= k:
                raise UpstreamError(f"expected {n} labels in [0,{k}), got {list(out.shape)}")
            return torch.nn.functional.one_hot(labels, k).to(torch.float32)
        if out.shape != (n, k):
            raise UpstreamError(f"expected scores of shape [{n},{k}], got {list(out.shape)}")
        scores = np.ascontiguousarray(out, dtype=np.float32)
        if not np.isfinite(scores).all():
            raise UpstreamError("expected finite scores from the endpoint, got NaN or Inf")
        return torch.from_numpy(scores)

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        chunks = self._chunks(x)
        return self._send(chunks, [functools.partial(self._infer_chunk, c) for c in chunks],
                          x.device)

    def _chunks(self, x: torch.Tensor) -> list[np.ndarray]:
        """``x`` on the wire (FP32 or uint8), in chunks of at most ``max_batch`` images."""
        if self.wire.kind == "fp32":
            arr = x.detach().cpu().to(torch.float32).numpy()
        else:
            arr = to_uint8(x)
        return [arr[i : i + self.max_batch] for i in range(0, len(arr), self.max_batch)]

    def _send(self, chunks: list[np.ndarray], requests: list[Callable[[], Answer]],
              device: torch.device) -> tuple[torch.Tensor, int]:
        """Run ``requests`` (``chunks[i]`` is what the i-th asks about), at most
        ``max_in_flight`` at a time, within the request cap; their scores in order."""
        if self.max_requests is not None and (
                self.requests_used + len(requests) > self.max_requests):
            raise BudgetExhausted(f"request cap {self.max_requests} would be exceeded: "
                                  f"{self.requests_used} used, {len(requests)} more needed")
        if self._pool is not None and len(requests) > 1:
            outs = list(self._pool.map(lambda request: request(), requests))
        else:
            outs = [request() for request in requests]
        scores = torch.cat([self._scores(o, len(c)) for o, c in zip(outs, chunks, strict=True)])
        return scores.to(device), len(requests)

    def _infer_chunk(self, images: np.ndarray) -> Answer:
        """One request for one chunk of at most ``max_batch`` images."""
        return self.dialect.infer(images)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _options(options: EndpointOptions | None, *, binary: bool | None, **given: Any
             ) -> EndpointOptions:
    """``options`` with the keyword overrides that were given (not None) applied."""
    fields = {k: v for k, v in given.items() if v is not None}
    if binary is not None:
        fields["tensor_format"] = "binary" if binary else "json"
    return dataclasses.replace(options or EndpointOptions(), **fields)
