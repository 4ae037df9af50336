"""``HttpOracle`` as a well-behaved client of a hardened server (against ``fake_v2.FakeV2``).

It retries 429 (waiting for ``Retry-After``) and 5xx, never another 4xx (401, 403, 408 ...),
and the API key appears in no log record at any level (httpx and httpcore included), in no
error message and in no repr.
"""

from __future__ import annotations

import logging

import pytest
import torch
from fake_v2 import FakeV2, Reply, Seen, error

from reprogram.errors import OracleError
from reprogram.http_oracle import HttpOracle, RetryPolicy

pytestmark = pytest.mark.slow

KEY = "sk-test-4f1d2c3b5a6e7f80"
FAST = RetryPolicy(max_retries=3, base=0.01, cap=0.05)


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("status", [401, 403, 405, 408, 409, 413, 415, 422, 451])
def test_no_4xx_but_429_is_retried(status: int) -> None:
    def refuse(s: Seen) -> Reply | None:
        return error(status, f"refused #{status}") if s.kind == "infer" else None

    with FakeV2(script=refuse) as fake, HttpOracle(fake.url, retry=FAST, api_key=KEY) as oracle:
        with pytest.raises(OracleError, match=f"HTTP {status}: refused #{status}"):
            oracle.query(_images(2))
        assert len(fake.requests()) == 1 and oracle.retries == 0


def test_the_key_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    def script(s: Seen) -> Reply | None:
        if s.kind != "infer":
            return None
        if s.index == 0:
            return error(429, "slow down", **{"Retry-After": "0"})
        if s.index == 1:
            return error(503, "busy")
        return error(401, "invalid API key") if s.index >= 3 else None

    caplog.set_level(logging.DEBUG)
    with FakeV2(script=script) as fake, HttpOracle(fake.url, retry=FAST, api_key=KEY) as oracle:
        oracle.query(_images(2))  # 429, 503, then 200
        with pytest.raises(OracleError) as refused:
            oracle.query(_images(2))  # 401
        assert oracle.retries == 2
        assert all(s.headers.get("authorization") == f"Bearer {KEY}" for s in fake.seen)
        texts = [repr(oracle), repr(oracle.info), str(refused.value), repr(refused.value)]
    texts += [r.getMessage() for r in caplog.records]
    texts += [repr(r.args) for r in caplog.records]
    assert any("retrying" in t for t in texts)  # the retries were logged ...
    assert not [t for t in texts if KEY in t]  # ... without the key
