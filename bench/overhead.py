"""Where the time goes in a fit: in-process against over HTTP, and the physical floor.

``python -m bench.overhead`` runs one fixed fit (the black-box defaults, same seed and budget)
twice: on the in-process model with 8-bit quantization, and over HTTP against a real
``reprogram-server`` process on a loopback port. It prints the wall-time ratio, the split
(encode, transfer, the server's decode / forward / encode from its ``Server-Timing`` header,
decode, estimator maths, optimizer, validation) and the physical floor: the fit's image
queries times one forward pass per image at the server's batch size. ``--quick`` is a smoke
run.
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
from reprogram.oracles import LocalOracle, Oracle
from reprogram.pipeline import Reprogrammer
from reprogram.zoo.registry import load_model


@dataclass(frozen=True)
class Run:
    wall: float
    images: int
    requests: int
    model: Reprogrammer  # the fitted prompt
    phases: dict[str, float]  # the fit's own split (reprogram.fit.PHASES)
    wire: dict[str, float]  # HttpOracle's split of the queries (empty in-process)


def one_fit(oracle: Oracle, budget: int, seed: int) -> Run:
    cfg = recommended_config("rgf", budget=budget, seed=seed)
    data = load_dataset("digits")
    t0 = time.perf_counter()
    result = fit(cfg, oracle, data)
    wall = time.perf_counter() - t0
    return Run(wall=wall, images=oracle.images_used, requests=oracle.requests_used,
               model=result.model, phases=dict(result.timings),
               wire=dict(getattr(oracle, "timings", {})))


@torch.inference_mode()
def forward_seconds_per_image(run: Run, batch: int = 256, repeats: int = 20) -> float:
    """One forward pass of the default model per image at ``batch``, on the images a fit sends:
    digits under the fit's learned program, rounded to 8 bits as served. (The forward pass is
    data-dependent on a CPU: these frames cost about 1.5x the default model's own shapes.)"""
    model = run.model
    digits = load_dataset("digits").images[:batch]
    theta = model.program.theta.detach()[None]
    frames = model.program.render_candidates(model.transform(digits), theta)[0]
    x = torch.round(frames.clamp(0, 1) * 255.0) / 255.0
    module = load_model().module
    for _ in range(3):
        module(x)
    t0 = time.perf_counter()
    for _ in range(repeats):
        module(x)
    return (time.perf_counter() - t0) / (repeats * batch)


def report(local: Run, http: Run, per_image: float, budget: int) -> str:
    floor = http.images * per_image
    w = http.wire
    server = sum(w.get(f"server_{stage}", 0.0) for stage in ("decode", "forward", "encode"))

    def client(run: Run, *names: str) -> float:
        return sum(run.phases.get(n, 0.0) for n in names)

    def other(run: Run) -> float:
        return run.wall - sum(run.phases.values())

    rows: list[tuple[str, float | None, float | None]] = [
        ("wall time", local.wall, http.wall),
        ("  model queries (client view)", local.phases["queries"], http.phases["queries"]),
        ("    encode request", None, w.get("encode")),
        ("    HTTP round trips", None, w.get("http")),
        ("      server: decode request", None, w.get("server_decode")),
        ("      server: model forward", None, w.get("server_forward")),
        ("      server: encode response", None, w.get("server_encode")),
        ("      transfer and HTTP stack (round trips - server)", None,
         w.get("http", 0.0) - server),
        ("    decode response", None, w.get("decode")),
        ("  estimator maths (candidates, render, label map, loss)",
         client(local, "estimator"), client(http, "estimator")),
        ("  optimizer (label-map backward, Adam step, schedule)",
         client(local, "optimizer"), client(http, "optimizer")),
        ("  validation, label-map fit and test (without queries)",
         client(local, "validation", "labelmap_fit", "test"),
         client(http, "validation", "labelmap_fit", "test")),
        ("  set-up (splits, program, transforms)", other(local), other(http)),
    ]
    lines = [f"one fit: black-box defaults (rgf), digits, budget {budget:,} images, seed 0",
             f"{'seconds':<58}{'in-process':>12}{'HTTP':>12}", "-" * 82]
    for name, a, b in rows:
        fa = f"{a:>12.2f}" if a is not None else f"{'-':>12}"
        fb = f"{b:>12.2f}" if b is not None else f"{'-':>12}"
        lines.append(f"{name:<58}{fa}{fb}")
    lines.append(f"{'images queried (with the test split)':<58}{local.images:>12,}"
                 f"{http.images:>12,}")
    lines.append(f"{'requests':<58}{local.requests:>12,}{http.requests:>12,}")
    lines += [
        "-" * 82,
        f"HTTP / in-process wall-time ratio: {http.wall / local.wall:.2f}",
        f"physical floor: {http.images:,} images x {per_image * 1e6:.0f} us per image (one "
        f"forward pass at batch 256 on the fit's own frames) = {floor:.2f} s; in-process "
        f"fit {local.wall / floor:.2f}x, HTTP fit {http.wall / floor:.2f}x the floor",
        f"same parameters in both fits: max |diff| = "
        f"{float((local.model.program.theta - http.model.program.theta).abs().max().detach()):.1e}",
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
    print(report(local, http, forward_seconds_per_image(http), budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
