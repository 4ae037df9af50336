"""Serving throughput: images/s over HTTP (V2 binary, uint8) next to the model in-process.

``python -m bench.serve`` starts ``reprogram-server`` as a real process on a free loopback
port, sends a few hundred V2 binary requests per batch size over one persistent
``httpx.Client`` (after a warmup), and runs the same uint8 batches through the same
:class:`~server.inference.ModelRunner` in-process; it prints images/s for both and their
ratio. ``--quick`` is a smoke run. Loopback only; every loop is bounded. Both sides run the
model from a non-main thread (the server's threadpool; a worker thread here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import torch

from bench.common import server_process
from reprogram import protocol
from reprogram.http_oracle import server_timing
from reprogram.zoo.registry import load_model
from reprogram.zoo.shapes import generate_shapes
from server.inference import ModelRunner
from server.settings import OutputKind

READY_TIMEOUT_S = 120.0


@dataclass(frozen=True, kw_only=True)
class Row:
    """One line of the table."""

    batch: int
    requests: int
    local_ips: float
    http_ips: float
    http_ms: float
    server_ms: float  # the server's own decode + forward + encode (its Server-Timing header)
    max_diff: float


def _interleaved(
    fns: Sequence[Callable[[], object]], n: int, warmup: int, rounds: int
) -> list[float]:
    """Seconds per call of each ``fn``, timed in alternating rounds (shared-host noise)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    totals = [0.0] * len(fns)
    per_round = [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]
    for k in per_round:
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(k):
                fn()
            totals[j] += time.perf_counter() - start
    return [t / n for t in totals]


def _http_call(client: httpx.Client, x: np.ndarray,
               server_seconds: list[float]) -> Callable[[], np.ndarray]:
    def call() -> np.ndarray:
        body, headers = protocol.encode_request({"image": x}, binary=True, binary_output=True)
        r = client.post("/v2/models/default/infer", content=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {r.text[:200]}")
        server_seconds.append(sum(server_timing(r.headers.get("server-timing", "")).values()))
        out, _ = protocol.decode_response(r.content, r.headers)
        return out["probs"]

    return call


def run(
    batches: Sequence[int], requests: int, warmup: int, threads: int | None = None
) -> list[Row]:
    """Measure every batch size; the server process is always terminated."""
    env = dict(os.environ)
    if threads is not None:
        torch.set_num_threads(threads)
        env["OMP_NUM_THREADS"] = str(threads)
    images = generate_shapes(max(batches), seed=0)[0].numpy()
    runner = ModelRunner(load_model(), output=OutputKind(), max_batch=256, max_images=4096)
    rows = []
    with server_process(["--max-batch", "256"], env=env) as base, \
            httpx.Client(base_url=base, timeout=60.0) as client:
        for b in batches:
            x = images[:b]
            server_s: list[float] = []
            call = _http_call(client, x, server_s)
            diff = float(np.abs(call() - runner.infer(x)).max())

            def local_call(x: np.ndarray = x) -> np.ndarray:
                return runner.infer(x)

            local, remote = _interleaved([local_call, call], requests, warmup, rounds=5)
            timed = server_s[-requests:]  # the timed calls, not the warm-up
            rows.append(Row(batch=b, requests=requests, local_ips=b / local,
                            http_ips=b / remote, http_ms=1000 * remote,
                            server_ms=1000 * sum(timed) / len(timed), max_diff=diff))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The printed table."""
    head = (f"{'batch':>5}  {'requests':>8}  {'in-process img/s':>16}  {'HTTP V2 binary img/s':>20}"
            f"  {'HTTP/in-process':>15}  {'ms/request':>10}  {'in-process ms':>13}"
            f"  {'server ms':>9}  {'max |diff|':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.batch:>5}  {r.requests:>8}  {r.local_ips:>16.0f}  {r.http_ips:>20.0f}"
            f"  {r.http_ips / r.local_ips:>15.2f}  {r.http_ms:>10.1f}"
            f"  {1000 * r.batch / r.local_ips:>13.1f}  {r.server_ms:>9.1f}  {r.max_diff:>10.1e}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few requests")
    p.add_argument("--requests", type=int, default=None, help="timed requests per batch size")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in both processes (default: torch's own choice)")
    args = p.parse_args(argv)
    n = args.requests or (10 if args.quick else 300)
    if n < 1 or any(b < 1 or b > 4096 for b in args.batches) or (args.threads or 1) < 1:
        p.error("expected --requests >= 1, batch sizes in 1..4096 and --threads >= 1")
    # Measure from a worker thread, as the server runs the model (see bench/__init__.py).
    with ThreadPoolExecutor(max_workers=1) as pool:
        rows = pool.submit(
            run, args.batches, n, 2 if args.quick else 10, args.threads
        ).result()
    print(f"reprogram-server vs in-process ModelRunner: default model, uint8, torch threads"
          f" {torch.get_num_threads()} per process, client and server on one host,"
          f" {os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')};"
          " timed in 5 alternating rounds")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
