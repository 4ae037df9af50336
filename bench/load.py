"""Load test: many concurrent clients sending V2 binary requests to one server process.

``python -m bench.load`` starts ``reprogram-server`` on a free loopback port (access log on,
as in production), opens ``--clients`` concurrent keep-alive connections (asyncio + httpx) and
has each send ``--requests`` V2 binary requests of ``--batch`` uint8 images (different images
per client), after one warm-up request per client. It prints the error count, latency
percentiles (p50, p90, p99, max), requests/s and images/s, and checks every answer (status
200, ``probs`` of shape ``[batch, classes]``, each row summing to 1). Exit status 1 if any
request failed. Defaults: 16 clients x 200 requests x batch 32. Loopback only; bounded loops.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np

from bench.common import server_process
from reprogram import protocol


@dataclass
class Tally:
    """What the clients saw."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _check(response: httpx.Response, batch: int) -> str | None:
    """None when the answer is right, else what is wrong."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    try:
        out, _ = protocol.decode_response(response.content, response.headers)
    except Exception as exc:  # any undecodable answer is an error to report
        return f"undecodable answer: {exc}"
    probs = out.get("probs")
    if probs is None or probs.ndim != 2 or probs.shape[0] != batch:
        return f"expected probs [{batch}, K], got {None if probs is None else probs.shape}"
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        return "probabilities do not sum to 1"
    return None


async def _client(http: httpx.AsyncClient, body: bytes, headers: dict[str, str], batch: int,
                  requests: int, tally: Tally) -> None:
    """Send ``requests`` requests one after the other, recording latency and problems."""
    for _ in range(requests):
        start = time.perf_counter()
        try:
            response = await http.post("/v2/models/default/infer", content=body,
                                       headers=headers)
            problem = _check(response, batch)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        tally.latencies.append(time.perf_counter() - start)
        if problem is not None:
            tally.errors.append(problem)


async def _drive(base: str, clients: int, requests: int, batch: int) -> tuple[Tally, float]:
    """Warm every connection up (one request each, untimed), then time the load."""
    rng = np.random.default_rng(0)
    bodies = [protocol.encode_request(
        {"image": rng.integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)},
        [protocol.RequestedOutput.make("probs", binary_data=True)], binary=True)
        for _ in range(clients)]
    warm, tally = Tally(), Tally()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120.0, limits=limits) as http:
        await asyncio.gather(*[_client(http, b, h, batch, 1, warm) for b, h in bodies])
        start = time.perf_counter()
        await asyncio.gather(*[_client(http, b, h, batch, requests, tally) for b, h in bodies])
        wall = time.perf_counter() - start
    tally.errors += warm.errors
    return tally, wall


def report(tally: Tally, wall: float, clients: int, requests: int, batch: int) -> str:
    """The printed result."""
    lat = np.array(tally.latencies) * 1000.0
    done = len(tally.latencies)
    p50, p90, p99 = np.percentile(lat, [50, 90, 99]) if done else (0.0, 0.0, 0.0)
    lines = [
        f"load: {clients} clients x {requests} requests x batch {batch} (V2 binary uint8,"
        f" default model), one server process, loopback, {os.cpu_count()} CPUs",
        f"requests {done}, errors {len(tally.errors)}, wall {wall:.1f} s",
        f"latency ms: p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}  max {lat.max():.1f}"
        if done else "latency ms: -",
        f"throughput: {done / wall:.1f} requests/s, {done * batch / wall:.0f} images/s",
    ]
    lines += [f"error: {e}" for e in sorted(set(tally.errors))[:5]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=200, help="timed requests per client")
    p.add_argument("--batch", type=int, default=32, help="images per request")
    args = p.parse_args(argv)
    if min(args.clients, args.requests) < 1 or not 1 <= args.batch <= 4096:
        p.error("expected --clients >= 1, --requests >= 1 and --batch in 1..4096")
    with server_process(["--max-batch", "256"]) as base:
        tally, wall = asyncio.run(_drive(base, args.clients, args.requests, args.batch))
    print(report(tally, wall, args.clients, args.requests, args.batch))
    return 1 if tally.errors else 0


if __name__ == "__main__":
    sys.exit(main())
