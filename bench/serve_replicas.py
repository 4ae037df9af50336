"""``bench.serve --replicas 1 2``: images/s of Ray Serve deployments of N replicas.

For each N, ``reprogram-server --ray --replicas N`` starts on a fresh local Ray instance on a
free loopback port, and ``clients`` threads, each with its own persistent ``httpx.Client``,
send ``requests`` V2 binary requests of ``batch`` uint8 images each (after a warm-up); the
same load runs first against one plain ``reprogram-server`` process. Every loop is bounded;
each server is terminated after its row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np

from bench.common import server_process
from reprogram import protocol
from reprogram.zoo.shapes import generate_shapes

READY_TIMEOUT_S = 180.0


@dataclass(frozen=True, kw_only=True)
class ReplicaRow:
    """One line of the table: ``replicas`` 0 is the plain server."""

    replicas: int
    clients: int
    batch: int
    requests: int
    images_per_s: float
    p50_ms: float
    p90_ms: float


def _client_run(base: str, x: np.ndarray, n: int, warmup: int) -> list[float]:
    body, headers = protocol.encode_request({"image": x}, binary=True, binary_output=True)
    times = []
    with httpx.Client(base_url=base, timeout=60.0) as client:
        for i in range(warmup + n):
            start = time.perf_counter()
            r = client.post("/v2/models/default/infer", content=body, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"server answered {r.status_code}: {r.text[:200]}")
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def measure(base: str, replicas: int, clients: int, batch: int, requests: int,
            warmup: int) -> ReplicaRow:
    """``clients`` threads x ``requests`` requests of ``batch`` images against ``base``."""
    x = generate_shapes(batch, seed=0)[0].numpy()
    with ThreadPoolExecutor(clients) as pool:  # warm-up of every client first, then timed
        list(pool.map(lambda _: _client_run(base, x, 0, warmup), range(clients)))
        start = time.perf_counter()
        lat = sorted(t for ts in pool.map(lambda _: _client_run(base, x, requests, 0),
                                          range(clients)) for t in ts)
        wall = time.perf_counter() - start
    return ReplicaRow(replicas=replicas, clients=clients, batch=batch, requests=requests,
                      images_per_s=clients * requests * batch / wall,
                      p50_ms=1000 * lat[len(lat) // 2], p90_ms=1000 * lat[int(len(lat) * 0.9)])


def run(replicas: Sequence[int], clients: int, batch: int, requests: int,
        warmup: int) -> list[ReplicaRow]:
    """The plain server's row, then one row per number of replicas."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    rows = []
    with server_process([], env=env) as base:
        rows.append(measure(base, 0, clients, batch, requests, warmup))
    for n in replicas:
        args = ["--ray", "--replicas", str(n), "--ray-address", "local", "--no-access-log"]
        with server_process(args, env=env, timeout=READY_TIMEOUT_S) as base:
            rows.append(measure(base, n, clients, batch, requests, warmup))
    return rows


def format_table(rows: Sequence[ReplicaRow]) -> str:
    """The printed table, with this machine's core count on every line."""
    head = (f"{'server':<24}  {'clients':>7}  {'batch':>5}  {'requests':>8}  {'img/s':>7}"
            f"  {'p50 ms':>7}  {'p90 ms':>7}  {'CPU cores':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        name = ("plain (no Ray)" if r.replicas == 0 else
                f"Ray Serve, {r.replicas} replica{'s' if r.replicas > 1 else ''}")
        lines.append(f"{name:<24}  {r.clients:>7}  {r.batch:>5}  {r.requests:>8}"
                     f"  {r.images_per_s:>7.0f}  {r.p50_ms:>7.1f}  {r.p90_ms:>7.1f}"
                     f"  {os.cpu_count():>9}")
    return "\n".join(lines)
