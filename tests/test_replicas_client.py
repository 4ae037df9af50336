"""``HttpOracle`` over a replicated endpoint: two real ``reprogram-server`` processes.

``--endpoint URL1,URL2`` sends requests to both replicas in turn; a black-box fit through
them ends with the same parameters as through one server (same seed: the replicas serve the
same deterministic model); killing one replica mid-fit, the fit completes on the other, again
with the same parameters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from prompt_support import ServerProcess, model_server

from reprogram.config import recommended_config
from reprogram.data import load_digits
from reprogram.errors import ConfigError
from reprogram.fit import FitResult, fit
from reprogram.http_oracle import HttpOracle
from reprogram.http_transport import replica_urls

pytestmark = pytest.mark.slow

BUDGET = 2400


@pytest.fixture
def replicas() -> Iterator[list[ServerProcess]]:
    servers = [model_server() for _ in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _fit(url: str) -> FitResult:
    cfg = recommended_config("rgf", labelmap="linear", batch_size=16, q=5, budget=BUDGET, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with HttpOracle(url) as oracle:
            return fit(cfg, oracle, load_digits())
    finally:
        torch.set_num_threads(threads)


def _images(url: str) -> int:
    return int(httpx.get(f"{url}/v1/usage", timeout=10).json()["images"])


def _same(a: FitResult, b: FitResult) -> None:
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(),
                                 strict=True):
        assert torch.allclose(x, y, atol=1e-6), name
    assert a.best_val_accuracy == b.best_val_accuracy


def test_a_fit_spreads_over_replicas_and_survives_one_dying(
        replicas: list[ServerProcess]) -> None:
    a, b = (s.url for s in replicas)
    alone = _fit(a)
    used = _images(a)
    spread = _fit(f"{a},{b}")
    on_a, on_b = _images(a) - used, _images(b)
    assert on_a > 0.3 * (on_a + on_b) and on_b > 0.3 * (on_a + on_b)  # both did their share
    _same(alone, spread)

    results: list[FitResult] = []
    worker = threading.Thread(target=lambda: results.append(_fit(f"{a},{b}")))
    before = _images(b)
    worker.start()
    deadline = time.monotonic() + 60
    while _images(b) - before < BUDGET // 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert replicas[1].proc is not None and worker.is_alive()
    replicas[1].proc.kill()  # SIGKILL one replica mid-fit
    worker.join(timeout=300)
    assert results, "the fit did not finish after a replica died"
    _same(alone, results[0])


@pytest.mark.parametrize("url", ["http://a:1,ftp://b", "http://a:1,http://a:1"])
def test_bad_replica_lists_are_one_line_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        replica_urls(url)
