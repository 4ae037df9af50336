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
kept, so a client that sends the same labels with every request pays for them once.

Optional, off by default (``reprogram-server --context-input``): a ``context`` input (FP32
``[M, W]``, or ``[K, M, W]`` with one set per label) of prompt vectors in the text encoder's
token-embedding space, the interface BPT-VLM and ZIP assume: each label is then read as CoOp's
prompt ``[V]_1 .. [V]_M label.`` (:func:`reprogram.vlm.context_text_features`) instead of the
template, so a client can learn the text prompt through the API alone. It reveals how the
model reads arbitrary embeddings (more than class names do), which is why it is opt-in; the
metadata lists it, with its width ``W`` and :data:`MAX_CONTEXT`, only when it is on.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from reprogram.errors import ConfigError, ProtocolError
from reprogram.protocol import MetadataTensor, ModelMetadata
from reprogram.vlm import DEFAULT_TEMPLATE, check_labels, context_text_features, is_zero_shot
from reprogram.zoo.clip import MAX_LABEL_CHARS

LABELS = "labels"
CONTEXT = "context"
MAX_LABELS = 256  # candidate labels per request
MAX_CONTEXT = 32  # context vectors per prompt (with the longest label, the text still fits)
MAX_CONTEXT_VALUE = 1e4  # |value| of a context entry (token embeddings are O(1))
CACHE = 64  # label lists whose text features are kept


@dataclass(frozen=True)
class ZeroShotQuery:
    """What a request asks of a zero-shot model beyond the images: the candidate labels, the
    template (default the model's) or CoOp context vectors in its place."""

    labels: tuple[str, ...]
    template: str | None = None
    context: torch.Tensor | None = None


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


def parse_context(raw: np.ndarray, width: int, labels: int) -> torch.Tensor:
    """The context vectors of a ``context`` FP32 tensor, ``[M, W]`` or ``[K, M, W]``
    (400 with the reason)."""
    shape = list(raw.shape)
    if raw.dtype != np.float32:
        raise ProtocolError(f"expected FP32 values in {CONTEXT!r}, got {raw.dtype}")
    if raw.ndim not in (2, 3) or shape[-1] != width or (raw.ndim == 3 and shape[0] != labels):
        raise ProtocolError(f"expected input {CONTEXT!r} of shape [M, {width}] or [{labels}, M,"
                            f" {width}] (one set per label), got {shape}")
    if not 1 <= shape[-2] <= MAX_CONTEXT:
        raise ProtocolError(f"expected 1 to {MAX_CONTEXT} context vectors, got {shape[-2]}")
    if not np.isfinite(raw).all() or float(np.abs(raw).max()) > MAX_CONTEXT_VALUE:
        raise ProtocolError(f"expected finite values of magnitude at most"
                            f" {MAX_CONTEXT_VALUE:g} in {CONTEXT!r}")
    return torch.from_numpy(np.ascontiguousarray(raw))


def parse_query(servable: Any, tensors: dict[str, np.ndarray], params: dict[str, Any] | None,
                image_input: str) -> ZeroShotQuery | None:
    """The zero-shot part of a V2 request (``labels``, ``template``, ``context``), or None
    when it asks for the model's own classes; 400 for inputs the model does not take."""
    allowed = [image_input]
    if serves_labels(servable):
        allowed.append(LABELS)
        if getattr(servable, "context_width", 0):
            allowed.append(CONTEXT)
    names = list(tensors)
    if image_input not in names or any(n not in allowed for n in names):
        takes = (f"{image_input!r} and optionally {' and '.join(map(repr, allowed[1:]))}"
                 if len(allowed) > 1 else f"one input named {image_input!r}")
        hint = ("; the 'context' input is off (start the server with --context-input)"
                if CONTEXT in names and serves_labels(servable) else "")
        raise ProtocolError(f"expected {takes}, got {names}{hint}")
    template = parse_template(params)
    if LABELS not in tensors and CONTEXT not in tensors:
        if template is not None:
            raise ProtocolError(f"expected a {LABELS!r} input with the 'template' parameter")
        return None
    labels = (parse_labels(tensors[LABELS]) if LABELS in tensors
              else tuple(servable.class_names))
    if CONTEXT not in tensors:
        return ZeroShotQuery(labels, template)
    if template is not None:
        raise ProtocolError(f"expected no 'template' parameter with a {CONTEXT!r} input (the"
                            " context vectors take the template's place)")
    return ZeroShotQuery(labels, None, parse_context(tensors[CONTEXT], servable.context_width,
                                                     len(labels)))


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

    def __init__(self, module: torch.nn.Module, *, context_input: bool = False) -> None:
        if not is_zero_shot(module):
            raise ConfigError("expected a zero-shot (vision-language) model")
        self.module: Any = module
        self.context_width = int(cast(Any, module).context_width) if context_input else 0
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

    def features(self, query: ZeroShotQuery) -> torch.Tensor:
        """The text features ``[K, D]`` a query's labels (and template or context) give."""
        if query.context is None:
            return self.text_features(query.labels, query.template)
        try:
            with torch.inference_mode():
                return context_text_features(self.module.clip, query.labels, query.context)
        except ConfigError as exc:  # a label too long for the context's slots
            raise ProtocolError(f"{exc} (label and {query.context.shape[-2]} context"
                                " vectors)") from None

    def logits(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.module.clip.logits(self.module.image_features(x), features)

    def parameters(self) -> dict[str, Any]:
        """What the model metadata's ``parameters`` say about the labels (and context) input."""
        said: dict[str, Any] = {"input": LABELS, "template": self.template,
                                "max_labels": MAX_LABELS}
        if self.context_width:
            said["context"] = {"input": CONTEXT, "width": self.context_width,
                               "max_vectors": MAX_CONTEXT}
        return {"zero_shot": said}

    def metadata(self, meta: ModelMetadata) -> ModelMetadata:
        """``meta`` with the optional ``labels`` (and ``context``) inputs, and ``[-1, -1]``
        scores (K labels)."""
        extra = [MetadataTensor(name=LABELS, datatype="BYTES", shape=[-1],
                                parameters={"optional": True})]
        if self.context_width:
            extra.append(MetadataTensor(name=CONTEXT, datatype="FP32",
                                        shape=[-1, self.context_width],
                                        parameters={"optional": True}))
        outputs = [o.model_copy(update={"shape": [-1, -1]}) for o in meta.outputs]
        return meta.model_copy(update={"inputs": [*meta.inputs, *extra], "outputs": outputs})


def scorer_of(module: torch.nn.Module, *, context_input: bool = False) -> LabelScorer | None:
    """The label scorer of a vision-language model (with the ``context`` input when
    ``context_input``); None for a classifier."""
    if not is_zero_shot(module):
        return None
    return LabelScorer(module, context_input=context_input)
