"""What 224 px costs: bytes per image on the wire and images/s in-process and over HTTP, for a
torchvision ResNet-18 at 224x224 next to the default 32 px model, measured side by side.

``python -m bench.real_size`` writes a model repository to a temporary folder (the default
model, and ``resnet18``: torchvision's architecture with seeded random weights saved as a
state dict, nothing downloaded), starts ``reprogram-server --model-repository`` on a free
loopback port, and for each model times the same uint8 batches through a quantizing
``LocalOracle`` in-process and an ``HttpOracle`` over V2 binary tensors, in alternating rounds.
Bytes are counted on the wire (request and response bodies, HTTP headers apart); the JSON and
FP32 columns are what the same request would weigh in those encodings. ``--fit N`` then runs a
black-box fit of N image queries on the ResNet-18 over HTTP (random weights: the accuracy is
not the point, that it runs end to end is). ``--quick`` is a smoke run.
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
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.common import server_process
from reprogram import protocol
from reprogram.config import recommended_config
from reprogram.data import load_digits
from reprogram.fit import fit
from reprogram.http_oracle import HttpOracle
from reprogram.oracles import LocalOracle
from reprogram.zoo.export import export_model, save_torchvision
from reprogram.zoo.loaders import load_path
from reprogram.zoo.registry import load_model

MODELS = ("default", "resnet18")


@dataclass(frozen=True, kw_only=True)
class Row:
    """One line of the table."""

    model: str
    size: tuple[int, int]
    batch: int
    local_ips: float
    http_ips: float
    request_bytes: float  # per image, V2 binary uint8, as sent
    response_bytes: float  # per image, binary FP32 probabilities, as received
    json_bytes: float  # per image, the same request as JSON
    fp32_bytes: float  # per image, the same request as binary FP32


class _Meter:
    """Counts request and response body bytes on an ``httpx.Client``."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0

    def client(self) -> httpx.Client:
        def on_request(request: httpx.Request) -> None:
            self.sent += len(request.content)

        def on_response(response: httpx.Response) -> None:
            response.read()
            self.received += len(response.content)

        return httpx.Client(timeout=300.0, event_hooks={"request": [on_request],
                                                        "response": [on_response]})


def write_repository(root: Path) -> Path:
    """The default model and a random-weights ResNet-18 (1000 classes) at 224 px."""
    export_model(load_model("default"), root / "default", "default")
    save_torchvision("resnet18", root / "resnet18", num_classes=1000, seed=0)
    return root


def _timed(fns: Sequence[Callable[[], object]], n: int, rounds: int = 5) -> list[float]:
    """Seconds per call of each ``fn`` after one warm-up, in alternating rounds."""
    for fn in fns:
        fn()
    totals = [0.0] * len(fns)
    for r in range(rounds):
        k = n // rounds + (1 if r < n % rounds else 0)
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(k):
                fn()
            totals[j] += time.perf_counter() - start
    return [t / n for t in totals]


def _sizes(x: np.ndarray) -> tuple[float, float]:
    n = x.shape[0]
    as_json, _ = protocol.encode_request({"image": x}, binary=False)
    as_fp32, _ = protocol.encode_request({"image": x.astype(np.float32) / 255}, binary=True)
    return len(as_json) / n, len(as_fp32) / n


def measure(base: str, root: Path, name: str, batch: int, calls: int) -> Row:
    """One model at one batch size: in-process and HTTP, side by side."""
    model = load_path(root / name)
    h, w = model.meta.input_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, h, w), generator=gen, dtype=torch.uint8)
    frames = x.float() / 255
    local = LocalOracle(model, quantize=True)
    meter = _Meter()
    with HttpOracle(base, model=name, client=meter.client()) as remote:
        diff = float((local.query(frames) - remote.query(frames)).abs().max())
        if diff > 1e-4:
            raise RuntimeError(f"{name}: HTTP and in-process scores differ by {diff}")
        sent, received = meter.sent, meter.received
        remote.query(frames)
        per_sent = (meter.sent - sent) / batch
        per_received = (meter.received - received) / batch
        t_local, t_http = _timed([lambda: local.query(frames), lambda: remote.query(frames)],
                                 calls)
    as_json, as_fp32 = _sizes(x.numpy())
    return Row(model=name, size=(h, w), batch=batch, local_ips=batch / t_local,
               http_ips=batch / t_http, request_bytes=per_sent, response_bytes=per_received,
               json_bytes=as_json, fp32_bytes=as_fp32)


def fit_over_http(base: str, budget: int) -> dict[str, object]:
    """A black-box fit of ``budget`` image queries on the ResNet-18 over HTTP."""
    t0 = time.perf_counter()
    # a 352-image fit query is 4 requests of at most 111 (the 64 MiB body cap) in flight at
    # once, queued at the server: on a busy CPU the last can wait minutes
    with HttpOracle(base, model="resnet18", timeout=900.0) as oracle:
        result = fit(recommended_config("rgf", budget=budget, seed=0), oracle, load_digits())
    seconds = time.perf_counter() - t0
    images = result.queries["images"] + result.queries["test_images"]
    return {"queries": result.queries, "steps": result.steps, "seconds": round(seconds, 1),
            "img_per_s": round(images / seconds, 1), "val_accuracy": result.best_val_accuracy,
            "test_accuracy": result.test_accuracy, "stopped": result.stop_reason}


def format_table(rows: Sequence[Row]) -> str:
    """The printed table."""
    head = (f"{'model':>9}  {'input':>7}  {'batch':>5}  {'in-process img/s':>16}"
            f"  {'HTTP img/s':>10}  {'HTTP/in-proc':>12}  {'request B/img':>13}"
            f"  {'response B/img':>14}  {'JSON B/img':>10}  {'FP32 B/img':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.model:>9}  {r.size[0]:>3}x{r.size[1]:<3}  {r.batch:>5}  {r.local_ips:>16.1f}"
            f"  {r.http_ips:>10.1f}  {r.http_ips / r.local_ips:>12.2f}"
            f"  {r.request_bytes:>13.0f}  {r.response_bytes:>14.0f}  {r.json_bytes:>10.0f}"
            f"  {r.fp32_bytes:>10.0f}")
    return "\n".join(lines)


def run(batches: Sequence[int], calls: int, budget: int) -> None:
    """Everything in one server's lifetime, printed as it comes; the server is always
    terminated."""
    print(f"in-process LocalOracle vs HttpOracle -> reprogram-server --model-repository"
          f" (V2 binary, uint8), torch threads {torch.get_num_threads()}, client and server"
          f" on one host, {os.cpu_count()} CPUs, load average"
          f" {os.getloadavg()[0]:.1f}; {calls} calls per side in 5 alternating rounds",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_repository(Path(tmp))
        with server_process(["--model-repository", str(root)], timeout=600) as base:
            rows = [measure(base, root, name, b, calls) for name in MODELS for b in batches]
            print(format_table(rows), flush=True)
            if budget:
                fitted = fit_over_http(base, budget)
                print(f"black-box fit over HTTP on resnet18 (224x224, random weights):"
                      f" {fitted}; load average {os.getloadavg()[0]:.1f}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.real_size",
                                description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: few calls, no fit")
    p.add_argument("--batches", type=int, nargs="+", default=[32])
    p.add_argument("--calls", type=int, default=None, help="timed calls per side (default 10)")
    p.add_argument("--fit", type=int, default=3000, metavar="N",
                   help="black-box fit of N queries on the ResNet-18 over HTTP (0: none)")
    args = p.parse_args(argv)
    calls = args.calls or (2 if args.quick else 10)
    budget = 0 if args.quick else args.fit
    if calls < 1 or budget < 0 or any(not 1 <= b <= 256 for b in args.batches):
        p.error("expected --calls >= 1, --fit >= 0 and batch sizes in 1..256")
    with ThreadPoolExecutor(max_workers=1) as pool:  # from a worker thread, as the server
        pool.submit(run, args.batches, calls, budget).result()
    return 0


if __name__ == "__main__":
    sys.exit(main())
