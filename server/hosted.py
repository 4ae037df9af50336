"""Servables built on an :class:`~reprogram.oracles.Oracle`: a proxied source model and prompts.

:class:`SharedOracle` is the one oracle through which every hosted prompt (and, in
``reprogram serve``, the source model itself) reaches the frozen classifier, one request at a
time. On the model server it is a ``LocalOracle`` over the served model object, with the
server's output kind and 8-bit quantization, so a hosted prompt predicts exactly as
``reprogram eval --model ...`` and ``reprogram eval --endpoint ...`` do.

:class:`PromptServable` serves a learned prompt: target images of any size go through
:class:`~reprogram.pipeline.Reprogrammer` (resize, program, query, label map), the same code
as ``reprogram eval`` and ``reprogram apply``, and target-class probabilities come out.
:class:`OracleServable` serves any oracle as a source model (``reprogram serve --endpoint``
proxies the black-box API this way).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
import torch

from reprogram.artifact import Prompt
from reprogram.errors import ProtocolError
from reprogram.oracles import Oracle
from reprogram.pipeline import Reprogrammer
from reprogram.protocol import ModelMetadata
from reprogram.vlm import bind_prompt_labels
from server.budget import check_deadline, holding
from server.inference import (
    INPUT_NAME,
    MODEL_VERSION,
    TooLarge,
    check_images,
    pixel_params,
    to_float,
    v2_metadata,
)
from server.settings import OutputKind

T = TypeVar("T")
PROBS = OutputKind(kind="probs")


class SharedOracle:
    """An oracle behind a lock: one query at a time, whichever servable asks."""

    def __init__(self, oracle: Oracle) -> None:
        self.oracle = oracle
        self._lock = threading.Lock()

    def run(self, fn: Callable[[Oracle], T]) -> T:
        """Call ``fn(oracle)`` while holding the lock (no autograd), waiting for it only until
        the request's deadline."""
        with holding(self._lock, "the model"), torch.no_grad():
            return fn(self.oracle)


class OracleServable:
    """Any :class:`Oracle` served as a source model (V2 and ``/v1`` routes)."""

    def __init__(self, shared: SharedOracle, *, name: str | None = None,
                 max_images: int = 4096) -> None:
        self._shared = shared
        info = shared.oracle.info
        self._name = name or info.name
        # a names API's top-k by name is served as top-k scores over its vocabulary's slots
        self._output = OutputKind.parse(info.output_kind.replace("topk-names:", "topk:"))
        self._max_images = max_images

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return MODEL_VERSION

    @property
    def input_size(self) -> tuple[int, int]:
        return self._shared.oracle.info.input_size

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._shared.oracle.info.class_names

    @property
    def output(self) -> OutputKind:
        return self._output

    @property
    def max_images(self) -> int:
        return self._max_images

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Scores of the oracle (labels as int64 ``[N]`` for output kind ``label``)."""
        check_images(images, self.input_size, self._max_images)
        scores = self._shared.run(lambda oracle: oracle.query(to_float(images))).cpu()
        if self._output.kind == "label":
            return scores.argmax(dim=1).numpy().astype(np.int64)
        return scores.numpy().astype(np.float32)

    def _parameters(self) -> dict[str, Any]:
        info = self._shared.oracle.info
        return {"output_kind": str(self._output), "class_names": list(info.class_names),
                "input_size": list(info.input_size), **pixel_params(),
                "weights_sha256": info.fingerprint.get("weights_sha256"),
                "source": dict(info.fingerprint), "max_batch_size": self._max_images}

    def metadata(self) -> ModelMetadata:
        """V2 model metadata of the proxied model."""
        return v2_metadata(name=self._name, platform="reprogram-oracle",
                           input_hw=self.input_size, output=self._output,
                           num_classes=len(self.class_names), parameters=self._parameters())

    def info(self) -> dict[str, Any]:
        """The native ``/v1`` model description."""
        return {"name": self._name, "version": MODEL_VERSION, **self._parameters()}


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats (which JSON cannot carry) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def check_target_images(images: np.ndarray, max_images: int, max_pixels: int) -> None:
    """Validate target images: UINT8 or finite FP32 in [0, 1], ``[N>=1, 1|3, H, W]``."""
    if images.dtype not in (np.uint8, np.float32):
        raise ProtocolError(f"expected input {INPUT_NAME!r} of datatype UINT8 (0..255) or FP32"
                            f" (0..1), got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ProtocolError(f"expected input {INPUT_NAME!r} of shape [N, 3, H, W] (any H, W),"
                            f" got {list(images.shape)}")
    n, _, h, w = images.shape
    if n == 0 or h == 0 or w == 0:
        raise ProtocolError(f"expected at least one non-empty image, got {list(images.shape)}")
    if n > max_images:
        raise TooLarge(f"expected at most {max_images} images per request, got {n};"
                       " split the batch")
    if h * w > max_pixels:
        raise TooLarge(f"expected at most {max_pixels} pixels per image, got {h}x{w}")
    if images.dtype == np.float32:
        if not np.isfinite(images).all():
            raise ProtocolError("expected finite FP32 pixels, got NaN or Inf")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ProtocolError(f"expected FP32 pixels in [0, 1], got values in [{lo}, {hi}]")


class PromptServable:
    """A hosted prompt: target images in, probabilities over the target classes out.

    Served as V2 model ``{id}`` with input ``image`` (UINT8 0..255 or FP32 0..1,
    ``[-1, 3, -1, -1]``: any size, since the prompt's input transform resizes) and output
    ``probs`` FP32 ``[-1, K_t]``. ``input_size`` is the program's inner size: the ``/v1/models``
    predict route resizes uploads to it with Pillow, while ``/v1/prompts/{id}/predict`` keeps
    each image's own size (exactly what ``reprogram eval``/``apply`` feed the prompt).
    """

    def __init__(self, prompt_id: str, prompt: Prompt, shared: SharedOracle, *, data: bytes,
                 created: float, max_images: int = 4096,
                 max_pixels: int = 4096 * 4096) -> None:
        self.prompt_id = prompt_id
        self.prompt = prompt
        self.size = len(data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.created = created
        self._shared = shared
        self._model = prompt.build().eval()
        self._max_images = max_images
        self._max_pixels = max_pixels
        self.owners: set[str] = set()  # API key names; empty: visible to every key

    @property
    def name(self) -> str:
        return self.prompt_id

    @property
    def reprogrammer(self) -> Reprogrammer:
        """The prompt's program and label map (evaluation mode; read-only use)."""
        return self._model

    @property
    def version(self) -> str:
        return MODEL_VERSION

    @property
    def input_size(self) -> tuple[int, int]:
        inner = self.prompt.program.inner_size
        return inner, inner

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.prompt.target_classes

    @property
    def output(self) -> OutputKind:
        return PROBS

    @property
    def max_images(self) -> int:
        return self._max_images

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Target-class probabilities float32 ``[N, K_t]`` of one batch of equal-size images."""
        check_target_images(images, self._max_images, self._max_pixels)
        x = torch.from_numpy(np.ascontiguousarray(images))

        def predict(oracle: Oracle) -> torch.Tensor:
            bind_prompt_labels(oracle, self.prompt)  # under the shared oracle's lock
            return self._model.predict_proba(x, oracle)

        probs = self._shared.run(predict)
        return probs.cpu().numpy().astype(np.float32)

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities ``[N, K_t]`` for images ``[C, H, W]`` of any sizes, in input order."""
        out = np.zeros((len(images), len(self.class_names)), dtype=np.float32)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(i)
        for idx in groups.values():
            check_deadline(f"with {len(idx)} images still to classify")
            out[idx] = self.infer(np.stack([images[i] for i in idx]))
        return out

    def metadata(self) -> ModelMetadata:
        """V2 metadata: any-size target images in, ``probs`` over the target classes out."""
        return v2_metadata(
            name=self.prompt_id, platform="reprogram-prompt", input_hw=(-1, -1), output=PROBS,
            num_classes=len(self.class_names),
            parameters={"output_kind": str(PROBS), "class_names": list(self.class_names),
                        "inner_size": self.prompt.program.inner_size, **pixel_params(),
                        "max_batch_size": self._max_images, "prompt": self.summary()})

    def summary(self) -> dict[str, Any]:
        """What ``GET /v1/prompts/{id}`` returns: classes, program, label map, metrics."""
        p = self.prompt
        metrics = p.metrics
        return json_safe({
            "id": self.prompt_id,
            "sha256": self.sha256,
            "target_classes": list(p.target_classes),
            "num_classes": len(p.target_classes),
            "program_kind": p.program.kind,
            "program": p.program.to_dict(),
            "labelmap_kind": p.labelmap.kind,
            "val_accuracy": metrics.get("val_accuracy"),
            "test_accuracy": metrics.get("test_accuracy"),
            "dataset": metrics.get("dataset"),
            "source": p.source,
            "trained_output_kind": p.output_kind,
            "wire_dtype": p.wire_dtype,
            "queries": p.queries,
            "seed": p.seed,
            "bytes": self.size,
            "created": datetime.fromtimestamp(self.created, UTC).isoformat(timespec="seconds"),
            "v2_model": f"/v2/models/{self.prompt_id}",
        })

    def info(self) -> dict[str, Any]:
        """The native ``/v1/models/{id}`` description (the summary, with version)."""
        return {"name": self.prompt_id, "version": MODEL_VERSION, **self.summary()}
