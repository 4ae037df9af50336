"""The inference APIs ``HttpOracle`` speaks, one :class:`Dialect` each.

- ``v2``: the Open Inference Protocol (KServe V2, Triton, MLServer, ours): binary or JSON
  tensors (:mod:`reprogram.apis.v2`);
- ``kserve-v1``: KServe V1 / TF-Serving REST, ``instances`` in, ``predictions`` out
  (:mod:`reprogram.apis.kserve_v1`);
- ``torchserve``: ``POST /predictions/{model}`` with the image file, the top 5 as
  ``{name: probability}`` back; ``labels``: image-upload APIs answering ``[{label, score}]``,
  ours at ``/v1/models/{m}/predict`` among them (:mod:`reprogram.apis.uploads`);
- ``auto`` probes the endpoint and logs one line saying what it found
  (:mod:`reprogram.apis.probe`).

A dialect reads what the endpoint says about its model (:meth:`Dialect.describe`) and sends one
request (:meth:`Dialect.infer`); :class:`EndpointOptions` fills in what the endpoint leaves out.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from reprogram.errors import ConfigError
from reprogram.http_transport import Transport, server_timing
from reprogram.oracles import parse_output_kind
from reprogram.vocabulary import NamedRow
from reprogram.wire import Wire

ProtocolName = Literal["auto", "v2", "kserve-v1", "torchserve", "labels"]
TensorFormat = Literal["auto", "json", "binary"]
Layout = Literal["NCHW", "NHWC"]

# the size an upload API's frames default to when nothing says (ImageNet classifiers' input)
UPLOAD_SIZE = (224, 224)


@dataclass(frozen=True, kw_only=True)
class EndpointOptions:
    """What the caller says about an endpoint; ``None`` means "read it from the endpoint".

    ``max_classes``: slots of the vocabulary of a names API (:mod:`reprogram.vocabulary`).
    ``top_k``: labels asked per image where the API takes a ``top_k``.
    """

    protocol: ProtocolName = "auto"
    tensor_format: TensorFormat = "auto"
    input_size: tuple[int, int] | None = None
    layout: Layout | None = None
    class_names: tuple[str, ...] | None = None
    max_batch: int | None = None
    output_kind: str | None = None
    input_name: str | None = None
    max_classes: int = 1000
    top_k: int = 5

    def __post_init__(self) -> None:
        for name, allowed in (("protocol", ProtocolName), ("tensor_format", TensorFormat)):
            if getattr(self, name) not in get_args(allowed):
                raise ConfigError(f"expected {name} in {get_args(allowed)}, got "
                                  f"{getattr(self, name)!r}")
        if self.layout is not None and self.layout not in get_args(Layout):
            raise ConfigError(f"expected layout NCHW or NHWC, got {self.layout!r}")
        if self.input_size is not None and (len(self.input_size) != 2
                                            or min(self.input_size) < 1):
            raise ConfigError(f"expected an input size H,W of positive sides, got "
                              f"{self.input_size}")
        for name in ("max_batch", "max_classes", "top_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"expected {name} >= 1, got {value}")
        if self.output_kind is not None:
            parse_output_kind(self.output_kind)
        if self.class_names is not None and len(set(self.class_names)) != len(
                self.class_names):
            raise ConfigError("expected distinct class names, got repeats")


@dataclass(frozen=True, kw_only=True)
class Described:
    """What an endpoint said about its model (``None``: it did not say)."""

    name: str
    input_size: tuple[int, int] | None = None
    layout: Layout = "NCHW"
    class_names: tuple[str, ...] | None = None
    num_classes: int | None = None
    output_kind: str | None = None
    named: bool = False  # answers class names (a vocabulary) instead of score vectors
    max_batch: int | None = None
    accepts: frozenset[str] = frozenset()  # tensor datatypes the input takes, if declared
    identity: dict[str, Any] = field(default_factory=dict)  # name, version, shapes ...
    # a zero-shot model's optional candidate-labels input (BYTES [K]) and its default template
    labels_input: str | None = None
    template: str | None = None
    # the width W of its optional CoOp context input (FP32 [M, W]); None: it takes none
    context_width: int | None = None


TIMING_KEYS = ("encode", "http", "decode", "server_decode", "server_forward", "server_encode")
Answer = np.ndarray | list[NamedRow]


class Dialect(ABC):
    """One inference API: how to learn about a model and how to ask it about images."""

    protocol: str = ""

    def __init__(self, transport: Transport, model: str, options: EndpointOptions,
                 wire: Wire) -> None:
        self.transport = transport
        self.model = model
        self.options = options
        self.wire = wire
        # client seconds per stage; server_* from the W3C Server-Timing header where the server
        # sends one (reprogram-server does; other servers may not)
        self.timings = dict.fromkeys(TIMING_KEYS, 0.0)
        self._timing_lock = threading.Lock()

    def add_times(self, encode: float, http: float, decode: float, headers: Any) -> None:
        server = server_timing(headers.get("server-timing", "")) if headers else {}
        with self._timing_lock:
            self.timings["encode"] += encode
            self.timings["http"] += http
            self.timings["decode"] += decode
            for name in ("decode", "forward", "encode"):
                self.timings[f"server_{name}"] += server.get(name, 0.0)

    @abstractmethod
    def describe(self) -> Described:
        """What the endpoint says about ``model`` (raises a one-line error if unusable)."""

    @abstractmethod
    def infer(self, images: np.ndarray) -> Answer:
        """One request: ``images`` uint8 ``[n, 3, H, W]`` (float32 in [0, 1] for the fp32
        wire) -> scores ``[n, K]`` (labels ``[n]``) or one named row per image."""

    def summary(self) -> str:
        """How requests travel, for the one line ``auto`` logs."""
        return self.protocol
