"""Oracles: the only path from the optimizer to a model.

Every image passed to :meth:`Oracle.query` counts as one query; the base class validates
inputs, enforces the image and request budgets and keeps the counts, and subclasses fill one
hook, :meth:`Oracle._query`. :class:`LocalOracle` wraps an in-process model and can emulate a
real API (8-bit wire, top-k or label-only outputs); ``HttpOracle`` talks to a server.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from reprogram.errors import BudgetExhausted, ConfigError, DataError
from reprogram.local_internals import LocalInternals
from reprogram.pixels import clamp01
from reprogram.zoo.registry import SourceModel

if TYPE_CHECKING:
    from reprogram.tokens import ViTAdapter

# why a token prompt cannot be learned or applied through an API
TOKENS_NEED_WEIGHTS = (
    "expected a local vision transformer for token prompts (vpt-shallow, vpt-deep), got an "
    "endpoint: the tokens enter the model's layers, which an API does not expose; fit them on "
    "the weights (reprogram fit --model MODEL) or on the model owner's server, or learn a pixel "
    "program through the API (--program full, the default)")

log = logging.getLogger(__name__)

BaseKind = Literal["probs", "logits", "topk", "label"]
WireDtype = Literal["uint8", "fp32"]
DEFAULT_MAX_CLASSES = 1000  # vocabulary slots of a names API (see reprogram.vocabulary)


def parse_output_kind(kind: str) -> tuple[BaseKind, int]:
    """``probs`` | ``logits`` | ``topk:K`` | ``topk-names:K`` | ``label`` -> (base kind, k).

    ``topk-names:K`` is the top K probabilities by class *name*, as label APIs answer: the
    client learns the names as they appear (:mod:`reprogram.vocabulary`)."""
    if kind in ("probs", "logits", "label"):
        return kind, 0  # type: ignore[return-value]
    if kind.startswith(("topk:", "topk-names:")):
        try:
            k = int(kind.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "topk", k
    raise ConfigError(f"expected output kind probs, logits, topk:K, topk-names:K (K >= 1) or "
                      f"label, got {kind!r}")


def by_name(kind: str) -> bool:
    """Whether the output kind reveals class names (``topk-names:K``)."""
    return kind.startswith("topk-names:")


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What an oracle reveals about its model."""

    name: str
    input_size: tuple[int, int]
    class_names: tuple[str, ...]
    output_kind: str = "probs"
    wire_dtype: str = "uint8"  # uint8 | fp32 | png | jpeg:Q (reprogram.wire)
    fingerprint: dict[str, object] = field(default_factory=dict)
    # classes that exist so far, the first ones (None: all): a names API's vocabulary fills
    # its slots as names appear (reprogram.vocabulary)
    active_classes: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def base_kind(self) -> BaseKind:
        return parse_output_kind(self.output_kind)[0]


def reduce_scores(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Turn logits into what an API of the given output kind reveals.

    ``topk:K`` keeps the K largest probabilities and sets the others to 0; ``label`` gives
    one-hot rows of the argmax.
    """
    base, k = parse_output_kind(kind)
    if base == "logits":
        return logits
    probs = F.softmax(logits, dim=-1)
    if base == "probs":
        return probs
    if base == "topk":
        k = min(k, probs.shape[-1])
        top = probs.topk(k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)


def quantize_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid (what a uint8 wire delivers); straight-through gradient."""
    q = torch.round(x * 255.0) / 255.0
    return x + (q - x).detach()


class Oracle(ABC):
    """Scores of a frozen source model for images in [0, 1], with query accounting.

    ``budget`` caps the number of images (None: unlimited), ``max_requests`` the number of
    calls. A query that would exceed either raises :class:`BudgetExhausted` before anything
    is spent, so a fit can stop cleanly with what it learned.
    """

    def __init__(self, *, budget: int | None = None, max_requests: int | None = None) -> None:
        if budget is not None and budget < 0:
            raise ConfigError(f"expected a non-negative image budget, got {budget}")
        if max_requests is not None and max_requests < 0:
            raise ConfigError(f"expected a non-negative request cap, got {max_requests}")
        self.budget = budget
        self.max_requests = max_requests
        self.images_used = 0
        self.requests_used = 0
        self.query_seconds = 0.0  # wall time spent in queries (not saved in checkpoints)

    @property
    @abstractmethod
    def info(self) -> ModelInfo:
        """Model name, input size, class names, output kind, wire datatype."""

    @property
    @abstractmethod
    def differentiable(self) -> bool:
        """Whether gradients flow from the scores back to the input images."""

    @property
    def device(self) -> torch.device:
        """Where the oracle wants its input images and returns its scores."""
        return torch.device("cpu")

    @abstractmethod
    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Scores ``[N, K_s]`` for validated images, and the number of requests it took."""

    def remaining(self) -> int | None:
        return None if self.budget is None else max(self.budget - self.images_used, 0)

    def can_afford(self, n_images: int) -> bool:
        return self.budget is None or self.images_used + n_images <= self.budget

    def _admit(self, x: torch.Tensor, n: int) -> None:
        """Check images ``x`` and that ``n`` more image evaluations are affordable."""
        h, w = self.info.input_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (h, w):
            raise DataError(f"expected images [N,3,{h},{w}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise DataError(f"expected float images in [0,1], got {x.dtype}")
        if not self.can_afford(n):
            raise BudgetExhausted(f"image budget {self.budget} would be exceeded: "
                                  f"{self.images_used} used, {n} more asked")
        if self.max_requests is not None and self.requests_used >= self.max_requests:
            raise BudgetExhausted(f"request cap {self.max_requests} reached")

    def _timed(self, n: int, run: Callable[[], tuple[torch.Tensor, int]]) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            scores, requests = run()
        finally:
            self.query_seconds += time.perf_counter() - t0
        self.images_used += n
        self.requests_used += requests
        return scores

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Scores over the source classes for ``x`` float ``[N, 3, H, W]`` in [0, 1]."""
        n = int(x.shape[0]) if x.ndim else 0
        self._admit(x, n)
        if n == 0:
            return x.new_zeros((0, self.info.num_classes))
        return self._timed(n, lambda: self._query(clamp01(x)))

    def token_adapter(self) -> ViTAdapter:
        """How to run the model with prompt tokens (:mod:`reprogram.tokens`)."""
        raise ConfigError(TOKENS_NEED_WEIGHTS)

    def query_tokens(self, x: torch.Tensor, tokens: torch.Tensor,
                     features: bool = False) -> torch.Tensor:
        """Scores ``[P * N, K_s]`` (or the class token's features ``[P * N, D]``) for images
        ``x`` ``[N, 3, H, W]`` under each of ``P`` token prompts ``tokens [P, ...]``; every
        (prompt, image) pair counts as one image evaluation."""
        adapter = self.token_adapter()
        n = int(x.shape[0]) * int(tokens.shape[0]) if x.ndim else 0
        self._admit(x, n)
        return self._timed(n, lambda: self._query_tokens(adapter, clamp01(x), tokens, features))

    def _query_tokens(self, adapter: ViTAdapter, x: torch.Tensor, tokens: torch.Tensor,
                      features: bool) -> tuple[torch.Tensor, int]:
        raise ConfigError(TOKENS_NEED_WEIGHTS)

    def adopt_vocabulary(self, names: object) -> None:
        """Give the class names a prompt recorded (``source.vocabulary``) the slots they had
        when it was fitted; a no-op for oracles whose classes are fixed."""
        return None

    def context_width(self) -> int:
        """The token width of a zero-shot model's text encoder (CoOp's context vectors)."""
        from reprogram.context import CONTEXT_NEEDS_WEIGHTS

        raise ConfigError(CONTEXT_NEEDS_WEIGHTS)

    def query_context(self, x: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """Scores ``[P * N, K]`` over the classes for images ``x`` ``[N, 3, H, W]`` under each
        of ``P`` CoOp contexts ``contexts [P, ...]``; every (context, image) pair counts as one
        image evaluation."""
        self.context_width()
        n = int(x.shape[0]) * int(contexts.shape[0]) if x.ndim else 0
        self._admit(x, n)
        return self._timed(n, lambda: self._query_context(clamp01(x), contexts))

    def _query_context(self, x: torch.Tensor, contexts: torch.Tensor
                       ) -> tuple[torch.Tensor, int]:
        from reprogram.context import CONTEXT_NEEDS_WEIGHTS

        raise ConfigError(CONTEXT_NEEDS_WEIGHTS)

    @property
    def zero_shot(self) -> bool:
        """Whether the model classifies among class names it is given (a vision-language
        model, :mod:`reprogram.vlm`): its classes are then the target task's."""
        return False

    def use_labels(self, names: tuple[str, ...], template: str | None = None) -> None:
        """Classify among ``names`` (with ``template``, default the model's) from now on;
        only a zero-shot oracle can."""
        raise ConfigError(f"expected a zero-shot (vision-language) model to take class names,"
                          f" got {self.info.name!r} with fixed classes")

    def counts(self) -> dict[str, int]:
        return {"images": self.images_used, "requests": self.requests_used}

    def load_counts(self, counts: dict[str, int]) -> None:
        self.images_used = int(counts["images"])
        self.requests_used = int(counts["requests"])


class LocalOracle(LocalInternals, Oracle):
    """An in-process model as an oracle.

    ``quantize`` rounds every queried image to 8 bits as a uint8 wire would (with a
    straight-through gradient); ``wire="jpeg:Q"`` sends it through a JPEG encoder and decoder
    at quality Q as a JPEG API would (also straight-through); ``output`` reduces the scores to
    what an API reveals (``probs``, ``logits``, ``topk:K``, ``topk-names:K``, ``label``);
    ``topk-names:K`` hides even the class order: scores land in the slots of a
    :class:`~reprogram.vocabulary.Vocabulary` of ``max_classes`` as names appear, exactly as
    ``HttpOracle`` does for a label API. Autograd is available for probs and logits.
    Forward passes take at most ``max_batch`` images, the server's default: on a 2-core CPU a
    fit's batches of 352 (32 images x 11 candidates) took about 200 us per image in chunks of
    256 and 96 against 270 us whole (same outputs, bit for bit).
    """

    def __init__(
        self,
        model: SourceModel,
        *,
        output: str = "probs",
        quantize: bool = True,
        wire: str | None = None,
        max_batch: int = 256,
        max_classes: int = DEFAULT_MAX_CLASSES,
        budget: int | None = None,
        max_requests: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from reprogram.vocabulary import Vocabulary
        from reprogram.wire import parse_wire

        super().__init__(budget=budget, max_requests=max_requests)
        self._device = torch.device(device)
        parse_output_kind(output)
        if max_batch < 1:
            raise ConfigError(f"expected max_batch >= 1, got {max_batch}")
        self.model = SourceModel(model.module.to(self._device), model.meta,
                                 model.differentiable)
        self.wire = parse_wire(wire or ("uint8" if quantize else "fp32"))
        if self.wire.kind == "png":
            self.wire = parse_wire("uint8")  # lossless: the same pixels
        self.quantize = self.wire.kind != "fp32"
        self.max_batch = min(max_batch, model.meta.max_batch or max_batch)  # the model's cap
        self.vocabulary = Vocabulary(max_classes) if by_name(output) else None
        self._slot_of = torch.full((model.meta.num_classes,), -1, dtype=torch.long)
        self._output = output
        self._fingerprint = model.meta.fingerprint()
        self._cached: tuple[int, ModelInfo] | None = None
        self._adapter: ViTAdapter | None = None

    @property
    def info(self) -> ModelInfo:
        seen = len(self.vocabulary.names) if self.vocabulary is not None else 0
        if self._cached is None or self._cached[0] != seen:
            meta = self.model.meta
            names = (self.vocabulary.slot_names() if self.vocabulary is not None
                     else meta.class_names)
            fingerprint = dict(self._fingerprint)
            if self.vocabulary is not None:
                fingerprint.update(num_classes=len(names),
                                   vocabulary=list(self.vocabulary.names))
            self._cached = (seen, ModelInfo(
                name=meta.name, input_size=meta.input_size, class_names=names,
                output_kind=self._output, wire_dtype=str(self.wire), fingerprint=fingerprint,
                active_classes=seen if self.vocabulary is not None else None))
        return self._cached[1]

    @property
    def differentiable(self) -> bool:
        """Scores with autograd: a torch model (not ONNX) revealing probs or logits, by
        class index (not by name)."""
        return (self.model.differentiable and self.vocabulary is None
                and self.info.base_kind in ("probs", "logits"))

    @property
    def device(self) -> torch.device:
        return self._device

    def adopt_vocabulary(self, names: object) -> None:
        """Give a prompt's recorded class names their slots (``topk-names:K`` only)."""
        if self.vocabulary is not None and isinstance(names, list | tuple) and names:
            self.vocabulary.adopt(str(n) for n in names)

    def _named(self, logits: torch.Tensor) -> torch.Tensor:
        """Top-k probabilities in vocabulary slots, slots given as the names first appear."""
        assert self.vocabulary is not None
        probs = F.softmax(logits, dim=-1)
        top = probs.topk(min(parse_output_kind(self._output)[1], probs.shape[-1]), dim=-1)
        names = self.model.meta.class_names
        for c in torch.unique(top.indices).tolist():
            if self._slot_of[c] < 0:
                slot = self.vocabulary.slot(names[c])
                self._slot_of[c] = -2 if slot is None else slot
        slots = self._slot_of.to(probs.device)[top.indices]
        keep = slots >= 0
        out = probs.new_zeros(probs.shape[0], self.vocabulary.capacity)
        rows = torch.arange(probs.shape[0], device=probs.device)[:, None].expand_as(slots)
        out[rows[keep], slots[keep]] = top.values[keep]
        return out.detach()

    def _wire(self, x: torch.Tensor) -> torch.Tensor:
        """What the wire delivers: 8 bits, or a JPEG round trip (straight-through)."""
        if self.quantize:
            x = quantize_uint8(x)
        if self.wire.kind == "jpeg":
            from reprogram.wire import jpeg_roundtrip

            x = x + (jpeg_roundtrip(x, self.wire.quality) - x).detach()
        return x

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        x = self._wire(x.to(self._device))
        chunks = [self.model.module(x[i : i + self.max_batch])
                  for i in range(0, x.shape[0], self.max_batch)]
        logits = torch.cat(chunks)
        if self.vocabulary is not None:
            return self._named(logits), 1
        return reduce_scores(logits, self._output), 1
