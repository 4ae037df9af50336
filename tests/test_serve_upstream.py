"""``reprogram serve --endpoint``: how an upstream's failures reach the server's own clients.

A real ``reprogram serve`` process proxies a scripted V2 server (``FakeV2``, the genuine model
runner on a loopback port). When the upstream does not answer in time its clients get 504, when
it is gone 503, each with a one-line error of ours and within seconds; the proxy itself stays
up, and serves again once the upstream does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fake_v2 import FakeV2, Reply, Seen
from prompt_support import ServerProcess, png, prompt_id, random_prompt, serve_process

pytestmark = pytest.mark.slow

TIMEOUT_S = 1.0  # --endpoint-timeout
SLOW = {"on": False}


def _slow_infer(seen: Seen) -> Reply | None:
    if SLOW["on"] and seen.kind == "infer":
        time.sleep(3 * TIMEOUT_S)
    return None


@pytest.fixture(scope="module")
def prompt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upstream") / "p.safetensors"
    path.write_bytes(random_prompt())
    return path


@pytest.fixture
def upstream() -> Iterator[FakeV2]:
    SLOW["on"] = False
    with FakeV2(script=_slow_infer) as fake:
        yield fake


@pytest.fixture
def served(upstream: FakeV2, prompt: Path) -> Iterator[ServerProcess]:
    proc = serve_process("--prompt", str(prompt), "--endpoint", upstream.url,
                         "--endpoint-timeout", str(TIMEOUT_S))
    proc.start()
    yield proc
    proc.stop()


def _predict(served: ServerProcess, prompt: Path) -> tuple[httpx.Response, float]:
    files = [("files", ("a.png", png(np.zeros((1, 8, 8), np.uint8)), "image/png"))]
    t0 = time.monotonic()
    r = httpx.post(f"{served.url}/v1/prompts/{prompt_id(prompt.read_bytes())}/predict",
                   files=files, timeout=60)
    return r, time.monotonic() - t0


def _one_line(r: httpx.Response, status: int, start: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    text = r.json()["error"]
    assert "\n" not in text and "Traceback" not in text and text.startswith(start), text


def test_an_upstream_that_does_not_answer_in_time_is_a_504(served: ServerProcess,
                                                            prompt: Path) -> None:
    r, _ = _predict(served, prompt)
    assert r.status_code == 200, r.text
    SLOW["on"] = True
    r, seconds = _predict(served, prompt)
    _one_line(r, 504, "the upstream model server did not answer in time")
    assert seconds < 15  # bounded retries (SERVE_RETRY's deadline), not a hang
    SLOW["on"] = False
    r, _ = _predict(served, prompt)
    assert r.status_code == 200, r.text  # the proxy is still up and serves again


def test_an_upstream_that_is_gone_is_a_503(upstream: FakeV2, served: ServerProcess,
                                           prompt: Path) -> None:
    upstream.__exit__(None, None, None)  # the upstream server stops listening
    r, seconds = _predict(served, prompt)
    _one_line(r, 503, "the upstream model server is unavailable")
    assert seconds < 15
    assert httpx.get(f"{served.url}/v2/health/live", timeout=10).status_code == 200


def test_a_bad_endpoint_timeout_is_a_one_line_error(prompt: Path) -> None:
    import subprocess

    from prompt_support import cli_command

    r = subprocess.run([*cli_command(), "serve", "--prompt", str(prompt), "--endpoint",
                        "http://127.0.0.1:9", "--endpoint-timeout", "0"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--endpoint-timeout" in lines[0], r.stderr
