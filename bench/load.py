"""Load test: many concurrent clients sending V2 binary requests to one server process, alone
and beside hostile clients.

``python -m bench.load`` starts ``reprogram-server`` on a free loopback port (access log on,
as in production; the limits of :data:`bench.hostile.SERVER_ARGS`), opens ``--clients``
concurrent keep-alive connections (asyncio + httpx) and has each send ``--requests`` V2
binary requests of ``--batch`` uint8 images (different images per client), after one warm-up
request per client. It does this twice in one run: first the good clients alone, then the
same good clients beside ``--hostile-clients`` clients that send, in turn and without pause,
one request at each of the server's limits (:data:`bench.hostile.KINDS`: bodies, JSON, images,
pixels and answers past their caps, repeated outputs, hostile shapes and header bytes,
made-up methods, a forged prompt, half-sent bodies, disconnects). It prints, side by side,
the good requests' error count and latency percentiles (p50, p90, p99, max), requests/s and
images/s, then what each hostile kind got, and the server's peak RSS after each phase. Every
good answer is checked (status 200, ``probs`` of shape ``[batch, classes]``, each row summing
to 1) and every hostile one must get its status. Exit status 1 if any request went wrong.
Defaults: 16 clients x 200 requests x batch 32, 4 hostile clients. Loopback only; bounded.
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

from bench.common import peak_rss_mib, server_and_process
from bench.hostile import SERVER_ARGS, Bodies, Seen, hostile_client
from reprogram import protocol


@dataclass
class Tally:
    """What the good clients saw."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0


@dataclass
class Phase:
    """One phase of the run: the good clients' tally, the hostile clients', peak RSS."""

    name: str
    good: Tally
    hostile: Seen
    peak_rss: float


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


async def _drive(base: str, clients: int, requests: int, batch: int, hostile: int,
                 bodies: Bodies | None) -> tuple[Tally, Seen]:
    """Warm every connection up (one request each, untimed), then time the load while
    ``hostile`` hostile clients run beside it."""
    rng = np.random.default_rng(0)
    good = [protocol.encode_request(
        {"image": rng.integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)},
        [protocol.RequestedOutput.make("probs", binary_data=True)], binary=True)
        for _ in range(clients)]
    warm, tally, seen = Tally(), Tally(), Seen()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    port = int(base.rsplit(":", 1)[1])
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=base, timeout=120.0, limits=limits) as http:
        await asyncio.gather(*[_client(http, b, h, batch, 1, warm) for b, h in good])
        attackers = [] if bodies is None else [
            asyncio.create_task(hostile_client(base, port, bodies, stop, seen, i * 3))
            for i in range(hostile)]
        start = time.perf_counter()
        await asyncio.gather(*[_client(http, b, h, batch, requests, tally) for b, h in good])
        tally.wall = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*attackers)
    tally.errors += warm.errors
    return tally, seen


def _percentiles(tally: Tally) -> tuple[float, float, float, float]:
    lat = np.array(tally.latencies) * 1000.0
    if not len(lat):
        return (0.0, 0.0, 0.0, 0.0)
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    return float(p50), float(p90), float(p99), float(lat.max())


def report(phases: Sequence[Phase], clients: int, requests: int, batch: int,
           hostile: int) -> str:
    """The printed result: the phases side by side, then the hostile kinds."""
    lines = [
        f"load: {clients} clients x {requests} requests x batch {batch} (V2 binary uint8,"
        f" default model), one server process, loopback, {os.cpu_count()} CPUs;"
        f" {hostile} hostile clients in the second phase",
        f"{'':28}" + "".join(f"{p.name:>18}" for p in phases),
    ]

    def row(label: str, cells: Sequence[str]) -> None:
        lines.append(f"{label:28}" + "".join(f"{c:>18}" for c in cells))

    stats = [_percentiles(p.good) for p in phases]
    row("good requests, errors", [f"{len(p.good.latencies)}, {len(p.good.errors)}"
                                  for p in phases])
    for i, name in enumerate(("p50", "p90", "p99", "max")):
        row(f"good latency {name} (ms)", [f"{s[i]:.1f}" for s in stats])
    row("good requests/s", [f"{len(p.good.latencies) / max(p.good.wall, 1e-9):.1f}"
                            for p in phases])
    row("good images/s", [f"{len(p.good.latencies) * batch / max(p.good.wall, 1e-9):.0f}"
                          for p in phases])
    row("hostile requests, wrong", [f"{p.hostile.total}, {len(p.hostile.wrong)}"
                                    for p in phases])
    row("server peak RSS (MiB)", [f"{p.peak_rss:.0f}" for p in phases])
    for p in phases:
        for kind, counts in p.hostile.statuses.items():
            got = ", ".join(f"{n} x {s or 'no answer'}" for s, n in sorted(counts.items()))
            lines.append(f"  {kind}: {got}")
        lines += [f"error: {e}" for e in sorted(set(p.good.errors))[:5]]
        lines += [f"wrong: {e}" for e in sorted(set(p.hostile.wrong))[:5]]
    return "\n".join(lines)


def run(clients: int, requests: int, batch: int, hostile: int) -> list[Phase]:
    """Both phases on one server process (the hostile one only if ``hostile`` > 0)."""
    bodies = Bodies.make() if hostile else None
    phases = []
    with server_and_process(["--max-batch", "256", *SERVER_ARGS]) as (base, proc):
        for name, n in (("good only", 0), ("with hostile", hostile)):
            if name != "good only" and not n:
                break
            tally, seen = asyncio.run(_drive(base, clients, requests, batch, n, bodies))
            phases.append(Phase(name, tally, seen, peak_rss_mib(proc.pid)))
    return phases


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=200, help="timed requests per client")
    p.add_argument("--batch", type=int, default=32, help="images per request")
    p.add_argument("--hostile-clients", type=int, default=4,
                   help="hostile clients in the second phase (0: good clients only)")
    args = p.parse_args(argv)
    if min(args.clients, args.requests) < 1 or not 1 <= args.batch <= 4096 or (
            args.hostile_clients < 0):
        p.error("expected --clients >= 1, --requests >= 1, --batch in 1..4096 and"
                " --hostile-clients >= 0")
    phases = run(args.clients, args.requests, args.batch, args.hostile_clients)
    print(report(phases, args.clients, args.requests, args.batch, args.hostile_clients))
    bad = any(p.good.errors or p.hostile.wrong for p in phases)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
