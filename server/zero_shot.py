"""Zero-shot classification on the server: an image and candidate labels in, scores out.

A served vision-language model (``reprogram-server --model shapes-clip``) answers V2 requests
with two inputs: ``image`` (UINT8 ``[N, 3, H, W]`` or FP32, as every model) and ``labels``
(BYTES ``[K]``, the candidate class names, UTF-8), with an optional request parameter
``template`` (one ``{}`` for the name; default the model's, ``"a photo of a {}."``); ``probs``
is then ``[N, K]`` over those labels, in their order, and ``classification`` names them.
Without ``labels`` it classifies among its own class names, as any model. ``/v1/models/{m}/
predict`` takes the labels as repeated form fields ``labels`` (and ``template``).

Labels are checked before anything runs: at least one, at most :data:`MAX_LABELS`, each
non-empty, valid UTF-8, at most :data:`~reprogram.zoo.clip.MAX_LABEL_CHARS` characters, no
duplicates (a 400 saying which). The text features of the last :data:`CACHE` label lists are
kept, so a client that sends the same labels with every request pays for them once. The
``context`` input (prompt vectors, as BPT-VLM and ZIP assume) is not offered.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from reprogram.errors import ConfigError, ProtocolError
from reprogram.protocol import MetadataTensor, ModelMetadata
from reprogram.vlm import DEFAULT_TEMPLATE, check_labels, is_zero_shot
from reprogram.zoo.clip import MAX_LABEL_CHARS

LABELS = "labels"
MAX_LABELS = 256  # candidate labels per request
CACHE = 64  # label lists whose text features are kept


def serves_labels(servable: Any) -> bool:
    return bool(getattr(servable, "zero_shot", False))


def parse_labels(raw: np.ndarray) -> tuple[str, ...]:
    """The candidate labels of a ``labels`` BYTES tensor (400 with the reason)."""
    if raw.ndim != 1:
        raise ProtocolError(f"expected input {LABELS!r} of shape [K], got {list(raw.shape)}")
    names: list[str] = []
    for i, item in enumerate(raw.tolist()):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(f"expected UTF-8 text in {LABELS!r}, got invalid bytes in"
                                    f" label {i}") from None
        if not isinstance(item, str):
            raise ProtocolError(f"expected strings in {LABELS!r}, got {type(item).__name__}")
        names.append(item)
    return check_request_labels(names)


def check_request_labels(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if len(names) > MAX_LABELS:
        raise ProtocolError(f"expected at most {MAX_LABELS} labels per request, got"
                            f" {len(names)}")
    long = [i for i, n in enumerate(names) if len(n) > MAX_LABEL_CHARS]
    if long:
        raise ProtocolError(f"expected labels of at most {MAX_LABEL_CHARS} characters, got"
                            f" {len(names[long[0]])} in label {long[0]}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ProtocolError(f"expected distinct labels, got {twice[:5]} more than once")
    try:
        check_labels(tuple(names))
    except ConfigError as exc:
        raise ProtocolError(f"{exc} in {LABELS!r}") from None
    return tuple(names)


def parse_template(params: dict[str, Any] | None) -> str | None:
    value = (params or {}).get("template")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"expected a string for parameter 'template', got {value!r}")
    try:
        check_labels(("x",), value)
    except ConfigError as exc:
        raise ProtocolError(str(exc)) from None
    if len(value) > 2 * MAX_LABEL_CHARS:
        raise ProtocolError(f"expected a template of at most {2 * MAX_LABEL_CHARS} characters,"
                            f" got {len(value)}")
    return value


class LabelScorer:
    """Text features per label list (LRU), and logits of image batches against them."""

    def __init__(self, module: torch.nn.Module) -> None:
        if not is_zero_shot(module):
            raise ConfigError("expected a zero-shot (vision-language) model")
        self.module: Any = module
        self._features: OrderedDict[tuple[str, tuple[str, ...]], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def template(self) -> str:
        return str(getattr(self.module, "template", DEFAULT_TEMPLATE))

    def text_features(self, labels: tuple[str, ...], template: str | None) -> torch.Tensor:
        key = (template or self.template, labels)
        with self._lock:
            cached = self._features.get(key)
            if cached is not None:
                self._features.move_to_end(key)
                return cached
        with torch.inference_mode():
            feats = self.module.clip.encode_names(labels, key[0])
        with self._lock:
            self._features[key] = feats
            while len(self._features) > CACHE:
                self._features.popitem(last=False)
        return feats

    def logits(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.module.clip.logits(self.module.image_features(x), features)

    def parameters(self) -> dict[str, Any]:
        """What the model metadata's ``parameters`` say about the labels input."""
        return {"zero_shot": {"input": LABELS, "template": self.template,
                              "max_labels": MAX_LABELS}}

    def metadata(self, meta: ModelMetadata) -> ModelMetadata:
        """``meta`` with the optional ``labels`` input, and ``[-1, -1]`` scores (K labels)."""
        labels = MetadataTensor(name=LABELS, datatype="BYTES", shape=[-1],
                                parameters={"optional": True})
        outputs = [o.model_copy(update={"shape": [-1, -1]}) for o in meta.outputs]
        return meta.model_copy(update={"inputs": [*meta.inputs, labels], "outputs": outputs})


def scorer_of(module: torch.nn.Module) -> LabelScorer | None:
    """The label scorer of a vision-language model; None for a classifier."""
    return LabelScorer(module) if is_zero_shot(module) else None
