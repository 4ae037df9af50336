"""Accuracy per image query: our methods side by side with the papers' (issue "Benchmarks").

``python -m bench.accuracy`` fits a prompt on the default model and digits for every method,
image-query budget and seed, and reports validation-selected test accuracy (mean and spread)
as a table, a JSON file and a PNG plot (accuracy against queries, log x, a band per method).
The oracle is the local model with uint8 quantization of every queried image (what an HTTP
API sees; the equivalence test shows an HTTP fit makes the same queries); ``--endpoint URL``
runs the same over HTTP. ``--quick`` is a smoke run for the test suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from reprogram.config import RECOMMENDED, FitConfig
from reprogram.data import load_dataset
from reprogram.fit import fit
from reprogram.oracles import LocalOracle, Oracle
from reprogram.zoo.registry import load_model

# Every method is a set of FitConfig fields. The baselines follow the papers' settings.
METHODS: dict[str, dict[str, Any]] = {
    # exact gradients through the local model (upper reference)
    "white-box": {"estimator": "autograd", "labelmap": "linear", "optimizer": "adam",
                  "lr": 0.05},
    # BAR (Tsai et al. 2020): RGF, q directions, forward differences, frequency label map;
    # mu = 0.01 as in BlackVIP's port of BAR
    "bar-rgf": {"estimator": "rgf", "q": 10, "mu": 0.01, "labelmap": "frequency",
                "optimizer": "adam", "lr": 0.05},
    # BlackVIP (Oh et al. 2023): SPSA-GC with its defaults (c=0.01, gamma=0.1, a=0.01,
    # alpha=0.4, o=1, beta=0.9, segmented perturbations), frequency label map
    "blackvip-spsa-gc": {"estimator": "spsa", "spsa_c": 0.01, "spsa_gamma": 0.1,
                         "optimizer": "spsa-gc", "lr": 0.01, "labelmap": "frequency"},
    # our defaults for an endpoint (what `reprogram fit --endpoint` uses)
    "ours": dict(RECOMMENDED["rgf"], estimator="rgf"),
}

QUICK_BUDGETS = (4000,)
DEFAULT_BUDGETS = (30_000, 100_000, 300_000, 1_000_000)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` from :data:`METHODS`, or ``NAME=key:value,key:value`` (FitConfig fields)."""
    if "=" not in spec:
        if spec not in METHODS:
            raise SystemExit(f"unknown method {spec!r}; known: {', '.join(METHODS)}")
        return spec, METHODS[spec]
    name, _, body = spec.partition("=")
    base = dict(METHODS.get(body.split(",")[0], {})) if ":" not in body.split(",")[0] else {}
    for item in body.split(","):
        if ":" not in item:
            continue
        key, _, raw = item.partition(":")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                pass
        value = {"None": None, "true": True, "false": False}.get(raw, value)
        base[key] = value
    return name, base


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One fit (executed in a worker process)."""
    torch.set_num_threads(job["threads"])
    cfg = FitConfig(**job["fields"], budget=job["budget"], seed=job["seed"])
    oracle: Oracle
    if job["endpoint"]:
        from reprogram.http_oracle import HttpOracle

        oracle = HttpOracle(job["endpoint"])
    else:
        oracle = LocalOracle(load_model(), quantize=True, output=job["output"],
                             device=job["device"])
    data = load_dataset(job["data"], seed=0)
    t0 = time.perf_counter()
    result = fit(cfg, oracle, data)
    return {"method": job["method"], "seed": job["seed"], "budget": job["budget"],
            "data": job["data"], "test_accuracy": result.test_accuracy,
            "val_accuracy": result.best_val_accuracy, "queries": result.queries["images"],
            "steps": result.steps, "seconds": round(time.perf_counter() - t0, 2),
            "config": cfg.to_dict()}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation, min and max of test accuracy per (method, budget)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(float(r["test_accuracy"]))
    out = []
    for (method, budget), accs in groups.items():
        out.append({"method": method, "budget": budget, "n": len(accs),
                    "mean": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "min": min(accs), "max": max(accs)})
    return out


def table(summary: Sequence[dict[str, Any]]) -> str:
    budgets = sorted({s["budget"] for s in summary})
    methods = list(dict.fromkeys(s["method"] for s in summary))
    cell = {(s["method"], s["budget"]): s for s in summary}
    head = f"{'method':<22}" + "".join(f"{b:>16,}" for b in budgets)
    lines = [head, "-" * len(head)]
    for m in methods:
        parts = []
        for b in budgets:
            s = cell.get((m, b))
            parts.append(f"{s['mean']:>9.3f} ± {s['std']:.3f}" if s else f"{'-':>16}")
        lines.append(f"{m:<22}" + "".join(f"{p:>16}" for p in parts))
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for m in dict.fromkeys(s["method"] for s in summary):
        pts = sorted((s for s in summary if s["method"] == m), key=lambda s: s["budget"])
        xs = [p["budget"] for p in pts]
        ax.plot(xs, [p["mean"] for p in pts], marker="o", label=m)
        ax.fill_between(xs, [p["min"] for p in pts], [p["max"] for p in pts], alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("image queries (budget)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="names from the registry, or NAME=key:value,... FitConfig fields")
    p.add_argument("--budgets", type=int, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", default="digits")
    p.add_argument("--output", default="probs", help="what the oracle reveals")
    p.add_argument("--endpoint", default=None, help="run over HTTP against this V2 server")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="fits run in parallel processes")
    p.add_argument("--threads", type=int, default=0, help="torch threads per fit (0: auto)")
    p.add_argument("--out", default="bench/results/accuracy")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budget, one seed")
    args = p.parse_args(argv)
    budgets = tuple(args.budgets or (QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS))
    seeds = args.seeds[:1] if args.quick else args.seeds
    methods = [parse_method(m) for m in args.methods]
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    jobs = [{"method": name, "fields": fields, "budget": b, "seed": s, "data": args.data,
             "output": args.output, "endpoint": args.endpoint, "device": args.device,
             "threads": threads}
            for name, fields in methods for b in budgets for s in seeds]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.jobs > 1:
        spawn = multiprocessing.get_context("spawn")  # CUDA-safe workers
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            for row in pool.map(run_one, jobs):
                rows.append(row)
                print(f"  {row['method']:<22} seed {row['seed']} budget {row['budget']:>9,}: "
                      f"test {row['test_accuracy']:.3f} ({row['seconds']}s)", file=sys.stderr)
    else:
        for job in jobs:
            row = run_one(job)
            rows.append(row)
            print(f"  {row['method']:<22} seed {row['seed']} budget {row['budget']:>9,}: "
                  f"test {row['test_accuracy']:.3f} ({row['seconds']}s)", file=sys.stderr)
    summary = summarize(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    where = f"HTTP {args.endpoint}" if args.endpoint else f"local uint8 oracle ({args.device})"
    record = {"data": args.data, "output": args.output, "oracle": where, "seeds": seeds,
              "budgets": list(budgets), "rows": rows, "summary": summary,
              "seconds": round(time.perf_counter() - t0, 1)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    plot(summary, out.with_suffix(".png"), f"{args.data}: test accuracy vs queries ({where})")
    print(f"test accuracy on {args.data} ({where}), mean ± std over seeds {seeds}:")
    print(table(summary))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} "
          f"in {record['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
