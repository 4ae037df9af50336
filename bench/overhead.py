"""Where the time goes in a fit: in-process against over HTTP, and the physical floor.

``python -m bench.overhead`` runs one fixed fit (the black-box defaults, same seed and budget)
twice: on the in-process model with 8-bit quantization, and over HTTP against a real
``reprogram-server`` process on a loopback port. It prints the wall-time ratio, the split
(encode, HTTP round trips, decode, model forward, client-side maths: program rendering,
estimator, label map, optimizer), and the physical floor: the fit's image queries times one
forward pass per image at the server's batch size. ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bench.common import server_process
from reprogram.config import recommended_config
from reprogram.data import load_dataset
from reprogram.fit import fit
from reprogram.http_oracle import HttpOracle
from reprogram.oracles import LocalOracle, Oracle, OracleWrapper
from reprogram.zoo.registry import load_model
from reprogram.zoo.shapes import generate_shapes


class TimedOracle(OracleWrapper):
    """Wraps an oracle and adds up the seconds spent in its queries."""

    def __init__(self, inner: Oracle) -> None:
        super().__init__(inner)
        self.seconds = 0.0

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        t0 = time.perf_counter()
        try:
            return super()._query(x)
        finally:
            self.seconds += time.perf_counter() - t0


@dataclass(frozen=True)
class Run:
    wall: float
    queries_s: float
    images: int
    requests: int
    theta: torch.Tensor
    split: dict[str, float]


def one_fit(oracle: Oracle, budget: int, seed: int) -> Run:
    timed = TimedOracle(oracle)
    cfg = recommended_config("rgf", budget=budget, seed=seed)
    t0 = time.perf_counter()
    result = fit(cfg, timed, load_dataset("digits"))
    wall = time.perf_counter() - t0
    split = dict(getattr(oracle, "timings", {}))
    return Run(wall=wall, queries_s=timed.seconds, images=timed.images_used,
               requests=timed.requests_used, theta=result.model.program.theta.detach().clone(),
               split=split)


@torch.inference_mode()
def forward_seconds_per_image(batch: int = 256, repeats: int = 20) -> float:
    """One forward pass of the default model per image at ``batch`` (uint8 in, as served)."""
    module = load_model().module
    x = generate_shapes(batch, seed=0)[0]
    for _ in range(3):
        module(x.float() / 255.0)
    t0 = time.perf_counter()
    for _ in range(repeats):
        module(x.float() / 255.0)
    return (time.perf_counter() - t0) / (repeats * batch)


def report(local: Run, http: Run, per_image: float, budget: int) -> str:
    floor = http.images * per_image
    rows = [
        ("wall time", local.wall, http.wall),
        ("  model queries (client view)", local.queries_s, http.queries_s),
        ("    encode request", None, http.split.get("encode")),
        ("    HTTP round trips (transfer + server)", None, http.split.get("http")),
        ("    decode response", None, http.split.get("decode")),
        ("  client maths (render, estimator, label map, optimizer)",
         local.wall - local.queries_s, http.wall - http.queries_s),
    ]
    lines = [f"one fit: black-box defaults (rgf), digits, budget {budget:,} images, seed 0",
             f"{'seconds':<58}{'in-process':>12}{'HTTP':>12}", "-" * 82]
    for name, a, b in rows:
        fa = f"{a:>12.2f}" if a is not None else f"{'-':>12}"
        fb = f"{b:>12.2f}" if b is not None else f"{'-':>12}"
        lines.append(f"{name:<58}{fa}{fb}")
    lines.append(f"{'images queried':<58}{local.images:>12,}{http.images:>12,}")
    lines.append(f"{'requests':<58}{local.requests:>12,}{http.requests:>12,}")
    server_extra = (http.split.get("http", 0.0) or 0.0) - local.queries_s
    lines += [
        "-" * 82,
        f"HTTP / in-process wall-time ratio: {http.wall / local.wall:.2f}",
        f"HTTP round trips beyond the in-process model time: {server_extra:.2f} s "
        f"({server_extra / max(http.wall, 1e-9):.0%} of the HTTP fit)",
        f"physical floor: {http.images:,} images x {per_image * 1e6:.0f} us per image at batch "
        f"256 = {floor:.2f} s; in-process fit {local.wall / floor:.2f}x, HTTP fit "
        f"{http.wall / floor:.2f}x the floor",
        f"same parameters in both fits: max |diff| = "
        f"{float((local.theta - http.theta).abs().max()):.1e}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run (budget 5,000)")
    args = p.parse_args(argv)
    budget = 5_000 if args.quick else args.budget
    with server_process(["--max-batch", "256"]) as base:
        oracle = HttpOracle(base)
        try:  # a short warm-up fit on each side first: one-time start-up costs are not the fit's
            one_fit(LocalOracle(load_model(), quantize=True), 2_000, args.seed)
            one_fit(HttpOracle(base), 2_000, args.seed)
            local = one_fit(LocalOracle(load_model(), quantize=True), budget, args.seed)
            http = one_fit(oracle, budget, args.seed)
        finally:
            oracle.close()
    print(report(local, http, forward_seconds_per_image(), budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
