"""A scripted Open Inference Protocol (V2) server for the HTTP fault tests.

``FakeV2`` serves the real :class:`server.inference.ModelRunner` (so metadata and scores are
the genuine ones) with ``http.server`` in a background thread on a loopback port, records every
request (arrival time, method, path, headers, body) and lets a test replace any answer: a
``script(request) -> (status, headers, body) | None`` returns a canned reply (429, 5xx, 401, a
wrong shape ...) or ``None`` for the normal behaviour. With ``upstream=URL`` the normal
behaviour is to forward the request to a real server (a counting proxy). Used as a context
manager.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from reprogram.errors import ReprogramError
from reprogram.zoo.registry import load_model
from server.inference import HTTPStatusError, ModelRunner
from server.routes_v2 import run_infer
from server.settings import OutputKind

Reply = tuple[int, dict[str, str], bytes]
_model = functools.lru_cache(maxsize=1)(load_model)


@dataclass
class Seen:
    """One request as the server received it."""

    t: float
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    index: int = 0  # position among the requests to the same path kind ("meta" / "infer")
    kind: str = field(default="other")


def error(status: int, message: str, **headers: str) -> Reply:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(
        {"error": message}).encode()


def json_reply(obj: Any, status: int = 200) -> Reply:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


class _Server(ThreadingHTTPServer):
    """Threads per connection, and the connections remembered so that a stop closes them."""

    daemon_threads = True

    def __init__(self, *args: Any) -> None:
        self.connections: set[socket.socket] = set()
        super().__init__(*args)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        self.connections.add(conn)
        return conn, addr

    def drop_connections(self) -> None:
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.connections.clear()


class FakeV2:
    """``with FakeV2(script=...) as fake: HttpOracle(fake.url)``; ``fake.seen`` lists requests."""

    def __init__(
        self,
        *,
        output: str = "probs",
        max_images: int = 4096,
        script: Callable[[Seen], Reply | None] | None = None,
        metadata: dict[str, Any] | None = None,
        name: str | None = None,
        listing: str = "v1",
        upstream: str | None = None,
    ) -> None:
        self.runner = ModelRunner(_model("default"), output=OutputKind.parse(output),
                                  max_images=max_images, name=name)
        self.listing = listing  # how the server lists its models: "v1", "v2" (Triton) or "none"
        # a fresh upstream connection per request: a server that fails a body it could not read
        # may drop that connection, and a reused one would then reset the next request
        self.upstream = httpx.Client(base_url=upstream, timeout=60,
                                     limits=httpx.Limits(max_keepalive_connections=0),
                                     ) if upstream else None
        self.script = script
        self.metadata = metadata
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, out = fake.answer(self.command, self.path,
                                                   dict(self.headers.items()), body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _handle

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ------------------------------------------------------------------ behaviour
    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        kind = "infer" if path.endswith("/infer") else "meta" if "/models/" in path else "other"
        with self._lock:
            seen = Seen(time.monotonic(), method, path, {k.lower(): v for k, v in
                                                         headers.items()}, body, kind=kind)
            seen.index = sum(1 for s in self.seen if s.kind == kind)
            self.seen.append(seen)
        if self.script is not None:
            canned = self.script(seen)
            if canned is not None:
                return canned
        return self.normal(seen)

    def normal(self, seen: Seen) -> Reply:
        if self.upstream is not None:
            return self.forward(seen)
        name = self.runner.name
        if seen.method == "GET" and seen.path == "/v2":  # as our server: binary tensors
            return json_reply({"name": "fake", "extensions": ["binary_tensor_data"]})
        if self.listing == "v1" and seen.method == "GET" and seen.path == "/v1/models":
            return json_reply({"models": [name]})
        if (self.listing == "v2" and seen.method == "POST"
                and seen.path == "/v2/repository/index"):
            return json_reply([{"name": "loading", "state": "LOADING"},
                               {"name": name, "version": "1", "state": "READY"}])
        if seen.method == "GET" and seen.path == f"/v2/models/{name}":
            meta = self.metadata or self.runner.metadata().model_dump(exclude_none=True)
            return json_reply(meta)
        if seen.method == "POST" and seen.path == f"/v2/models/{name}/infer":
            try:
                out, headers = run_infer(self.runner, seen.body, seen.headers)
            except HTTPStatusError as exc:
                return error(exc.status_code, str(exc))
            except ReprogramError as exc:
                return error(400, str(exc))
            return 200, headers, out
        return error(404, f"unknown route {seen.method} {seen.path}")

    def forward(self, seen: Seen) -> Reply:
        assert self.upstream is not None
        drop = {"host", "content-length", "connection", "accept-encoding"}
        try:
            r = self.upstream.request(seen.method, seen.path, content=seen.body, headers={
                k: v for k, v in seen.headers.items() if k not in drop})
        except httpx.TransportError as exc:
            return error(502, f"upstream: {exc}")
        keep = {"content-type", "retry-after", "inference-header-content-length"}
        return r.status_code, {k: v for k, v in r.headers.items() if k.lower() in keep}, r.content

    # ------------------------------------------------------------------ accounting
    def requests(self, kind: str = "infer") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.kind == kind]

    def __enter__(self) -> FakeV2:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.drop_connections()  # keep-alive clients see the server gone, as a crash
        self._thread.join(timeout=5)
        if self.upstream is not None:
            self.upstream.close()
