"""Hostile requests for ``bench.load``: each one at one of the server's limits.

:data:`KINDS` lists them with the statuses they must get; :func:`hostile_client` sends them
in turn on its own connections until told to stop, and records what came back. Some go
through httpx, the rest over raw sockets (bytes httpx will not send: a half body, a
disconnect, a latin-1 header value, a made-up method). :data:`SERVER_ARGS` are the limits the
load server runs with for them: the defaults, except a 2 s ``--body-timeout`` (so the
half-sent bodies end within the run) and a 256 KiB ``--max-response-bytes`` (the default
model's answers never reach the default 64 MiB cap otherwise).
"""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import numpy as np
import torch
from PIL import Image

from reprogram import protocol
from reprogram.artifact import Prompt, dump_prompt
from reprogram.labelmaps import LabelMapSpec
from reprogram.programs import ProgramSpec
from reprogram.zoo.registry import load_model
from server.settings import Settings

INFER = "/v2/models/default/infer"
SERVER_ARGS = ["--body-timeout", "2", "--max-response-bytes", str(256 * 1024)]
DEFAULTS = Settings()


@dataclass
class Seen:
    """Statuses per hostile kind, and the answers that were not what they should be."""

    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)

    def record(self, kind: str, status: int, expected: frozenset[int]) -> None:
        self.statuses.setdefault(kind, Counter())[status] += 1
        if status not in expected:
            self.wrong.append(f"{kind}: HTTP {status}, expected one of {sorted(expected)}")

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())


async def _raw(port: int, head: bytes, body: bytes = b"", *, hang_up: bool = False) -> int:
    """Send bytes on a fresh connection; the status of the answer (0 after ``hang_up``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        if hang_up:
            return 0
        line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
        return int(line.split(b" ", 2)[1])
    finally:
        writer.close()


def _head(method: str, path: str, length: int, extra: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
            .encode() + extra + b"\r\n")


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 160, 30)).save(buf, format="PNG")
    return buf.getvalue()


def forged_prompt() -> bytes:
    """A prompt with a valid digest declaring a 10^6 x 10^6 frame (nothing may be built)."""
    source = dict(load_model().meta.fingerprint())
    return dump_prompt(Prompt(
        program=ProgramSpec(kind="full", frame_size=(10**6, 10**6), inner_size=16,
                            resolution=8),
        labelmap=LabelMapSpec(kind="linear", num_source=10, num_target=10),
        tensors={"program.theta": torch.zeros(3, 8, 8), "labelmap.weight": torch.zeros(10, 10),
                 "labelmap.bias": torch.zeros(10)},
        target_classes=tuple(str(i) for i in range(10)), source=source))


@dataclass(frozen=True)
class Bodies:
    """The payloads, made once."""

    half: tuple[bytes, dict[str, str]]
    many_values: bytes
    many_images: tuple[bytes, dict[str, str]]
    json_answer: tuple[bytes, dict[str, str]]
    repeated: tuple[bytes, dict[str, str]]
    pngs: list[tuple[str, tuple[str, bytes, str]]]
    prompt: bytes

    @classmethod
    def make(cls) -> Bodies:
        zeros = np.zeros((1, 3, 32, 32), np.uint8)
        body, headers = protocol.encode_request({"image": zeros}, binary=True)
        n = int(headers[protocol.HEADER_LENGTH])
        request = json.loads(body[:n])
        request["outputs"] = [{"name": "probs", "parameters": {"classification": 10}}] * 3000
        head = json.dumps(request).encode()
        values = DEFAULTS.max_json_elements + 1
        many_values = json.dumps({"inputs": [{"name": "image", "shape": [values],
                                              "datatype": "UINT8", "data": [0] * values}]})
        side = int((DEFAULTS.max_request_pixels * 0.6) ** 0.5)  # two of them: over the cap
        png = _png(side)
        return cls(
            half=protocol.encode_request({"image": np.zeros((8, 3, 32, 32), np.uint8)}),
            many_values=many_values.encode(),
            many_images=protocol.encode_request({"image": np.zeros(
                (DEFAULTS.max_images_per_request + 1, 3, 32, 32), np.uint8)}),
            json_answer=protocol.encode_request({"image": np.zeros(
                (DEFAULTS.max_images_per_request, 3, 32, 32), np.uint8)}, binary_output=False),
            repeated=(head + body[n:], {protocol.HEADER_LENGTH: str(len(head))}),
            pngs=[("files", (f"{i}.png", png, "image/png")) for i in range(2)],
            prompt=forged_prompt())


Send = Callable[[httpx.AsyncClient, int, Bodies], Awaitable[int]]


async def _post(http: httpx.AsyncClient, path: str, **kwargs: object) -> int:
    return (await http.post(path, **kwargs)).status_code  # type: ignore[arg-type]


async def _half_body(http: httpx.AsyncClient, port: int, b: Bodies) -> int:
    body, headers = b.half
    extra = f"{protocol.HEADER_LENGTH}: {headers[protocol.HEADER_LENGTH]}\r\n".encode()
    return await _raw(port, _head("POST", INFER, len(body), extra), body[: len(body) // 2])


async def _hang_up(http: httpx.AsyncClient, port: int, b: Bodies) -> int:
    body, _ = b.half
    return await _raw(port, _head("POST", INFER, len(body)), body[:100], hang_up=True)


KINDS: dict[str, tuple[frozenset[int], Send]] = {
    "body over --max-body-bytes": (frozenset({413}), lambda h, p, b: _raw(
        p, _head("POST", INFER, DEFAULTS.max_body_bytes + 1))),
    "JSON past --max-json-depth": (frozenset({413}), lambda h, p, b: _post(
        h, INFER, content=b"[" * 100_000)),
    "JSON past --max-json-elements": (frozenset({413}), lambda h, p, b: _post(
        h, INFER, content=b.many_values)),
    "images past --max-images": (frozenset({413}), lambda h, p, b: _post(
        h, INFER, content=b.many_images[0], headers=b.many_images[1])),
    "pixels past --max-request-pixels": (frozenset({413}), lambda h, p, b: _post(
        h, "/v1/models/default/predict", files=b.pngs)),
    "answer past --max-response-bytes": (frozenset({413}), lambda h, p, b: _post(
        h, INFER, content=b.json_answer[0], headers=b.json_answer[1])),
    "the same output 3000 times": (frozenset({400}), lambda h, p, b: _post(
        h, INFER, content=b.repeated[0], headers=b.repeated[1])),
    "zero-size shape, huge dimensions": (frozenset({400}), lambda h, p, b: _post(
        h, INFER, json={"inputs": [{"name": "image", "shape": [2**63, 0, 32, 32],
                                    "datatype": "UINT8", "data": []}]})),
    "non-ASCII header number": (frozenset({400}), lambda h, p, b: _raw(
        p, _head("POST", INFER, 2, protocol.HEADER_LENGTH.encode() + b": \xb2\r\n"), b"{}")),
    "made-up method": (frozenset({405}), lambda h, p, b: _raw(
        p, _head("BREW", "/v2/models/default", 0))),
    "forged prompt (10^6 x 10^6 frame)": (frozenset({400, 422}), lambda h, p, b: _post(
        h, "/v1/prompts", files={"file": ("p.safetensors", b.prompt)})),
    "half a body, then silence": (frozenset({408}), _half_body),
    "disconnect mid-body": (frozenset({0}), _hang_up),
}


async def hostile_client(base: str, port: int, bodies: Bodies, stop: asyncio.Event,
                         seen: Seen, offset: int = 0) -> None:
    """Send the hostile kinds in turn (starting at ``offset``) until ``stop`` is set, and at
    least once each."""
    names = list(KINDS)
    i = offset
    async with httpx.AsyncClient(base_url=base, timeout=120.0) as http:
        while i < offset + len(names) or not stop.is_set():
            name = names[i % len(names)]
            expected, send = KINDS[name]
            try:
                status = await send(http, port, bodies)
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as exc:
                seen.wrong.append(f"{name}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)
            else:
                seen.record(name, status, expected)
            i += 1

