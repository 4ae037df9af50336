"""Rate limits, quotas, JSON caps and metrics, in-process (no network).

The token bucket is checked on a fake clock; the app answers 429 with an integer
``Retry-After`` over the rate and 403 once the total quota is spent, per key (per client
address without keys), refunds requests that fail on bad input, and counts everything in
``/v1/usage`` and ``/metrics``. Deep or huge V2 JSON is refused with 413 before parsing.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from ops_support import AsgiClient, infer_body
from prompt_support import png

from reprogram.errors import ConfigError
from reprogram.zoo.registry import SourceModel
from server import Settings, create_app
from server.quota import Ledger, QuotaExhausted, RateLimited
from server.settings import ApiKey

INFER = "/v2/models/default/infer"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_on_a_fake_clock() -> None:
    clock = Clock()
    ledger = Ledger(images_per_minute=60, quota_images=None, clock=clock)
    ledger.admit("a", 60)
    with pytest.raises(RateLimited) as limited:
        ledger.admit("a", 1)
    assert limited.value.retry_after == 1 and limited.value.headers == {"Retry-After": "1"}
    clock.now += 1.0
    ledger.admit("a", 1)
    ledger.admit("b", 30)  # another meter has its own bucket
    clock.now += 60.0
    ledger.admit("a", 500)  # bigger than the bucket: admitted when full, leaves a debt
    with pytest.raises(RateLimited) as limited:
        ledger.precheck("a")
    assert limited.value.retry_after == 441
    ledger.refund("a", 500)
    ledger.precheck("a")
    report = ledger.report("a")
    assert report["images"] == 61 and report["rate_limited"] == 2
    assert report["images_available_now"] == 60


def test_quota_and_bounded_tracking() -> None:
    ledger = Ledger(images_per_minute=None, quota_images=10, max_tracked=2)
    ledger.admit("a", 8)
    with pytest.raises(QuotaExhausted, match="at most 2 more"):
        ledger.admit("a", 3)
    ledger.admit("a", 2)
    with pytest.raises(QuotaExhausted, match="at most 0 more"):
        ledger.admit("a", 1)
    assert ledger.report("a")["quota_remaining"] == 0
    ledger.admit("b", 1)
    ledger.admit("c", 1)  # "a" was least recently seen: forgotten
    assert ledger.report("a")["images"] == 0


def test_rate_limit_per_client_with_retry_after(model: SourceModel) -> None:
    app = create_app(Settings(images_per_minute=10), model=model)
    c, other = AsgiClient(app), AsgiClient(app, client=("10.0.0.2", 7))
    body, headers = infer_body(8)
    assert c.post(INFER, content=body, headers=headers).status_code == 200
    r = c.post(INFER, content=body, headers=headers)
    assert r.status_code == 429 and "rate limit of 10 images per minute" in r.json()["error"]
    assert r.headers["retry-after"].isdigit() and 1 <= int(r.headers["retry-after"]) <= 60
    assert other.post(INFER, content=body, headers=headers).status_code == 200
    bad, bad_headers = infer_body(2, size=16)  # wrong size: 400, and not charged
    assert c.post(INFER, content=bad, headers=bad_headers).status_code == 400
    usage = c.get("/v1/usage").json()
    assert usage == {"key": "anonymous", "images": 8, "requests": 1, "rate_limited": 1,
                     "quota_refused": 0, "images_per_minute": 10, "images_available_now": 2,
                     "quota_images": None, "quota_remaining": None}
    two, two_headers = infer_body(2)
    assert c.post(INFER, content=two, headers=two_headers).status_code == 200  # bucket empty
    r = c.post(INFER, content=b"not even JSON", headers=headers)
    assert r.status_code == 429  # refused before the body is read
    text = c.get("/metrics").text
    assert 'reprogram_rate_limited_total{key="anonymous",reason="rate"} 2.0' in text
    assert 'reprogram_images_inferred_total{key="anonymous"} 18.0' in text


def test_quota_per_key(model: SourceModel) -> None:
    keys = (ApiKey(name="alice", secret="alice-key-123456789"),
            ApiKey(name="bob", secret="bob-key-1234567890"))
    c = AsgiClient(create_app(Settings(quota_images=5, api_keys=keys), model=model))
    alice, bob = {"X-API-Key": "alice-key-123456789"}, {"X-API-Key": "bob-key-1234567890"}
    body, headers = infer_body(3)
    assert c.post(INFER, content=body, headers={**headers, **alice}).status_code == 200
    r = c.post(INFER, content=body, headers={**headers, **alice})
    assert r.status_code == 403 and "quota of 5 images" in r.json()["error"]
    files = [("files", (f"{i}.png", png(np.zeros((3, 32, 32), np.uint8)), "image/png"))
             for i in range(2)]
    r = c.post("/v1/models/default/predict", files=files, headers=alice)
    assert r.status_code == 200, r.text
    assert c.post(INFER, content=body, headers={**headers, **bob}).status_code == 200
    assert c.get("/v1/usage", headers=alice).json()["quota_remaining"] == 0
    assert c.get("/v1/usage", headers=bob).json()["quota_remaining"] == 2
    text = c.get("/metrics", headers=bob).text
    assert 'reprogram_images_inferred_total{key="alice"} 5.0' in text
    assert 'reprogram_rate_limited_total{key="alice",reason="quota"} 1.0' in text


def _json(data: object) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 32, 32],
                                   "datatype": "UINT8", "data": data}]}).encode()


def test_json_caps(model: SourceModel) -> None:
    c = AsgiClient(create_app(Settings(max_json_elements=10_000), model=model))
    nested = np.zeros((1, 3, 32, 32), np.uint8).tolist()
    assert c.post(INFER, content=_json(nested)).status_code == 200
    start = time.perf_counter()
    for body in (b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        r = c.post(INFER, content=body)
        assert r.status_code == 413 and "nested at most 32 levels" in r.json()["error"]
    deep: list[object] = []
    for _ in range(40):
        deep = [deep]
    request = json.loads(_json(nested))
    r = c.post(INFER, content=json.dumps({**request, "parameters": {"x": deep}}))
    assert r.status_code == 413 and "got 43" in r.json()["error"]
    r = c.post(INFER, content=_json([0] * 20_000))
    assert r.status_code == 413 and "at most 10000 JSON values" in r.json()["error"]
    r = c.post(INFER, content=json.dumps({**request, "id": "[" * 1000 + '"]'}))
    assert r.status_code == 200  # brackets inside strings do not count
    assert time.perf_counter() - start < 5.0


def test_settings_validation() -> None:
    for bad in ({"max_json_depth": 0}, {"images_per_minute": 0}, {"quota_images": -1},
                {"drain_seconds": -1.0}, {"shutdown_timeout": float("nan")},
                {"max_json_elements": True}):
        with pytest.raises(ConfigError):
            Settings(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="distinct API keys"):
        Settings(api_keys=(ApiKey(name="a", secret="same-key-12345678"),
                           ApiKey(name="b", secret="same-key-12345678")))


def test_metrics(model: SourceModel) -> None:
    c = AsgiClient(create_app(Settings(), model=model))
    body, headers = infer_body(4)
    for _ in range(3):
        assert c.post(INFER, content=body, headers=headers).status_code == 200
    c.get("/v2/models/nope")
    c.get("/no/such/path")
    text = c.get("/metrics").text
    for line in (
        'reprogram_http_requests_total{method="POST",route="/v2/models/{model_name}/infer",'
        'status="200"} 3.0',
        'reprogram_http_requests_total{method="GET",route="/v2/models/{model_name}",'
        'status="404"} 1.0',
        'reprogram_http_requests_total{method="GET",route="<unmatched>",status="404"} 1.0',
        'reprogram_http_errors_total{status="404"} 2.0',
        'reprogram_images_inferred_total{key="anonymous"} 12.0',
        "reprogram_http_requests_in_flight 1.0",  # the /metrics request itself
        "reprogram_inference_queue_depth 0.0",
        'reprogram_http_request_duration_seconds_count{method="POST",'
        'route="/v2/models/{model_name}/infer"} 3.0',
    ):
        assert line in text, line
