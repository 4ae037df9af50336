"""Helpers for the hardening tests: an in-process client, raw sockets, process memory."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI

from reprogram import protocol


class AsgiClient:
    """A synchronous facade over ``httpx.AsyncClient`` + ``ASGITransport`` (no network);
    ``client`` is the peer address the app sees."""

    def __init__(self, app: FastAPI, client: tuple[str, int] = ("127.0.0.1", 5000)) -> None:
        self.app = app
        self.client = client

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, client=self.client)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await c.request(method, url, **kwargs)

        return asyncio.run(go())

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)


def infer_body(n: int = 2, size: int = 32) -> tuple[bytes, dict[str, str]]:
    """A V2 binary request of ``n`` black uint8 images."""
    x = np.zeros((n, 3, size, size), np.uint8)
    return protocol.encode_request({"image": x}, binary=True, binary_output=True)


def raw_request(port: int, head: bytes, body_parts: list[bytes], timeout: float = 30.0,
                pause: float = 0.0) -> tuple[int, bytes]:
    """Send ``head`` and the body parts on a fresh loopback socket; return (status, body).

    Sending stops early when the server closes the connection (e.g. after an early 413).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
            if pause:
                time.sleep(pause)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response (Content-Length framed) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, rest


def http_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    """The request line and headers of an HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in
                                                            headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of process ``pid`` in KiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out
