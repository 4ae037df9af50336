"""Shared state in a real Redis: two ``reprogram-server`` processes behave as one server.

A prompt uploaded to one replica is listed and predicts on the other at once, keeps its owner
there, and deleting it on one removes it from both; a key limited to N images per minute gets
N across both replicas together, not 2N. With Redis stopped, inference on the served model
keeps answering, the prompt routes answer 503 with ``Retry-After``, readiness (still 200: the
model answers) says what is degraded, and
every prompt acknowledged before is back once Redis returns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from ops_support import infer_body
from prompt_support import ServerProcess, model_server, png, predict_probs, random_prompt, upload
from redis_support import RedisProcess

from reprogram.data import load_digits
from reprogram.errors import ConfigError
from server.main import parse_settings
from server.quota import QuotaExhausted, RateLimited
from server.state import open_state

pytestmark = pytest.mark.slow

ALICE = "alice-redis-key-0123456789"
BOB = "bob-redis-key-0123456789ab"
PER_MINUTE = 60
INFER = "/v2/models/default/infer"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    proc = RedisProcess(tmp_path / "redis").start()
    yield proc
    proc.stop()


@pytest.fixture
def replicas(tmp_path: Path, redis_server: RedisProcess) -> Iterator[list[ServerProcess]]:
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    servers = [model_server("--state", redis_server.url, "--api-keys-file", str(keys),
                            "--images-per-minute", str(PER_MINUTE)) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _pngs(n: int = 6) -> list[bytes]:
    images = load_digits().images[:n]
    return [png(image) for image in images]


def test_a_prompt_uploaded_to_one_replica_serves_on_the_other(
        replicas: list[ServerProcess]) -> None:
    a, b = (httpx.Client(base_url=s.url, timeout=60, headers={"X-API-Key": ALICE})
            for s in replicas)
    data = random_prompt(seed=7)
    with a, b:
        r = upload(a, data)
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        body, headers = infer_body(2)  # first as a V2 model, before anything lists it there
        assert b.post(f"/v2/models/{pid}/infer", content=body, headers=headers).status_code == 200
        assert [p["id"] for p in b.get("/v1/prompts").json()["prompts"]] == [pid]
        pngs = _pngs()
        probs_a, _ = predict_probs(a, pid, pngs)
        probs_b, _ = predict_probs(b, pid, pngs)
        assert np.abs(probs_a - probs_b).max() < 1e-6
        with httpx.Client(base_url=replicas[1].url, timeout=30,
                          headers={"X-API-Key": BOB}) as bob:
            assert bob.get(f"/v1/prompts/{pid}").status_code == 404  # still alice's alone
            assert bob.get("/v1/prompts").json()["prompts"] == []
        assert b.delete(f"/v1/prompts/{pid}").status_code == 200
        assert a.get(f"/v1/prompts/{pid}").status_code == 404
        assert a.get("/v1/prompts").json()["prompts"] == []
        assert a.post(f"/v2/models/{pid}/infer", content=body, headers=headers).status_code == 404


def test_a_rate_limit_holds_across_replicas(replicas: list[ServerProcess]) -> None:
    clients = [httpx.Client(base_url=s.url, timeout=30, headers={"X-API-Key": BOB})
               for s in replicas]
    body, headers = infer_body(5)
    admitted = [0, 0]
    refused = 0
    try:
        for i in range(2 * PER_MINUTE // 5 + 4):  # up to 2N images, alternating replicas
            r = clients[i % 2].post(INFER, content=body, headers=headers)
            if r.status_code == 200:
                admitted[i % 2] += 5
            else:
                assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
                refused += 1
        usage = clients[1].get("/v1/usage").json()
    finally:
        for c in clients:
            c.close()
    # one image per second refills: the loop takes seconds, far from another 5-image batch
    assert sum(admitted) == PER_MINUTE and min(admitted) > 0 and refused > 0
    assert usage["images"] == PER_MINUTE and usage["rate_limited"] == refused


def test_redis_down_keeps_inference_and_loses_nothing_acknowledged(
        replicas: list[ServerProcess], redis_server: RedisProcess) -> None:
    url = replicas[0].url
    auth = {"X-API-Key": ALICE}
    with httpx.Client(base_url=url, timeout=60, headers=auth) as http:
        uploaded = [upload(http, random_prompt(seed=20 + i)).json()["id"] for i in range(3)]
        before, _ = predict_probs(http, uploaded[0], _pngs())
        redis_server.stop()
        body, headers = infer_body(3)
        assert http.post(INFER, content=body, headers=headers).status_code == 200
        for r in (http.get("/v1/prompts"), http.get(f"/v1/prompts/{uploaded[0]}"),
                  upload(http, random_prompt(seed=99))):
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) >= 1 and "unavailable" in r.json()["error"]
        ready = http.get("/v2/health/ready")  # the model still answers: ready, and says why not all
        assert ready.status_code == 200 and "redis" in ready.json()["degraded"]
        assert http.get("/v2/models/default/ready").status_code == 200
        redis_server.start()
        listed = [p["id"] for p in http.get("/v1/prompts").json()["prompts"]]
        assert sorted(listed) == sorted(uploaded)
        after, _ = predict_probs(http, uploaded[0], _pngs())
        assert np.abs(after - before).max() < 1e-6
    with httpx.Client(base_url=replicas[1].url, timeout=60, headers=auth) as other:
        assert sorted(p["id"] for p in other.get("/v1/prompts").json()["prompts"]) == sorted(
            uploaded)
        assert other.get("/v2/health/ready").json() == {"ready": True}


def test_concurrent_admits_from_two_ledgers_take_exactly_the_quota(
        redis_server: RedisProcess) -> None:
    ledgers = [open_state(redis_server.url, prompts_dir=None, images_per_minute=None,
                          quota_images=100).ledger for _ in range(2)]
    admitted: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for _ in range(30):
            try:
                ledgers[i % 2].admit("carol", 3)
            except QuotaExhausted:
                continue
            with lock:
                admitted.append(3)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 99  # 33 batches of 3 fit under 100; nothing more, from 4 threads
    report = ledgers[1].report("carol")
    assert report["images"] == 99 and report["quota_remaining"] == 1
    assert report["quota_refused"] == 4 * 30 - 33


def test_a_ledger_over_redis_answers_429_with_retry_after(redis_server: RedisProcess) -> None:
    ledger = open_state(redis_server.url, prompts_dir=None, images_per_minute=6,
                        quota_images=None).ledger
    ledger.admit("dave", 6)
    with pytest.raises(RateLimited) as info:
        ledger.admit("dave", 6)
    assert 1 <= info.value.retry_after <= 60
    with pytest.raises(RateLimited):
        ledger.precheck("dave")


@pytest.mark.parametrize("argv, expected", [
    (["--state", "memcached://x"], "expected --state local or redis://"),
    (["--state", "redis://h:1/zero"], "database number"),
    (["--state", "redis://h:1/0", "--prompts-dir", "p"], "not both"),
])
def test_bad_state_settings_are_one_line_errors(argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_settings(argv)
