"""Server configuration: one frozen, keyword-only :class:`Settings`, validated once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reprogram.errors import ConfigError

OutputKindName = Literal["probs", "logits", "topk", "label"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True, kw_only=True)
class OutputKind:
    """What the server reveals about each image, to emulate real APIs.

    ``probs``: softmax probabilities; ``logits``: raw logits; ``topk`` (with ``k``):
    probabilities with every entry outside the top ``k`` set to 0; ``label``: the argmax only.
    """

    kind: OutputKindName = "probs"
    k: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "topk":
            if self.k is None or self.k < 1:
                raise ConfigError(f"expected topk:K with an integer K >= 1, got k={self.k!r}")
        elif self.k is not None:
            raise ConfigError(f"expected no K for output kind {self.kind!r}, got k={self.k}")

    @classmethod
    def parse(cls, text: str) -> OutputKind:
        """Parse ``probs``, ``logits``, ``label`` or ``topk:K``."""
        name, sep, rest = text.strip().partition(":")
        if name == "topk" and sep:
            if not rest.isdigit() or int(rest) < 1:
                raise ConfigError(f"expected topk:K with an integer K >= 1, got {text!r}")
            return cls(kind="topk", k=int(rest))
        if name in ("probs", "logits", "label") and not sep:
            return cls(kind=name)  # type: ignore[arg-type]
        raise ConfigError(f"expected an output kind probs|logits|topk:K|label, got {text!r}")

    def __str__(self) -> str:
        return f"topk:{self.k}" if self.kind == "topk" else self.kind

    @property
    def output_name(self) -> str:
        """Name of the V2 output tensor: ``probs`` (also for topk), ``logits`` or ``label``."""
        return "probs" if self.kind == "topk" else self.kind

    @property
    def datatype(self) -> str:
        """V2 datatype of the output: ``INT64`` for labels, ``FP32`` otherwise."""
        return "INT64" if self.kind == "label" else "FP32"


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"expected a positive integer for {name}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the operator chooses when starting the server.

    ``prompts_dir``: where uploaded prompts are stored and loaded from at startup (``None``:
    in memory only, lost on restart); ``max_prompt_bytes``: the upload cap for a prompt file.
    """

    model: str = "default"
    weights: str | None = None
    class_names_file: str | None = None
    served_name: str | None = None
    output: OutputKind = field(default_factory=OutputKind)
    max_batch: int = 256
    max_images_per_request: int = 4096
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    prompts_dir: str | None = None
    max_prompt_bytes: int = 16 * 1024 * 1024
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: LogLevel = "info"

    def __post_init__(self) -> None:
        if isinstance(self.output, str):  # accept "topk:3" for convenience
            object.__setattr__(self, "output", OutputKind.parse(self.output))
        for name in ("max_batch", "max_images_per_request", "max_body_bytes", "max_image_pixels",
                     "max_prompt_bytes"):
            _positive(name, getattr(self, name))
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ConfigError(f"expected an integer port, got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"expected a port in 0..65535, got {self.port}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"expected a log level in {LOG_LEVELS}, got {self.log_level!r}")
        if self.served_name is not None and not _url_safe(self.served_name):
            raise ConfigError(
                f"expected a served name of letters, digits, '-', '_' or '.', got"
                f" {self.served_name!r}"
            )

    def class_names(self) -> tuple[str, ...] | None:
        """Class names from ``class_names_file`` (JSON list or one name per line), if set."""
        if self.class_names_file is None:
            return None
        path = Path(self.class_names_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read class names file {str(path)!r}: {exc}") from exc
        if path.suffix == ".json":
            try:
                names = json.loads(text)
            except ValueError as exc:
                raise ConfigError(f"expected a JSON list in {str(path)!r}: {exc}") from exc
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"expected a JSON list of strings in {str(path)!r}")
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise ConfigError(f"expected at least one class name in {str(path)!r}, got none")
        return tuple(names)


def _url_safe(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name)
