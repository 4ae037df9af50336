"""The one error every shared-state backend raises when its storage cannot be reached."""

from __future__ import annotations

from typing import Any

from server.inference import HTTPStatusError

RETRY_AFTER_S = 5


class StateUnavailable(HTTPStatusError):
    """The shared state (Redis) cannot be reached: 503 with ``Retry-After``."""

    status_code = 503

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}

    @classmethod
    def of(cls, where: str, what: str, exc: BaseException) -> StateUnavailable:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return cls(f"cannot {what}: the shared state at {where} is unavailable ({reason});"
                   f" retry in {RETRY_AFTER_S} s")


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of redis-py that mean "Redis cannot be reached or answered badly"."""
    import redis.exceptions as rex

    return (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, rex.ReadOnlyError,
            rex.ResponseError, OSError)


def call(where: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` against Redis, its failures as :class:`StateUnavailable`
    ("cannot WHAT: the shared state at WHERE is unavailable ...")."""
    try:
        return fn(*args, **kwargs)
    except redis_errors() as exc:
        raise StateUnavailable.of(where, what, exc) from None
