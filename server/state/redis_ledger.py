"""Rate limits and quotas in Redis: one token bucket per key for every replica together.

The bucket and the counters of a key live in one Redis hash, changed only by one Lua script
(:data:`SCRIPT`), which Redis runs atomically: two replicas admitting the same key at the same
moment cannot both take the last tokens. The script refills the bucket from Redis's own clock
(``TIME``), so replicas whose clocks differ still agree. The rules are those of
:class:`server.quota.Ledger` (debt allowed, so any batch is eventually admitted; 429 with
``Retry-After`` over the rate; 403 over the quota, which never refills).

Redis down: the ledger falls back to this process's own :class:`~server.quota.Ledger`, so
inference on the served model keeps answering (each replica then enforces the limit on its
own, which the readiness route reports); it returns to Redis as soon as Redis answers.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from server.quota import Ledger, QuotaExhausted, RateLimited, Usage
from server.state.errors import redis_errors

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

# KEYS[1]: the key's hash. ARGV: op (precheck|admit|refund|report), n, images per minute (-1:
# none), quota (-1: none), seconds to keep an idle key without a quota.
# Returns {status (0 ok, 1 rate limited, 2 over quota), tokens, images, requests,
# rate_limited, quota_refused}; tokens as a string (Lua numbers become integers otherwise).
SCRIPT = """
local op, n = ARGV[1], tonumber(ARGV[2])
local rate, quota, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HMGET', KEYS[1], 'tokens', 'stamp', 'images', 'requests', 'rl', 'qr')
local tokens = tonumber(h[1]) or math.max(rate, 0)
local stamp = tonumber(h[2]) or now
local images, requests = tonumber(h[3]) or 0, tonumber(h[4]) or 0
local rl, qr = tonumber(h[5]) or 0, tonumber(h[6]) or 0
if rate >= 0 then tokens = math.min(rate, tokens + math.max(0, now - stamp) * rate / 60) end
local status = 0
if op == 'precheck' then
  if rate >= 0 and tokens < 1 then status = 1; rl = rl + 1 end
elseif op == 'admit' then
  if quota >= 0 and images + n > quota then status = 2; qr = qr + 1
  elseif rate >= 0 and tokens < math.min(n, rate) then status = 1; rl = rl + 1
  else
    if rate >= 0 then tokens = tokens - n end
    images = images + n; requests = requests + 1
  end
elseif op == 'refund' then
  images = math.max(0, images - n); requests = math.max(0, requests - 1)
  if rate >= 0 then tokens = math.min(rate, tokens + n) end
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now),
           'images', images, 'requests', requests, 'rl', rl, 'qr', qr)
if quota < 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
return {status, tostring(tokens), images, requests, rl, qr}
"""

IDLE_TTL_S = 7 * 24 * 3600


class RedisLedger(Ledger):
    """A :class:`Ledger` whose buckets live in Redis (this process's own ones while Redis is
    down)."""

    def __init__(self, client: redis.Redis, *, images_per_minute: int | None,
                 quota_images: int | None, prefix: str = "reprogram:") -> None:
        super().__init__(images_per_minute=images_per_minute, quota_images=quota_images)
        self._script = client.register_script(SCRIPT)
        self._prefix = f"{prefix}usage:"
        self._down_since: float | None = None

    @property
    def degraded(self) -> bool:
        """Whether limits are this process's own (Redis did not answer the last call)."""
        return self._down_since is not None

    def _run(self, op: str, meter: str, n: int = 0) -> Usage | None:
        """Run the script; None when Redis is down (the caller falls back)."""
        rate = -1 if self.images_per_minute is None else self.images_per_minute
        quota = -1 if self.quota_images is None else self.quota_images
        args: list[str | int] = [op, n, rate, quota, IDLE_TTL_S]
        try:
            status, tokens, images, requests, rl, qr = self._script(
                keys=[self._prefix + meter], args=args)
        except redis_errors() as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
                logger.warning("shared limits unavailable (%s): each replica enforces its own"
                               " until Redis answers", str(exc).splitlines()[0] if str(exc)
                               else type(exc).__name__)
            return None
        if self._down_since is not None:
            logger.info("shared limits back in Redis")
            self._down_since = None
        usage = Usage(tokens=float(tokens), stamp=0.0, images=int(images),
                      requests=int(requests), rate_limited=int(rl), quota_refused=int(qr))
        self._raise_for(int(status), usage, n)
        return usage

    def _raise_for(self, status: int, usage: Usage, n: int) -> None:
        if status == 2:
            assert self.quota_images is not None
            left = max(0, self.quota_images - usage.images)
            raise QuotaExhausted(
                f"expected at most {left} more image(s) under the quota of"
                f" {self.quota_images} images, got a request of {n}; ask the operator to"
                " raise the quota")
        if status == 1:
            need = min(float(max(n, 1)), float(self.images_per_minute or 1))
            wait = self._wait(usage, need)
            raise RateLimited(self._rate_message(n, wait), wait)

    def precheck(self, meter: str) -> None:
        if self.images_per_minute is None:
            return
        if self._run("precheck", meter) is None:
            super().precheck(meter)

    def admit(self, meter: str, n: int) -> None:
        if self._run("admit", meter, n) is None:
            super().admit(meter, n)

    def refund(self, meter: str, n: int) -> None:
        if self._run("refund", meter, n) is None:
            super().refund(meter, n)

    def report(self, meter: str) -> dict[str, Any]:
        usage = self._run("report", meter)
        if usage is None:
            return super().report(meter)
        left = None if self.quota_images is None else max(0, self.quota_images - usage.images)
        tokens = None if self.images_per_minute is None else max(0, int(usage.tokens))
        return {"images": usage.images, "requests": usage.requests,
                "rate_limited": usage.rate_limited, "quota_refused": usage.quota_refused,
                "images_per_minute": self.images_per_minute, "images_available_now": tokens,
                "quota_images": self.quota_images, "quota_remaining": left}
