"""Per-key rate limits and image quotas: a token bucket per key plus a running total.

Every key (every client address on a server without keys) has a :class:`Usage`: a token
bucket of ``images_per_minute`` tokens refilled continuously at ``images_per_minute / 60`` per
second, and the count of images it has had inferred. A request of ``n`` images is admitted when
the bucket holds ``min(n, images_per_minute)`` tokens and then takes ``n`` (the bucket may go
into debt, so any batch size is eventually admitted and the long-run rate still holds); when
it is not admitted the answer is 429 with ``Retry-After`` (whole seconds until enough tokens).
A request that would take the key past its total ``quota_images`` is answered 403: the quota
never refills, so there is nothing to wait for (a 429 would make clients retry in vain).
Requests whose inference then fails are refunded (:meth:`Ledger.refund`).

:meth:`Ledger.precheck` refuses a caller whose bucket is empty before its body is read.
The ledger keeps at most :data:`MAX_TRACKED` callers (least recently seen dropped first), so a
flood of client addresses cannot grow it without bound.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.inference import HTTPStatusError

MAX_TRACKED = 10_000


class RateLimited(HTTPStatusError):
    """Over the images-per-minute rate (429, with ``retry_after`` whole seconds)."""

    status_code = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


class QuotaExhausted(HTTPStatusError):
    """Over the total images quota of a key (403: it does not refill)."""

    status_code = 403


@dataclass
class Usage:
    """Counters and the token bucket of one key (or client address)."""

    tokens: float
    stamp: float
    images: int = 0  # admitted (and not refunded) images, counted against the quota
    requests: int = 0
    rate_limited: int = 0
    quota_refused: int = 0


class Ledger:
    """Usage of every key; thread-safe (requests are admitted from worker threads)."""

    def __init__(self, *, images_per_minute: int | None, quota_images: int | None,
                 clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = MAX_TRACKED) -> None:
        self.images_per_minute = images_per_minute
        self.quota_images = quota_images
        self._clock = clock
        self._max_tracked = max_tracked
        self._usage: OrderedDict[str, Usage] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, meter: str) -> Usage:
        """The usage of ``meter``, refilled to now (call with the lock held)."""
        now = self._clock()
        usage = self._usage.get(meter)
        if usage is None:
            usage = Usage(tokens=float(self.images_per_minute or 0), stamp=now)
            self._usage[meter] = usage
            while len(self._usage) > self._max_tracked:
                self._usage.popitem(last=False)
        else:
            self._usage.move_to_end(meter)
        if self.images_per_minute is not None:
            rate = self.images_per_minute / 60.0
            usage.tokens = min(float(self.images_per_minute),
                               usage.tokens + (now - usage.stamp) * rate)
        usage.stamp = now
        return usage

    def _wait(self, usage: Usage, need: float) -> int:
        """Whole seconds until the bucket holds ``need`` tokens (at least 1)."""
        per_minute = self.images_per_minute or 1
        return max(1, math.ceil((need - usage.tokens) * 60.0 / per_minute))

    def precheck(self, meter: str) -> None:
        """Refuse (429) a caller whose bucket is empty, before its request body is read."""
        if self.images_per_minute is None:
            return
        with self._lock:
            usage = self._get(meter)
            if usage.tokens < 1.0:
                usage.rate_limited += 1
                wait = self._wait(usage, 1.0)
                raise RateLimited(self._rate_message(0, wait), wait)

    def admit(self, meter: str, n: int) -> None:
        """Take ``n`` images from ``meter``'s bucket and quota, or raise 429/403."""
        with self._lock:
            usage = self._get(meter)
            if self.quota_images is not None and usage.images + n > self.quota_images:
                usage.quota_refused += 1
                left = max(0, self.quota_images - usage.images)
                raise QuotaExhausted(
                    f"expected at most {left} more image(s) under the quota of"
                    f" {self.quota_images} images, got a request of {n}; ask the operator to"
                    " raise the quota")
            if self.images_per_minute is not None:
                need = min(float(n), float(self.images_per_minute))
                if usage.tokens < need:
                    usage.rate_limited += 1
                    wait = self._wait(usage, need)
                    raise RateLimited(self._rate_message(n, wait), wait)
                usage.tokens -= n
            usage.images += n
            usage.requests += 1

    def refund(self, meter: str, n: int) -> None:
        """Give back ``n`` images of a request that failed on bad input."""
        with self._lock:
            usage = self._get(meter)
            usage.images = max(0, usage.images - n)
            usage.requests = max(0, usage.requests - 1)
            if self.images_per_minute is not None:
                usage.tokens = min(float(self.images_per_minute), usage.tokens + n)

    def _rate_message(self, n: int, wait: int) -> str:
        what = f"a request of {n} image(s)" if n else "another request"
        return (f"rate limit of {self.images_per_minute} images per minute reached; {what} can"
                f" be admitted in {wait} s (Retry-After)")

    def report(self, meter: str) -> dict[str, Any]:
        """What ``GET /v1/usage`` shows for ``meter``."""
        with self._lock:
            usage = self._get(meter)
            left = (None if self.quota_images is None
                    else max(0, self.quota_images - usage.images))
            tokens = (None if self.images_per_minute is None
                      else max(0, math.floor(usage.tokens)))
            return {"images": usage.images, "requests": usage.requests,
                    "rate_limited": usage.rate_limited, "quota_refused": usage.quota_refused,
                    "images_per_minute": self.images_per_minute, "images_available_now": tokens,
                    "quota_images": self.quota_images, "quota_remaining": left}
