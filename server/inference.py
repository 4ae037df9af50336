"""The model runner and the registry of servable models.

:class:`ModelRunner` turns uint8 ``[N,3,H,W]`` (0..255) or float32 (0..1) image batches into
the scores the operator chose to reveal, under ``torch.inference_mode()``, in forward passes
of at most ``max_batch`` images, one request at a time (a lock keeps concurrent requests from
interleaving, so results do not depend on load; a request waits for it, and runs its chunks,
only until its deadline, see :mod:`server.budget`). :class:`Registry` maps served names to
objects of the :class:`Servable` protocol; later issues register prompt artifacts there too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from reprogram.errors import ProtocolError
from reprogram.protocol import MetadataTensor, ModelMetadata
from reprogram.zoo.registry import SourceModel
from server.budget import check_deadline, holding
from server.settings import OutputKind

if TYPE_CHECKING:
    from server.zero_shot import ZeroShotQuery

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
INPUT_DATATYPES = ("UINT8", "FP32")
MODEL_VERSION = "1"


class HTTPStatusError(ProtocolError):
    """A protocol error with a specific HTTP status (the app answers 400 for the others)."""

    status_code = 400


class NotFound(HTTPStatusError):
    """Unknown model or version (404)."""

    status_code = 404


class TooLarge(HTTPStatusError):
    """A request over a size cap: body bytes, images per request, image pixels (413)."""

    status_code = 413


class UnsupportedMedia(HTTPStatusError):
    """An upload that is not a PNG or JPEG image (415)."""

    status_code = 415


class NotReady(HTTPStatusError):
    """The model is still loading or failed to load (503)."""

    status_code = 503


class Servable(Protocol):
    """What the routes need from a hosted model (the source model now, prompts later)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def input_size(self) -> tuple[int, int]: ...

    @property
    def class_names(self) -> tuple[str, ...]: ...

    @property
    def output(self) -> OutputKind: ...

    @property
    def max_images(self) -> int: ...

    def metadata(self) -> ModelMetadata: ...

    def info(self) -> dict[str, Any]: ...

    def infer(self, images: np.ndarray) -> np.ndarray: ...


def check_images(images: np.ndarray, input_size: tuple[int, int], max_images: int) -> None:
    """Validate an image batch: UINT8 or finite FP32 in [0, 1], shape ``[N>=1, 3, H, W]``."""
    h, w = input_size
    expected = f"[N, 3, {h}, {w}]"
    if images.dtype not in (np.uint8, np.float32):
        raise ProtocolError(
            f"expected input {INPUT_NAME!r} of datatype UINT8 (0..255) or FP32 (0..1), got"
            f" {images.dtype}"
        )
    if images.ndim != 4:
        raise ProtocolError(
            f"expected input {INPUT_NAME!r} of rank 4 {expected}, got shape {list(images.shape)}"
        )
    if images.shape[1] != 3:
        raise ProtocolError(
            f"expected 3 channels {expected}, got {images.shape[1]} (shape"
            f" {list(images.shape)}); send RGB images channel-first"
        )
    if tuple(images.shape[2:]) != (h, w):
        raise ProtocolError(
            f"expected spatial size {h}x{w} {expected}, got {images.shape[2]}x{images.shape[3]};"
            " resize the images first (the /v1 routes resize uploads for you)"
        )
    if images.shape[0] == 0:
        raise ProtocolError("expected at least one image, got an empty batch")
    if images.shape[0] > max_images:
        raise TooLarge(
            f"expected at most {max_images} images per request, got {images.shape[0]};"
            " split the batch"
        )
    if images.dtype == np.float32:
        if not np.isfinite(images).all():
            raise ProtocolError("expected finite FP32 pixels, got NaN or Inf")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ProtocolError(f"expected FP32 pixels in [0, 1], got values in [{lo}, {hi}]")


def to_float(images: np.ndarray) -> torch.Tensor:
    """The model input: uint8 0..255 -> float32 /255; float32 passes through."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x


def reveal(logits: torch.Tensor, output: OutputKind) -> torch.Tensor:
    """Apply the operator's output kind to logits ``[N, K]``."""
    if output.kind == "logits":
        return logits
    if output.kind == "label":
        return logits.argmax(dim=1)
    probs = torch.softmax(logits, dim=1)
    if output.kind == "topk" and output.k is not None and output.k < probs.shape[1]:
        top = torch.topk(probs, output.k, dim=1).indices
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top, True)
        probs = probs.masked_fill(~mask, 0.0)
    return probs


def pixel_params() -> dict[str, Any]:
    """The input datatypes and pixel ranges every servable accepts (metadata parameters)."""
    return {"input_datatypes": list(INPUT_DATATYPES),
            "pixel_range": {"UINT8": [0, 255], "FP32": [0.0, 1.0]}}


def v2_metadata(*, name: str, platform: str, input_hw: tuple[int, int], output: OutputKind,
                num_classes: int, parameters: dict[str, Any]) -> ModelMetadata:
    """V2 model metadata of a servable: input ``image`` UINT8 ``[-1, 3, H, W]`` (also FP32;
    ``-1`` for any size) and one output, ``[-1]`` labels or ``[-1, K]`` scores."""
    h, w = input_hw
    out_shape = [-1] if output.kind == "label" else [-1, num_classes]
    return ModelMetadata(
        name=name,
        versions=[MODEL_VERSION],
        platform=platform,
        inputs=[
            MetadataTensor(
                name=INPUT_NAME,
                datatype="UINT8",
                shape=[-1, 3, h, w],
                parameters={"also_accepts": ["FP32"]},
            )
        ],
        outputs=[
            MetadataTensor(name=output.output_name, datatype=output.datatype, shape=out_shape)
        ],
        parameters=parameters,
    )


class ModelRunner:
    """A frozen :class:`SourceModel` served under a name, revealing ``output``."""

    def __init__(
        self,
        model: SourceModel,
        *,
        output: OutputKind,
        max_batch: int = 256,
        max_images: int = 4096,
        name: str | None = None,
        context_input: bool = False,
    ) -> None:
        self._model = model
        self._output = output
        self._max_batch = max_batch
        self._max_images = max_images
        self._name = name or model.meta.name
        self._lock = threading.Lock()
        from server.zero_shot import scorer_of

        # a vision-language model's candidate labels (and context vectors, when allowed)
        self._scorer = scorer_of(model.module, context_input=context_input)
        k = len(model.meta.class_names)
        if output.k is not None and output.k > k:
            logger.warning("output topk:%d exceeds the %d classes; revealing all", output.k, k)

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return MODEL_VERSION

    @property
    def input_size(self) -> tuple[int, int]:
        return self._model.meta.input_size

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._model.meta.class_names

    @property
    def output(self) -> OutputKind:
        return self._output

    @property
    def max_images(self) -> int:
        return self._max_images

    @property
    def resize_policy(self) -> tuple[str, int | None]:
        """How ``/v1`` uploads are fitted to the input size (the model config's ``resize``)."""
        return self._model.meta.resize, self._model.meta.resize_size

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Check a batch, run it and reveal: float32 ``[N, K]`` scores or int64 labels ``[N]``."""
        return self._run(images, self._model.module)

    @property
    def zero_shot(self) -> bool:
        """Whether requests may name the classes (a vision-language model,
        :mod:`server.zero_shot`)."""
        return self._scorer is not None

    @property
    def context_width(self) -> int:
        """The width of the ``context`` input's vectors; 0 when the model takes none."""
        return self._scorer.context_width if self._scorer is not None else 0

    def infer_labels(self, images: np.ndarray, query: ZeroShotQuery) -> np.ndarray:
        """:meth:`infer` over a query's candidate labels (a zero-shot model only)."""
        assert self._scorer is not None
        scorer = self._scorer
        features = scorer.features(query)
        return self._run(images, lambda chunk: scorer.logits(chunk, features))

    def _run(self, images: np.ndarray, forward: Any) -> np.ndarray:
        check_images(images, self.input_size, self._max_images)
        x = to_float(images)
        with holding(self._lock, "the model"), torch.inference_mode():
            parts: list[torch.Tensor] = []
            for start, chunk in zip(range(0, len(x), self._max_batch),
                                    torch.split(x, self._max_batch), strict=True):
                check_deadline(f"after {start} of {len(x)} images")
                parts.append(forward(chunk))
            logits = torch.cat(parts).to(torch.float32)
        out = reveal(logits, self._output)
        return out.numpy().astype(np.int64 if self._output.kind == "label" else np.float32)

    def _parameters(self) -> dict[str, Any]:
        meta = self._model.meta
        return {
            "output_kind": str(self._output),
            "class_names": list(meta.class_names),
            "input_size": list(meta.input_size),
            **pixel_params(),
            "mean": list(meta.mean),
            "std": list(meta.std),
            "architecture": meta.architecture,
            "weights_sha256": meta.weights_sha256,
            "max_batch_size": self._max_images,
            "resize": meta.resize,
            **(self._scorer.parameters() if self._scorer is not None else {}),
        }

    def metadata(self) -> ModelMetadata:
        """V2 model metadata, with everything a client needs in ``parameters`` (a zero-shot
        model lists its optional ``labels`` input too)."""
        meta = v2_metadata(name=self._name, platform=self._model.meta.platform,
                           input_hw=self.input_size,
                           output=self._output, num_classes=len(self.class_names),
                           parameters=self._parameters())
        return meta if self._scorer is None else self._scorer.metadata(meta)

    def info(self) -> dict[str, Any]:
        """The native ``/v1`` model description."""
        return {"name": self._name, "version": MODEL_VERSION, **self._parameters()}


class Registry:
    """Served names -> :class:`Servable`, plus names still loading or failed."""

    def __init__(self) -> None:
        self._models: dict[str, Servable] = {}
        self._pending: dict[str, str | None] = {}  # name -> failure message (None: loading)
        self._lock = threading.Lock()
        # called with a name before each lookup: shared state brings that name up to date
        self.resolver: Callable[[str], None] | None = None

    def add(self, servable: Servable) -> None:
        """Register (or replace) a servable under its name."""
        with self._lock:
            self._models[servable.name] = servable
            self._pending.pop(servable.name, None)

    def remove(self, name: str) -> bool:
        """Unregister a servable; False if there was none of that name."""
        with self._lock:
            return self._models.pop(name, None) is not None

    def mark_loading(self, name: str) -> None:
        with self._lock:
            self._pending[name] = None

    def mark_failed(self, name: str, message: str) -> None:
        with self._lock:
            self._pending[name] = message

    def forget(self, name: str) -> None:
        """Drop a name marked loading or failed (one that will not be served after all)."""
        with self._lock:
            self._pending.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def states(self) -> list[tuple[str, str, str]]:
        """``(name, state, reason)`` per name, served or not, in name order; ``state`` is
        Triton's ``READY``, ``LOADING`` or ``UNAVAILABLE`` (with the failure as reason)."""
        with self._lock:
            rows = [(n, "READY", "") for n in self._models]
            rows += [(n, "UNAVAILABLE" if why else "LOADING", why or "")
                     for n, why in self._pending.items() if n not in self._models]
        return sorted(rows)

    def ready(self) -> bool:
        """True when something is served and nothing is loading or failed."""
        with self._lock:
            return bool(self._models) and not self._pending

    def get(self, name: str, version: str | None = None, *,
            visible: Callable[[Servable], bool] | None = None) -> Servable:
        """The servable named ``name`` (404 if unknown, 503 while loading or after a failure).

        With ``visible``, servables it rejects are treated as unknown (and not listed).
        """
        if self.resolver is not None:
            self.resolver(name)
        with self._lock:
            servable = self._models.get(name)
            pending = name in self._pending
            failure = self._pending.get(name)
        if servable is not None and visible is not None and not visible(servable):
            pending, servable = False, None
        if servable is None:
            if pending:
                state = f"failed to load: {failure}" if failure else "is still loading"
                raise NotReady(f"model {name!r} {state}")
            with self._lock:
                shown = [n for n, s in self._models.items() if visible is None or visible(s)]
                known = sorted([*shown, *self._pending])
            raise NotFound(f"unknown model {name!r}; expected one of {known}")
        if version is not None and version != servable.version:
            raise NotFound(
                f"unknown version {version!r} of model {name!r}; expected {servable.version!r}"
            )
        return servable

    def status(self, name: str, version: str | None = None, *,
               visible: Callable[[Servable], bool] | None = None) -> bool:
        """Readiness of one model (raises :class:`NotFound` for unknown names)."""
        try:
            self.get(name, version, visible=visible)
        except NotReady:
            return False
        return True

