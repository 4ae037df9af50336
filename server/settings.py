"""Server configuration: one frozen, keyword-only :class:`Settings`, validated once."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from reprogram.errors import ConfigError, ProtocolError
from reprogram.strict import parse_count

OutputKindName = Literal["probs", "logits", "topk", "label"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug")



def check_state_url(url: str) -> str:
    """``url`` if it names a backend (``local`` or ``redis://HOST[:PORT][/DB]``), else a
    :class:`ConfigError` saying what is expected."""
    if url == "local":
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"expected --state local or redis://HOST:PORT/DB, got {url!r}")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"expected a database number after the port in --state, got {db!r}")
    return url


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
            try:
                k = parse_count(rest, "K", minimum=1)
            except ProtocolError:
                raise ConfigError(f"expected topk:K with an integer K >= 1, got {text!r}"
                                  ) from None
            return cls(kind="topk", k=k)
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


def _seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e6:
        raise ConfigError(f"expected a number of seconds >= 0 for {name}, got {value!r}")


def _timeout(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e6:
        raise ConfigError(f"expected a number of seconds > 0 for {name}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ApiKey:
    """One API key: ``name`` (logged, metered, owns prompts) and ``secret`` (never shown).

    ``ApiKey.parse("alice:s3cret")`` names the key ``alice``; a bare ``"s3cret"`` is named
    ``key-`` plus the first 8 hex digits of its SHA-256, which identifies it without revealing it.
    """

    name: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        if not _url_safe(self.name):
            raise ConfigError(f"expected an API key name of letters, digits, '-', '_' or '.',"
                              f" got {self.name!r}")
        if not self.secret or any(c.isspace() or c == "," for c in self.secret):
            raise ConfigError(f"expected a non-empty API key without spaces or commas for key"
                              f" {self.name!r}")

    @classmethod
    def parse(cls, entry: str) -> ApiKey:
        """``name:key`` or a bare ``key``."""
        text = entry.strip()
        name, sep, secret = text.partition(":")
        if not sep:
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
            return cls(name=f"key-{digest}", secret=text)
        return cls(name=name.strip(), secret=secret.strip())


@dataclass(frozen=True, kw_only=True)
class FitJobs:
    """Tuning jobs (``/v1/fits``, :mod:`server.jobs`): off unless ``workers`` > 0.

    ``workers``: jobs run at once, each in its own process with ``threads`` torch threads;
    ``directory``: where jobs live (data sets, checkpoints, results; ``None``: a temporary
    folder, lost at exit); per key: ``max_jobs`` unfinished jobs, ``quota`` image evaluations
    in total over all its jobs (``None``: unlimited); per data set: ``max_files`` images,
    ``max_bytes`` uncompressed, ``max_pixels`` per image; ``allow_download``: a job's owner
    may download the learned artifact (``GET /v1/fits/{id}/prompt``), not only use it.
    """

    workers: int = 0
    directory: str | None = None
    threads: int = 1
    max_jobs: int = 2
    quota: int | None = None
    max_files: int = 20_000
    max_bytes: int = 256 * 1024 * 1024
    max_pixels: int = 1024 * 1024
    allow_download: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"expected --fit-workers N >= 0, got {self.workers!r}")
        for name in ("threads", "max_jobs", "max_files", "max_bytes", "max_pixels"):
            _positive(f"fit {name}", getattr(self, name))
        if self.quota is not None:
            _positive("fit quota", self.quota)

    @property
    def enabled(self) -> bool:
        return self.workers > 0


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the operator chooses when starting the server.

    ``model``: ``default``, ``torchvision:ARCH`` (with ``weights``) or the path of a model
    folder, config or file (see :mod:`reprogram.zoo.loaders`); ``model_repository``: a folder
    of models instead (one sub-folder each, Triton's layout), all of them served.
    ``context_input``: a vision-language model also takes CoOp context vectors (the optional
    ``context`` input of :mod:`server.zero_shot`), off by default.

    ``prompts_dir``: where uploaded prompts are stored and loaded from at startup (``None``:
    in memory only, lost on restart); ``max_prompt_bytes``: the upload cap for a prompt file.
    ``state``: ``local`` (prompts here, usage in memory) or ``redis://HOST:PORT/DB`` (both in
    one Redis shared by every replica; see :mod:`server.state`).

    Hardening (see ``server.gate``, ``server.quota``, ``server.limits``, ``server.lifecycle``):
    ``api_keys`` (empty: an open server), ``images_per_minute`` and ``quota_images`` per key
    (per client address without keys; ``None``: unlimited), ``max_json_depth`` and
    ``max_json_elements`` for V2 JSON bodies, ``drain_seconds`` (readiness is false this long
    after SIGTERM before the listener closes), ``shutdown_timeout`` (how long in-flight requests
    may take to finish), ``access_log`` (one JSON line per request on ``server.access``),
    ``server_timing`` (a W3C ``Server-Timing`` header on V2 inference answers; its ``forward``
    includes any wait for the model, so it tells callers how busy the server is).

    Work per request (see ``server.limits``, ``server.budget``): ``max_request_pixels``
    (decoded pixels of all of a request's images together), ``max_response_bytes`` (the
    encoded answer), ``body_timeout`` (seconds for the whole body to arrive) and
    ``request_timeout`` (seconds from the request's headers to its answer).

    ``fits``: tuning jobs (:class:`FitJobs`), off by default. ``console``: the web console
    at ``/`` (:mod:`server.console`).
    """

    model: str = "default"
    model_repository: str | None = None
    weights: str | None = None
    class_names_file: str | None = None
    served_name: str | None = None
    output: OutputKind = field(default_factory=OutputKind)
    max_batch: int = 256
    max_images_per_request: int = 4096
    context_input: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    prompts_dir: str | None = None
    state: str = "local"
    max_prompt_bytes: int = 16 * 1024 * 1024
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: LogLevel = "info"
    api_keys: tuple[ApiKey, ...] = ()
    images_per_minute: int | None = None
    quota_images: int | None = None
    max_json_depth: int = 32
    max_json_elements: int = 4 * 1024 * 1024
    drain_seconds: float = 0.0
    shutdown_timeout: float = 30.0
    access_log: bool = True
    server_timing: bool = True
    console: bool = True
    max_request_pixels: int = 4096 * 4096
    max_response_bytes: int = 64 * 1024 * 1024
    body_timeout: float = 60.0
    request_timeout: float = 120.0
    fits: FitJobs = field(default_factory=FitJobs)

    def __post_init__(self) -> None:
        if isinstance(self.output, str):  # accept "topk:3" for convenience
            object.__setattr__(self, "output", OutputKind.parse(self.output))
        for name in ("max_batch", "max_images_per_request", "max_body_bytes", "max_image_pixels",
                     "max_prompt_bytes", "max_json_depth", "max_json_elements",
                     "max_request_pixels", "max_response_bytes"):
            _positive(name, getattr(self, name))
        for name in ("body_timeout", "request_timeout"):
            _timeout(name, getattr(self, name))
        for name in ("images_per_minute", "quota_images"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("drain_seconds", "shutdown_timeout"):
            _seconds(name, getattr(self, name))
        check_state_url(self.state)
        if self.state != "local" and self.prompts_dir is not None:
            raise ConfigError("expected --prompts-dir or --state redis://..., not both: with"
                              " Redis the prompts are kept in Redis")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        check_keys(self.api_keys)
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ConfigError(f"expected an integer port, got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"expected a port in 0..65535, got {self.port}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"expected a log level in {LOG_LEVELS}, got {self.log_level!r}")
        if self.model_repository is not None and (self.model != "default" or self.weights
                                                  or self.served_name or self.class_names_file):
            raise ConfigError("expected --model-repository alone, got it with --model,"
                              " --weights, --name or --class-names (each model's config"
                              " names those)")
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


def check_keys(keys: tuple[ApiKey, ...]) -> None:
    """Raise :class:`ConfigError` unless ``keys`` are ApiKeys with unique names and secrets."""
    if not all(isinstance(k, ApiKey) for k in keys):
        raise ConfigError("expected api_keys to be ApiKey objects (ApiKey.parse('name:key'))")
    names = [k.name for k in keys]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"expected unique API key names, got {dup} more than once")
    if len({k.secret for k in keys}) != len(keys):
        raise ConfigError("expected distinct API keys, got the same key under two names")


def _url_safe(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name)
