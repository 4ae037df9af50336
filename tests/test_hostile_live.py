"""Hostile input against a real ``reprogram-server`` process (uvicorn, h11, real sockets).

What only the HTTP stack shows: header numbers sent as raw bytes (a latin-1 superscript two
passes ``str.isdigit``), made-up methods from unauthenticated clients (no new metrics
labels), a body that stops halfway (408 after ``--body-timeout``, connection closed), a client
that disconnects mid-body (logged as 499, no traceback), shapes and forged artifacts through
the real stack (4xx, and the process's peak memory does not move).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ops_support import http_head, infer_body, memory_kib, read_response
from prompt_support import ServerProcess, model_server
from test_hostile import FORGERIES

from reprogram import protocol

pytestmark = pytest.mark.slow

KEY = "hostile-key-0123456789abcdef"
AUTH = {"X-API-Key": KEY}
INFER = "/v2/models/default/infer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(f"tester:{KEY}\n")
    proc = model_server("--api-keys-file", str(keys), "--body-timeout", "1.5",
                        "--prompts-dir", str(tmp_path_factory.mktemp("prompts")))
    proc.start()
    yield proc
    proc.stop()


def _port(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _send(server: ServerProcess, head: bytes, body: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as sock:
        sock.sendall(head + body)
        return read_response(sock)


def test_header_numbers_as_raw_bytes(server: ServerProcess) -> None:
    body, _ = infer_body(1)
    for value in (b"\xb2", b"\xb9\xb2", b"1\xb2", b"+12", b"12 34"):
        head = http_head("POST", INFER, {**AUTH, "Content-Length": str(len(body))})
        head = head.replace(b"\r\n\r\n", b"\r\nInference-Header-Content-Length: " + value +
                            b"\r\n\r\n")
        status, content = _send(server, head, body)
        assert status == 400, (value, content)
        assert "ASCII digits" in json.loads(content)["error"] or "between" in json.loads(
            content)["error"]
    head = http_head("POST", INFER, AUTH).replace(b"\r\n\r\n", b"\r\nContent-Length: \xb2\r\n\r\n")
    status, _ = _send(server, head, b"")
    assert status == 400  # refused by the HTTP parser itself


def test_zero_size_shape_through_the_stack(server: ServerProcess) -> None:
    request = {"inputs": [{"name": "image", "shape": [2**63, 0, 32, 32], "datatype": "UINT8",
                           "data": []}]}
    r = httpx.post(server.url + INFER, json=request, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "shape" in r.json()["error"]


def _metrics(server: ServerProcess) -> str:
    return httpx.get(server.url + "/metrics", headers=AUTH, timeout=30).text


def test_made_up_methods_add_no_metrics_labels(server: ServerProcess) -> None:
    port = _port(server)
    for i in range(3):  # the first OTHER, 401 series exist afterwards
        _raw(port, f"XWARM{i}")
    before = len(_metrics(server))
    for i in range(300):
        assert _raw(port, f"M{i:04X}Z") == 401
    text = _metrics(server)
    assert 'method="OTHER"' in text and "M00" not in text
    assert len(text) - before < 2000, len(text) - before


def _raw(port: int, method: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(http_head(method, "/v2/models/default", {"Content-Length": "0"}))
        return read_response(sock)[0]


def test_half_sent_body_gets_408_and_the_connection_closes(server: ServerProcess) -> None:
    body, headers = infer_body(4)
    head = http_head("POST", INFER, {**AUTH, **headers, "Content-Length": str(len(body))})
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as sock:
        sock.sendall(head + body[: len(body) // 2])
        status, content = read_response(sock)
        waited = time.perf_counter() - start
        sock.settimeout(10)
        assert sock.recv(1) == b""  # closed by the server
    assert status == 408, content
    error = json.loads(content)["error"]
    assert "within 1.5 s (--body-timeout)" in error and f"got {len(body) // 2} bytes" in error
    assert 1.4 < waited < 15


def test_disconnect_mid_body_is_logged_as_499(server: ServerProcess) -> None:
    body, headers = infer_body(4)
    head = http_head("POST", INFER, {**AUTH, **headers, "Content-Length": str(len(body))})
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as sock:
        sock.sendall(head + body[:1000])
        time.sleep(0.3)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in server.output().splitlines()
                 if line.startswith('{"ts"')]
        if any(x["status"] == 499 for x in lines):
            break
        time.sleep(0.2)
    assert [x["route"] for x in lines if x["status"] == 499] == [
        "/v2/models/{model_name}/infer"]
    output = server.output()
    assert "Traceback" not in output and "Exception in ASGI application" not in output
    assert '"status":500' not in output


def test_forged_artifacts_through_the_stack_in_bounded_memory(server: ServerProcess,
                                                              tmp_path: Path) -> None:
    pid = server.proc.pid if server.proc is not None else 0
    before = memory_kib(pid)["VmHWM"]
    for name, data in sorted(FORGERIES.items()):
        r = httpx.post(server.url + "/v1/prompts", files={"file": ("p", data)}, headers=AUTH,
                       timeout=60)
        assert r.status_code in (400, 422), (name, r.text)
        assert set(r.json()) == {"error"}
    grown = (memory_kib(pid)["VmHWM"] - before) / 1024
    assert grown < 100, f"peak RSS grew by {grown:.0f} MB"
    r = httpx.post(server.url + INFER, content=b"[" * 100_000, headers=AUTH, timeout=30)
    assert r.status_code == 413 and protocol.HEADER_LENGTH not in r.text
