"""Faults and abuse against real ``reprogram-server`` processes on loopback.

SIGTERM while requests are in flight: readiness turns false, every request completes, exit 0.
``kill -9`` during prompt uploads: after a restart every acknowledged prompt is whole and its
owner intact, the interrupted one absent, nothing half-written. A 100 MB body, a 10,000-image
request, a deeply nested JSON, a gzip bomb and PNG decompression bombs each get a 4xx within
seconds, with the server's peak memory bounded, and it keeps serving. A fit through a rate
limit waits for ``Retry-After`` and completes within its budget.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from ops_support import http_head, infer_body, memory_kib, raw_request, read_response
from prompt_support import ServerProcess, model_server, png, random_prompt

from reprogram import protocol
from reprogram.config import recommended_config
from reprogram.data import load_digits
from reprogram.fit import fit
from reprogram.http_oracle import HttpOracle
from server.prompt_store import prompt_id

pytestmark = pytest.mark.slow

INFER = "/v2/models/default/infer"
ALICE = "alice-live-key-0123456789"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _serving(url: str, headers: dict[str, str] | None = None) -> None:
    """The server is ready and answers a good inference."""
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    body, h = infer_body(4)
    r = httpx.post(f"{url}{INFER}", content=body, headers={**h, **(headers or {})}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    proc = model_server("--drain-seconds", "1", "--shutdown-timeout", "20")
    proc.start()
    yield proc
    proc.stop()


def test_sigterm_drains_in_flight_requests_and_exits_0(server: ServerProcess) -> None:
    assert server.proc is not None
    body, headers = infer_body(16)
    head = http_head("POST", INFER, {**headers, "Content-Length": str(len(body))})
    socks = [socket.create_connection(("127.0.0.1", _port(server.url)), timeout=30)
             for _ in range(6)]
    for sock in socks:  # headers and half of each body: six requests in flight
        sock.sendall(head + body[: len(body) // 2])
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    r = httpx.get(f"{server.url}/v2/health/ready", timeout=5)
    assert r.status_code == 503 and r.json() == {"ready": False, "reason": "shutting down"}
    for sock in socks:
        sock.sendall(body[len(body) // 2:])
    answers = [read_response(sock) for sock in socks]
    for sock in socks:
        sock.close()
    for status, content in answers:
        assert status == 200, content[:200]
    assert server.proc.wait(timeout=30) == 0
    assert "Traceback" not in server.output()


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "reprogram-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\";"
            f" filename=\"p.safetensors\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_kill_9_during_uploads_keeps_prompts_whole(tmp_path: Path) -> None:
    folder = tmp_path / "prompts"
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{ALICE}\n")
    auth = {"X-API-Key": ALICE}
    server = model_server("--prompts-dir", str(folder), "--api-keys-file", str(keys))
    url = server.start()
    try:
        prompts = [random_prompt(seed=100 + i) for i in range(40)]
        acknowledged: list[str] = []
        problems: list[str] = []

        def uploader() -> None:  # back-to-back uploads until the server dies
            with httpx.Client(base_url=url, timeout=10, headers=auth) as http:
                for data in prompts[1:]:
                    try:
                        r = http.post("/v1/prompts", files={"file": ("p.safetensors", data)})
                    except httpx.TransportError:
                        return
                    if r.status_code != 201:
                        problems.append(r.text)
                        return
                    acknowledged.append(r.json()["id"])

        slow, content_type = _multipart(prompts[0])  # one upload stalls mid-body
        sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=10)
        sock.sendall(http_head("POST", "/v1/prompts", {
            "Content-Type": content_type, "Content-Length": str(len(slow)), **auth})
            + slow[: len(slow) // 2])
        thread = threading.Thread(target=uploader)
        thread.start()
        deadline = time.monotonic() + 20
        while len(acknowledged) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.proc is not None
        server.proc.kill()  # SIGKILL, in the middle of the uploads
        server.proc.wait(timeout=10)
        thread.join(timeout=20)
        sock.close()
        assert len(acknowledged) >= 5 and not problems, problems
        url = server.start()  # restart on the same folder
        with httpx.Client(base_url=url, timeout=10, headers=auth) as http:
            listed = {p["id"] for p in http.get("/v1/prompts").json()["prompts"]}
            assert set(acknowledged) <= listed  # every acknowledged upload survived
            ids = {Path(p).stem for p in folder.glob("*.safetensors")}
            assert listed == ids  # and every file on disk is a whole, valid prompt
            assert not [p for p in folder.iterdir() if p.name.startswith(".upload-")]
            for pid in ids:
                owners = json.loads((folder / f"{pid}.owners.json").read_text())
                assert owners == ["alice"]
            assert prompt_id(prompts[0]) not in listed  # the stalled upload is absent
            image = png(np.zeros((3, 20, 20), np.uint8))
            for pid in sorted(ids)[:3]:
                r = http.post(f"/v1/prompts/{pid}/predict",
                              files=[("files", ("a.png", image, "image/png"))])
                assert r.status_code == 200, r.text
        assert "skipping prompt file" not in server.output()
    finally:
        server.stop()


def _png_bomb(side: int) -> bytes:
    """A grayscale PNG of side x side black pixels: tiny on the wire, side**2 bytes inflated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")

    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row * 256) for _ in range(side // 256)) + packer.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def _gzip_zeros(n: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    return b"".join(packer.compress(block) for _ in range(n >> 20)) + packer.flush()


def test_abuse_gets_4xx_quickly_in_bounded_memory(tmp_path: Path) -> None:
    server = model_server()
    url = server.start()
    assert server.proc is not None
    pid = server.proc.pid
    try:
        _serving(url)
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post("/v1/prompts", files={"file": ("p.safetensors", random_prompt())})
            prompt = r.json()["id"]
        before = memory_kib(pid)
        port = _port(url)
        cases: list[tuple[str, int, bytes]] = []

        def timed(name: str, fn: object) -> None:
            start = time.perf_counter()
            status, content = fn()  # type: ignore[operator]
            cases.append((name, status, content))
            assert 400 <= status < 500, (name, status, content[:300])
            assert time.perf_counter() - start < 10.0, name
            _serving(url)

        timed("100 MB body", lambda: raw_request(port, http_head("POST", INFER, {
            "Content-Type": "application/octet-stream", "Content-Length": str(100 << 20)}), []))
        many, many_headers = protocol.encode_request(
            {"image": np.zeros((10_000, 3, 32, 32), np.uint8)}, binary=True)
        timed("10,000 images", lambda: _post(url, INFER, content=many, headers=many_headers))
        timed("nested JSON", lambda: _post(url, INFER, content=b"[" * (2 << 20)))
        bomb = _gzip_zeros(200 << 20)
        timed("gzip bomb", lambda: _post(url, INFER, content=bomb, headers={
            "Content-Encoding": "gzip", "Content-Type": "application/json"}))
        image = _png_bomb(20_480)  # 420 M pixels in about 400 kB
        files = [("files", ("bomb.png", image, "image/png"))]
        timed("PNG bomb /v1", lambda: _post(url, "/v1/models/default/predict", files=files))
        timed("PNG bomb prompt", lambda: _post(url, f"/v1/prompts/{prompt}/predict",
                                               files=files))
        after = memory_kib(pid)
    finally:
        server.stop()
    assert [(n, s) for n, s, _ in cases] == [
        ("100 MB body", 413), ("10,000 images", 413), ("nested JSON", 413), ("gzip bomb", 413),
        ("PNG bomb /v1", 413), ("PNG bomb prompt", 413)]
    for _, _, content in cases:
        assert set(json.loads(content)) == {"error"}
    grown_mb = (after["VmHWM"] - before["VmHWM"]) / 1024
    assert grown_mb < 400, f"peak RSS grew by {grown_mb:.0f} MB"


def _post(url: str, path: str, **kwargs: object) -> tuple[int, bytes]:
    r = httpx.post(f"{url}{path}", timeout=60, **kwargs)  # type: ignore[arg-type]
    return r.status_code, r.content


def test_rate_limited_fit_waits_and_completes_within_budget(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{ALICE}\n")
    per_minute = 3000  # 50 images/s: the fit below asks faster than that however busy we are
    server = model_server("--api-keys-file", str(keys), "--images-per-minute", str(per_minute))
    url = server.start()
    threads = torch.get_num_threads()
    try:
        r = httpx.get(f"{url}/v2/models/default", timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        with HttpOracle(url, api_key=ALICE) as drain:  # empty the bucket first: the fit's first
            drain.query(torch.zeros(per_minute, 3, 32, 32))  # requests must wait, not race it
        cfg = recommended_config("rgf", labelmap="linear", batch_size=16, q=5, budget=1000,
                                 seed=1)
        torch.set_num_threads(1)
        with HttpOracle(url, api_key=ALICE) as oracle:
            result = fit(cfg, oracle, load_digits())
            retries = oracle.retries
        usage = httpx.get(f"{url}/v1/usage", headers={"X-API-Key": ALICE}, timeout=10).json()
    finally:
        torch.set_num_threads(threads)
        server.stop()
    assert retries >= 1 and usage["rate_limited"] >= 1  # it was throttled, and waited
    assert result.queries["images"] <= 1000 and result.test_accuracy is not None
    assert usage["images"] == per_minute + result.queries["images"] + result.queries["test_images"]


def test_png_bomb_helper_is_a_real_bomb() -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(_png_bomb(512)))
    assert image.size == (512, 512)
    image.load()
