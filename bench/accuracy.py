"""Accuracy per image query: our methods side by side with the papers'.

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
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import MISSING
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

import torch

from bench.accuracy_report import plot, ranking_lines, summarize, table
from reprogram.config import LEGACY, FitConfig
from reprogram.data import load_dataset
from reprogram.defaults import LABEL_VOTES, RECOMMENDED
from reprogram.errors import ConfigError, EstimatorError
from reprogram.fit import Fitter, fit
from reprogram.oracles import LocalOracle, Oracle
from reprogram.presets import PRESETS
from reprogram.zoo.registry import load_model
from server.ray_cluster import require_ray

# Every method is a set of FitConfig fields. The anchors are the presets of
# reprogram.presets, every value as their papers' code sets it (see each preset's sources);
# each white-box reference runs on the program of the black-box row it is compared with.
_OURS = dict(RECOMMENDED["rgf"], estimator="rgf")
METHODS: dict[str, dict[str, Any]] = {
    # exact gradients through the local model, on our black-box program (upper reference)
    "white-box": dict(_OURS, estimator="autograd"),
    # BAR's code; its 6 sources per target need 60 source classes: the default model has 10
    "bar-code": dict(PRESETS["bar-code"].values, sources_per_target=1),
    "bar-port": dict(PRESETS["bar-port"].values),
    "blackvip": dict(PRESETS["blackvip"].values),
    "blackvip-vp": dict(PRESETS["blackvip-vp"].values),
    # white-box anchors, each on its own program
    "elsayed": dict(PRESETS["elsayed"].values),
    "bahng-pad": dict(PRESETS["bahng-pad"].values),
    "bahng-patch": dict(PRESETS["bahng-patch"].values),
    "ilm-vp": dict(PRESETS["ilm-vp"].values),
    # our RGF defaults (what `reprogram fit --endpoint` uses above a budget of
    # reprogram.defaults.CMA_MAX_BUDGET queries, and on top-k or label answers)
    "ours": _OURS,
    # ours with the zoo's surrogate (another network on the same task, never the API's own
    # weights): its gradient as P-RGF's prior, a white-box warm start on it, or both
    "ours-prgf": dict(RECOMMENDED["prgf"], estimator="prgf", surrogate="shapes-resnet"),
    "ours-warm": dict(_OURS, surrogate="shapes-resnet", warm_start_epochs=20),
    "ours-warm-prgf": dict(RECOMMENDED["prgf"], estimator="prgf", surrogate="shapes-resnet",
                           warm_start_epochs=20),
    # for a label-only API: ours learning from label votes (reprogram.votes)
    "ours-votes": dict(_OURS, **LABEL_VOTES),
    # CMA-ES on ours' grid and map (Black-Box Tuning's optimizer; no surrogate): what
    # `reprogram fit --endpoint` uses up to CMA_MAX_BUDGET queries; and after the warm start
    "ours-cma": dict(RECOMMENDED["cma"], estimator="cma"),
    "ours-warm-cma": dict(RECOMMENDED["cma"], estimator="cma", surrogate="shapes-resnet",
                          warm_start_epochs=20),
    # our defaults with one ingredient changed, to show what each is worth
    "ours-antithetic": dict(_OURS, antithetic=True),
    "ours-no-grid": dict(_OURS, resolution=None),
    "ours-expand": dict(_OURS, program="expand"),
    "ours-spsa": dict(RECOMMENDED["spsa"], estimator="spsa"),
    "ours-first-map": dict(_OURS, labelmap="first"),
    "ours-frequency-map": dict(_OURS, labelmap="frequency"),
    "ours-iterative-map": dict(_OURS, labelmap="iterative"),
}
# renamed rows of earlier runs (bench/sweeps, --resume of an old stream)
ALIASES = {"ours-pad": "ours-expand"}

QUICK_BUDGETS = (4000,)
DEFAULT_BUDGETS = (30_000, 100_000, 300_000, 1_000_000)


def default_methods(output: str) -> list[str]:
    """Every method of :data:`METHODS` that can run on ``output``: label votes only on a
    label-only oracle (``label``), the others on every output."""
    label_only = output == "label"
    return [name for name, fields in METHODS.items()
            if label_only or fields.get("label_votes", 1) <= 1]


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` from :data:`METHODS`, or ``NAME=key:value,key:value`` (FitConfig fields)."""
    if "=" not in spec:
        spec = ALIASES.get(spec, spec)
        if spec not in METHODS:
            raise SystemExit(f"unknown method {spec!r}; known: {', '.join(METHODS)}")
        return spec, METHODS[spec]
    name, _, body = spec.partition("=")
    first = ALIASES.get(body.split(",")[0], body.split(",")[0])
    base = dict(METHODS.get(first, {})) if ":" not in first else {}
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


def job_config(job: dict[str, Any]) -> FitConfig:
    return FitConfig(**job["fields"], budget=job["budget"], seed=job["seed"])


def job_oracle(job: dict[str, Any]) -> str:
    """The oracle of a job: the endpoint, or the local model's device and (if not uint8) the
    emulated wire."""
    if job["endpoint"]:
        return f"HTTP {job['endpoint']}"
    wire = job.get("wire", "uint8")
    return str(job["device"]) + ("" if wire == "uint8" else f" {wire}")


def job_key(method: str, budget: int, seed: int, data: str, output: str, oracle: str,
            config: dict[str, Any]) -> str:
    """What identifies one fit's result: a resumed run reuses a row only if all of it matches
    (the code version is not part of it: start afresh after changing the code)."""
    return json.dumps([method, budget, seed, data, output, oracle, config], sort_keys=True)


def _plain_defaults(output: str) -> dict[str, Any]:
    plain = {f.name: f.default for f in dc_fields(FitConfig) if f.default is not MISSING}
    # the top-k remainder changed what top-k answers score; on other outputs it does nothing
    return {**plain, **LEGACY} if output.startswith("topk") else plain


def row_key(row: dict[str, Any]) -> str:
    """A recorded row's key; a field FitConfig gained after the row was written (absent from
    its config) ran as that field's default does, so the default stands in for it (the
    remainder on top-k outputs excepted: those rows ran with the floor)."""
    config = {**{k: v for k, v in _plain_defaults(row["output"]).items()
                 if k not in row["config"]}, **row["config"]}
    return job_key(row["method"], row["budget"], row["seed"], row["data"], row["output"],
                   row["oracle"], config)


def key_of(job: dict[str, Any]) -> str:
    return job_key(job["method"], job["budget"], job["seed"], job["data"], job["output"],
                   job_oracle(job), job_config(job).to_dict())


def precheck(methods: Sequence[tuple[str, dict[str, Any]]], budget: int, seed: int,
             data_spec: str, output: str) -> None:
    """Set up (without running) one fit per method at the smallest budget on the local model,
    so a bad configuration or a budget too small is a one-line error before any fit runs."""
    model = load_model()
    data = load_dataset(data_spec, seed=0)
    for name, fields in methods:
        try:
            cfg = FitConfig(**fields, budget=budget, seed=seed)
            Fitter(cfg, LocalOracle(model, output=output), data)
        except (ConfigError, EstimatorError, TypeError) as exc:
            raise SystemExit(f"method {name!r}: {exc}") from None


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One fit (executed in a worker process)."""
    torch.set_num_threads(job["threads"])
    cfg = job_config(job)
    oracle: Oracle
    if job["endpoint"]:
        from reprogram.http_oracle import HttpOracle

        oracle = HttpOracle(job["endpoint"])
    else:
        oracle = LocalOracle(load_model(), output=job["output"], wire=job.get("wire", "uint8"),
                             device=job["device"])
    data = load_dataset(job["data"], seed=0)
    t0 = time.perf_counter()
    result = fit(cfg, oracle, data)
    return {"method": job["method"], "seed": job["seed"], "budget": job["budget"],
            "data": job["data"], "output": job["output"],
            "oracle": job_oracle(job),
            "test_accuracy": result.test_accuracy,
            "val_accuracy": result.best_val_accuracy, "queries": result.queries["images"],
            "steps": result.steps, "seconds": round(time.perf_counter() - t0, 2),
            "config": cfg.to_dict()}


def _cost(job: dict[str, Any]) -> float:
    # white-box steps cost one query per image but a backward pass each: about 4-10x the wall
    # time of a black-box fit per query (measured); the biggest fits start first
    return job["budget"] * (6.0 if job["fields"].get("estimator") == "autograd" else 1.0)


def run_jobs(jobs: Sequence[dict[str, Any]], workers: int,
             done: Callable[[dict[str, Any]], None],
             failed: Callable[[dict[str, Any], BaseException], None],
             ray_address: str | None = None) -> None:
    """Run every job (largest first), calling ``done(row)`` as each finishes and
    ``failed(job, error)`` for one that raises; the others go on. With ``ray_address``
    (``auto``, ``local`` or a cluster's address) each job is a Ray task
    (:mod:`bench.ray_tasks`) instead of a local process."""
    ordered = sorted(jobs, key=_cost, reverse=True)
    if ray_address is not None:
        from bench.ray_tasks import run_jobs_on_ray

        run_jobs_on_ray(ordered, ray_address, run_one, done, failed)
        return
    if workers <= 1:
        for job in ordered:
            try:
                row = run_one(job)
            except Exception as exc:  # reported with the job; the grid goes on
                failed(job, exc)
            else:
                done(row)
        return
    spawn = multiprocessing.get_context("spawn")  # CUDA-safe workers
    with ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        futures = {pool.submit(run_one, job): job for job in ordered}
        for future in as_completed(futures):
            try:
                row = future.result()
            except Exception as exc:
                failed(futures[future], exc)
            else:
                done(row)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None,
                   help="names from the registry, or NAME=key:value,... FitConfig fields "
                        "(default: all that fit --output; with --endpoint, all but white-box)")
    p.add_argument("--budgets", type=int, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", default="digits")
    p.add_argument("--output", default="probs",
                   help="what the oracle reveals: probs, logits, topk:K, topk-names:K, label")
    p.add_argument("--wire", nargs="+", default=["uint8"],
                   help="what the local model receives: uint8, fp32 (the float wire the papers "
                        "assumed), or jpeg:Q as a JPEG API would; several give a column set "
                        "each")
    p.add_argument("--endpoint", default=None, help="run over HTTP against this V2 server")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="fits run in parallel processes")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per fit (0: auto; with --ray, 1), also the CPUs a Ray "
                        "task asks for")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the fits as Ray tasks: 'auto' (the running cluster, else a local "
                        "instance on this machine's cores), 'local' (a fresh local instance) "
                        "or a cluster's address; --jobs is then the cluster's business")
    p.add_argument("--out", default="bench/results/accuracy")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budget, one seed")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished fits recorded in OUT.jsonl (same method, config, "
                        "budget, seed, data, output and oracle; the code version is not "
                        "checked: start afresh after changing the code) and run only the rest; "
                        "without it OUT.jsonl starts empty")
    args = p.parse_args(argv)
    budgets = tuple(args.budgets or (QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS))
    seeds = args.seeds[:1] if args.quick else args.seeds
    methods = [parse_method(m) for m in args.methods or default_methods(args.output)]
    if args.endpoint:
        exact = [name for name, fields in methods if fields.get("estimator") == "autograd"]
        if args.methods and exact:
            raise SystemExit(f"{', '.join(exact)} need{'s' if len(exact) == 1 else ''} exact "
                             "gradients, which an endpoint "
                             "cannot give: drop them from --methods or leave out --endpoint")
        methods = [(n, f) for n, f in methods if f.get("estimator") != "autograd"]
    if args.ray is not None:
        try:
            require_ray()
        except ConfigError as exc:
            raise SystemExit(str(exc)) from None
    threads = args.threads or (1 if args.ray else max(1, (os.cpu_count() or 1)
                                                      // max(args.jobs, 1)))
    jobs = [{"method": name, "fields": fields, "budget": b, "seed": s, "data": args.data,
             "output": args.output, "wire": wire, "endpoint": args.endpoint,
             "device": args.device, "threads": threads}
            for name, fields in methods for wire in args.wire for b in budgets
            for s in seeds]
    if not args.endpoint:  # every configuration is checked before any fit runs
        precheck(methods, min(budgets), seeds[0], args.data, args.output)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stream = out.with_suffix(".jsonl")  # one line per finished fit, written as it finishes
    earlier: dict[str, dict[str, Any]] = {}
    if args.resume and stream.exists():
        for number, line in enumerate(stream.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                earlier[row_key(row)] = row
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"{stream}:{number} is not a result row of this benchmark "
                                 f"({type(exc).__name__}: {exc}); fix or delete that line, or "
                                 "run without --resume to start afresh") from None
    rows: list[dict[str, Any]] = []
    keys = [key_of(job) for job in jobs]
    todo = []
    for job, key in zip(jobs, keys, strict=True):
        if key in earlier:
            rows.append(earlier[key])
        else:
            todo.append(job)
    if args.resume:
        # appended to, never rewritten: rows of other methods or budgets stay in the file
        print(f"resuming: {len(rows)} fits from {stream}, {len(todo)} to run", file=sys.stderr)
    else:
        stream.write_text("")

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        with stream.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  {row['method']:<22} seed {row['seed']} budget {row['budget']:>9,}: "
              f"{row['oracle']}: val {row['val_accuracy']:.3f} test {row['test_accuracy']:.3f} "
              f"({row['seconds']}s) "
              f"[{len(rows)}/{len(jobs)}]", file=sys.stderr, flush=True)

    failures: list[str] = []

    def failed(job: dict[str, Any], exc: BaseException) -> None:
        failures.append(f"{job['method']} seed {job['seed']} budget {job['budget']:,}: "
                        f"{type(exc).__name__}: {exc}")
        print(f"  FAILED {failures[-1]}", file=sys.stderr, flush=True)

    resumed = len(rows)
    t0 = time.perf_counter()
    run_jobs(todo, args.jobs, done, failed, args.ray)
    order = {key: i for i, key in enumerate(keys)}
    rows.sort(key=lambda r: order[row_key(r)])
    if not rows:
        raise SystemExit(f"every fit failed; first: {failures[0]}")
    summary = summarize(rows)
    # resumed rows may come from another machine: name every oracle that made the table
    where = ", ".join(sorted({r["oracle"] if r["oracle"].startswith("HTTP ")
                              else f"local oracle ({r['oracle']})" for r in rows}))
    record = {"data": args.data, "output": args.output, "oracle": where, "seeds": seeds,
              "budgets": list(budgets), "rows": rows, "summary": summary,
              "seconds": round(time.perf_counter() - t0, 1),  # this run's wall time
              "fit_seconds": round(sum(r["seconds"] for r in rows), 1),  # resumed ones too
              "resumed": resumed, "failed": failures}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    plot(summary, out.with_suffix(".png"), f"{args.data}: test accuracy vs queries ({where})")
    print(f"accuracy on {args.data} ({where}), validation mean / test mean ± std over seeds "
          f"{seeds}:")
    print(table(summary))
    print("\n".join(ranking_lines(summary)))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} "
          f"in {record['seconds']}s")
    if failures:
        print(f"{len(failures)} of {len(jobs)} fits failed (not in the table): "
              + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
