"""Prompts for a vision-language model: zero-shot, CoOp, Bahng's and black-box pixel prompts.

``python -m bench.vlm`` runs, on ``shapes-clip`` for each task (``colours``: class names the
model has read; ``digits``: names it has never read) and seed: zero-shot classification with
the hand-written template (no fit), CoOp's context vectors (unified and class-specific, M = 4
and 16, CoOp's optimizer, white-box), Bahng et al.'s padding prompt (white-box, its preset),
and black-box prompts through a real ``reprogram-server --model shapes-clip --context-input``'s
zero-shot API (the target's class names as labels, no label map): pixel prompts (our defaults,
BlackVIP's SPSA-GC on Bahng's prompt, BlackVIP with its Coordinator) and context vectors sent
through the ``context`` input (BPT-VLM's CMA-ES), at each budget. Every row reports
validation and test accuracy (the test split once, after selection on validation) and the
image evaluations it used.
Finished rows are kept in ``OUT.jsonl`` and reused with ``--resume``.

``--variants FILE`` adds black-box rows, one ``name={json fit fields}`` per line (the sweep of
pixel prompts on colours in ``bench/sweeps/vlm-pixel.txt``); ``--local`` runs the black-box
rows on the local model instead of over HTTP (the same answers, without the transport).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import server_process
from reprogram.config import FitConfig, recommended_config
from reprogram.data import load_dataset
from reprogram.defaults import CONTEXT_PROGRAM
from reprogram.fit import fit
from reprogram.http_oracle import HttpOracle
from reprogram.oracles import LocalOracle, Oracle
from reprogram.presets import PRESETS
from reprogram.program_spec import ProgramSpec
from reprogram.zoo.registry import load_model

MODEL = "shapes-clip"
WHITE_BOX = {f"coop-m{m}": dict(CONTEXT_PROGRAM, program="coop", tokens=m) for m in (4, 16)}
WHITE_BOX.update({f"coop-csc-m{m}": dict(CONTEXT_PROGRAM, program="coop-csc", tokens=m)
                  for m in (4, 16)})
WHITE_BOX["bahng-pad"] = dict(PRESETS["bahng-pad"].values)
# Bahng et al. train for 1000 epochs (hjbahng/visual_prompting main_clip.py --epochs 1000);
# the other white-box rows for --epochs
EPOCHS = {"bahng-pad": 1000}
# our black-box defaults with a smaller step: on colours (seed 0, 60k queries, local model)
# validation stayed at zero-shot's 0.817 with the default lr 0.05 (every step lowered it),
# reached 0.844 with 0.01 and 0.833 with 0.002; chosen on validation, as every default
BLACK_BOX = {"ours": {"estimator": "rgf", "lr": 0.01},
             "blackvip-vp": dict(PRESETS["blackvip-vp"].values),
             "blackvip": dict(PRESETS["blackvip"].values),
             "bpt-vlm": dict(PRESETS["bpt-vlm"].values)}


def zero_shot_row(task: str, seed: int) -> dict[str, Any]:
    """The hand template's accuracy on the fit's validation and test splits (each image
    resized to fill the frame, as the context rows see it)."""
    cfg = FitConfig(budget=1, seed=seed)
    data = load_dataset(task, seed=seed)
    _, val, test = data.split(cfg.val_fraction, cfg.test_fraction, seed)
    oracle = LocalOracle(load_model(MODEL))
    oracle.use_labels(tuple(data.class_names))
    size = oracle.info.input_size
    prepare = ProgramSpec(kind="full", frame_size=size, inner_size=min(size)).input_transform()

    def accuracy(part: Any) -> float:
        with torch.no_grad():
            scores = oracle.query(prepare(part.images))
        return float((scores.argmax(1) == part.labels).float().mean())

    return {"val_accuracy": accuracy(val), "test_accuracy": accuracy(test),
            "queries": len(val) + len(test)}


def fit_row(fields: dict[str, Any], task: str, seed: int, oracle: Oracle,
            budget: int | None, epochs: int | None) -> dict[str, Any]:
    options = {k: v for k, v in fields.items() if k != "estimator"}
    options.setdefault("labelmap", "first")  # the model's classes are the target's
    if options.get("labelmap") in ("frequency", "linear"):
        options["labelmap"] = "first"
    cfg = recommended_config(str(fields.get("estimator", "autograd")), **options,
                             budget=budget, epochs=epochs, seed=seed)
    result = fit(cfg, oracle, load_dataset(task, seed=seed))
    return {"val_accuracy": result.best_val_accuracy, "test_accuracy": result.test_accuracy,
            "queries": result.queries["images"], "steps": result.steps,
            "config": cfg.to_dict()}


def _jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    jobs = []
    for task in args.tasks:
        for seed in args.seeds:
            jobs.append({"method": "zero-shot", "task": task, "seed": seed, "budget": None})
            jobs += [{"method": m, "task": task, "seed": seed, "budget": None}
                     for m in args.white_box]
            jobs += [{"method": m, "task": task, "seed": seed, "budget": b}
                     for m in args.black_box for b in args.budgets]
    return jobs


def _key(job: dict[str, Any]) -> str:
    return f"{job['method']}|{job['task']}|{job['seed']}|{job['budget']}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vlm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["colours", "digits"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--white-box", nargs="*", default=list(WHITE_BOX), choices=list(WHITE_BOX))
    p.add_argument("--variants", type=Path, default=None, metavar="FILE",
                   help="more black-box rows: name={json fields} per line")
    p.add_argument("--local", action="store_true",
                   help="black-box rows on the local model, not over HTTP")
    p.add_argument("--black-box", nargs="*", default=None,
                   help=f"black-box rows (default {' '.join(BLACK_BOX)}; with --variants, the"
                        " variants)")
    p.add_argument("--budgets", type=int, nargs="+", default=[30_000, 100_000, 300_000])
    p.add_argument("--epochs", type=int, default=50, help="white-box rows: epochs")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/vlm-cpu"))
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    variants = _variants(args.variants) if args.variants is not None else {}
    black_box = {**BLACK_BOX, **variants}
    if args.black_box is None:
        args.black_box = list(variants or BLACK_BOX)
    unknown = sorted(set(args.black_box) - set(black_box))
    if unknown:
        p.error(f"unknown black-box rows {unknown}; expected some of {sorted(black_box)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    stream = args.out.with_suffix(".jsonl")
    stream.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if args.resume and stream.exists():
        for line in stream.read_text().splitlines():
            row = json.loads(line)
            done[_key(row)] = row
    jobs = [j for j in _jobs(args) if _key(j) not in done]
    print(f"{len(done)} rows kept, {len(jobs)} to run", flush=True)
    with server_process(["--model", MODEL, "--max-batch", "512", "--context-input"]) as url:
        for job in jobs:
            t0 = time.perf_counter()
            if job["method"] == "zero-shot":
                row = zero_shot_row(job["task"], job["seed"])
            elif job["budget"] is None:
                row = fit_row(WHITE_BOX[job["method"]], job["task"], job["seed"],
                              LocalOracle(load_model(MODEL)), None,
                              EPOCHS.get(job["method"], args.epochs))
            else:
                oracle = LocalOracle(load_model(MODEL)) if args.local else HttpOracle(url)
                try:
                    row = fit_row(black_box[job["method"]], job["task"], job["seed"], oracle,
                                  job["budget"], None)
                finally:
                    if isinstance(oracle, HttpOracle):
                        oracle.close()
            row = {**job, **row, "seconds": round(time.perf_counter() - t0, 1)}
            done[_key(row)] = row
            with stream.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{job['method']:14s} {job['task']:8s} seed {job['seed']} budget"
                  f" {job['budget']}: val {row['val_accuracy']:.3f} test"
                  f" {row['test_accuracy']:.3f} ({row['seconds']} s)", flush=True)
    rows = list(done.values())
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(report(rows))
    return 0


def _variants(path: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, fields = line.partition("=")
            out[name.strip()] = json.loads(fields)
    return out


def report(rows: list[dict[str, Any]]) -> str:
    """A markdown table: method x task, mean validation / test ± std over seeds."""
    groups: dict[tuple[str, Any, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"], r["task"]), []).append(r)
    tasks = sorted({r["task"] for r in rows})
    lines = ["| method | budget | " + " | ".join(f"{t} val / test" for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for method, budget in dict.fromkeys((m, b) for m, b, _ in groups):
        cells = []
        for t in tasks:
            g = groups.get((method, budget, t), [])
            if not g:
                cells.append("-")
                continue
            test = torch.tensor([r["test_accuracy"] for r in g])
            val = sum(r["val_accuracy"] for r in g) / len(g)
            spread = f" ± {float(test.std()):.3f}" if len(g) > 1 else ""
            cells.append(f"{val:.3f} / {float(test.mean()):.3f}{spread} (n={len(g)})")
        lines.append(f"| {method} | {budget or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
