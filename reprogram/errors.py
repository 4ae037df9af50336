"""One exception tree for the whole project.

Every error is also a built-in type (``ValueError``, ``FileNotFoundError`` ...) so callers
that do not know this module can still catch it; messages say what was expected, what was
got, and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ReprogramError(Exception):
    """Base class of every error raised on purpose by ``reprogram``."""


class ConfigError(ReprogramError, ValueError):
    """An option or argument has an invalid value."""


class DataError(ReprogramError, ValueError):
    """A dataset, image or tensor is malformed."""


class ArtifactError(ReprogramError, ValueError):
    """A prompt artifact is missing, truncated, tampered or made for another model."""


class ModelError(ReprogramError, ValueError):
    """A source model cannot be loaded or does not match its metadata."""


class ProtocolError(ReprogramError, ValueError):
    """A request or response does not follow the inference protocol."""


class OracleError(ReprogramError, RuntimeError):
    """The model oracle failed (network, server error, refused request)."""


class UpstreamError(OracleError):
    """The model server behind an endpoint failed: it answered 5xx, an unreadable body, or
    nothing. ``status_code`` is what a proxy in front of it answers (502 bad gateway, 503
    unavailable, 504 timed out); ``public_message`` says so in one line without the upstream's
    own text (which can hold tracebacks and file paths)."""

    status_code = 502

    def __init__(self, message: str, *, public_message: str | None = None) -> None:
        super().__init__(message)
        self.public_message = public_message or "the upstream model server failed"


class UpstreamUnavailable(UpstreamError):
    """Nothing answered at the endpoint, or it answered 503/429 until the retries ran out."""

    status_code = 503


class UpstreamTimeout(UpstreamError):
    """The endpoint did not answer in time."""

    status_code = 504


class BudgetExhausted(ReprogramError, RuntimeError):
    """The query budget (images or requests) is spent; the fit stops cleanly."""


class EstimatorError(ReprogramError, TypeError):
    """An estimator was combined with an oracle it cannot use."""


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else
    :class:`ConfigError` saying which."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected {name} to be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigError(f"expected {name} >= {minimum}, got {value}")
    return value


def coerce_spec(cls: type[T], value: object, what: str) -> T:
    """A frozen spec of dataclass ``cls`` from a spec, its dict (as in a saved config), or a
    bare kind name (its ``kind`` field); :class:`ConfigError` on unknown fields."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        return cls(kind=value)  # type: ignore[call-arg]
    if isinstance(value, Mapping):
        fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"expected {what} fields among {sorted(fields)}, got {unknown}")
        return cls(**value)
    raise ConfigError(f"expected a {what} kind or spec, got {type(value).__name__}")


def spec_fields(name: str, d: object, known: Iterable[str],
                required: Iterable[str]) -> dict[str, Any]:
    """The fields of a JSON spec ``d`` for the dataclass ``name``: a mapping with no unknown
    and no missing keys, else :class:`ConfigError` saying which."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"expected a mapping for {name}, got {type(d).__name__}")
    known = set(known)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"expected {name} keys among {sorted(known)}, got {unknown}")
    missing = sorted(set(required) - set(d))
    if missing:
        raise ConfigError(f"expected {name} keys {missing}, got none")
    return dict(d)
