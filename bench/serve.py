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
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import torch

from bench.common import server_process
from reprogram import protocol
from reprogram.errors import ReprogramError
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


def _latencies(client: httpx.Client, x: np.ndarray, n: int) -> list[float]:
    call = _http_call(client, x, [])
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def _start_job(client: httpx.Client) -> str:
    """Queue a long white-box fit on digits and wait until its worker is stepping."""
    from reprogram.config import recommended_config
    from reprogram.remote import submission

    cfg = recommended_config("autograd", budget=10_000_000, seed=0)
    r = client.post("/v1/fits", **submission("digits", cfg))
    if r.status_code != 202:
        raise RuntimeError(f"job refused: {r.status_code} {r.text[:200]}")
    job_id = str(r.json()["id"])
    deadline = time.monotonic() + READY_TIMEOUT_S
    while client.get(f"/v1/fits/{job_id}").json()["progress"]["step"] < 5:
        if time.monotonic() > deadline:
            raise RuntimeError("the job did not start")
        time.sleep(0.2)
    return job_id


def during_fit(batch: int, requests: int, threads: int | None) -> dict[str, float]:
    """p50 / p90 latency (ms) of V2 requests of ``batch`` images: idle, while a tuning job
    runs in the server's worker process, and idle again after it is cancelled (one server)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    x = generate_shapes(batch, seed=0)[0].numpy()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as jobs, \
            server_process(["--fit-workers", "1", "--jobs-dir", jobs], env=env) as base, \
            httpx.Client(base_url=base, timeout=60.0) as client:
        _latencies(client, x, 10)  # warm-up
        phases = [("idle", None), ("job running", _start_job), ("idle after", None)]
        job_id = None
        for name, start in phases:
            if start is not None:
                job_id = start(client)
            elif job_id is not None:
                client.delete(f"/v1/fits/{job_id}")
                time.sleep(1.0)
            times = sorted(_latencies(client, x, requests))
            out[f"{name} p50"] = 1000 * times[len(times) // 2]
            out[f"{name} p90"] = 1000 * times[int(len(times) * 0.9)]
    return out


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


def _replicas(args: argparse.Namespace, p: argparse.ArgumentParser, n: int) -> int:
    from bench import serve_replicas
    from server.ray_cluster import require_ray

    if any(r < 1 for r in args.replicas) or args.clients < 1:
        p.error("expected --replicas N >= 1 and --clients >= 1")
    try:
        require_ray()
    except ReprogramError as exc:
        raise SystemExit(str(exc)) from None
    batch = args.batches[0]
    rows = serve_replicas.run(args.replicas, args.clients, batch, n, 2 if args.quick else 10)
    print(f"reprogram-server on Ray Serve: default model, uint8 V2 binary, {args.clients}"
          f" clients x {n} requests of {batch} images, client and servers on one host with"
          f" {os.cpu_count()} CPU cores; each replica reserves 1 CPU")
    print(serve_replicas.format_table(rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few requests")
    p.add_argument("--requests", type=int, default=None, help="timed requests per batch size")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in both processes (default: torch's own choice)")
    p.add_argument("--during-fit", action="store_true",
                   help="also: request latency while a tuning job runs, against idle")
    p.add_argument("--replicas", type=int, nargs="+", default=None, metavar="N",
                   help="instead: images/s of Ray Serve deployments of N replicas each (and "
                        "of one plain server) under --clients concurrent clients")
    p.add_argument("--clients", type=int, default=4,
                   help="with --replicas: concurrent clients (default 4)")
    args = p.parse_args(argv)
    n = args.requests or (10 if args.quick else 300)
    if n < 1 or any(b < 1 or b > 4096 for b in args.batches) or (args.threads or 1) < 1:
        p.error("expected --requests >= 1, batch sizes in 1..4096 and --threads >= 1")
    if args.replicas is not None:
        return _replicas(args, p, n)
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
    if args.during_fit:
        with ThreadPoolExecutor(max_workers=1) as pool:
            lat = pool.submit(during_fit, 64, n, args.threads).result()
        print(f"V2 latency of 64-image requests ({n} per phase), ms, one server with"
              " --fit-workers 1:")
        print("  ".join(f"{k} {v:.1f}" for k, v in lat.items()))
        print(f"job running / idle p50: {lat['job running p50'] / lat['idle p50']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
