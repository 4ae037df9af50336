"""Visual Prompt Tuning on the zoo's ViT: accuracy, trainable parameters and image evaluations.

    python -m bench.vpt --budget 30000 --seeds 0 1 2 --jobs 2 --out bench/results/vpt-cpu

Every row learns digits on ``shapes-vit`` (white-box, autograd, the uint8 wire) within the same
budget of image evaluations (training forward passes and validations together, as
``reprogram fit --budget`` counts them), the prompt chosen on validation and the test split
scored once: VPT-shallow and VPT-deep at N = 1, 5, 10, 50 tokens with VPT's head, the pixel
programs ``full`` and ``expand`` with the linear map over the source logits, a linear probe
(VPT's head on the class token, no tokens), and full fine-tuning (every weight and a new head)
as the ceiling, its learning rate chosen on validation (seed 0) from :data:`FINETUNE_LRS`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from reprogram.config import recommended_config
from reprogram.data import load_dataset
from reprogram.oracles import LocalOracle, quantize_uint8
from reprogram.program_spec import InputTransform
from reprogram.zoo.registry import load_model

MODEL = "shapes-vit"
TOKEN_COUNTS = (1, 5, 10, 50)
# method -> the FitConfig fields on top of `reprogram fit --model`'s autograd defaults
METHODS: dict[str, dict[str, Any]] = {
    **{f"vpt-{d}-{n}": {"program": f"vpt-{d}", "tokens": n, "labelmap": "head"}
       for d in ("shallow", "deep") for n in TOKEN_COUNTS},
    "pixel-full": {"program": "full", "labelmap": "linear"},
    "pixel-expand": {"program": "expand", "labelmap": "linear"},
    "linear-probe": {"program": "vpt-shallow", "tokens": 0, "labelmap": "head"},
}
FINETUNE_LRS = (1e-4, 3e-4, 1e-3)
EVALS = 10  # validations of a fine-tuning run (about 10% of the budget at 30k)


def _fit_row(method: str, budget: int, seed: int) -> dict[str, Any]:
    from reprogram.fit import fit

    torch.set_num_threads(1)
    cfg = recommended_config("autograd", budget=budget, seed=seed, **METHODS[method])
    t0 = time.perf_counter()
    result = fit(cfg, LocalOracle(load_model(MODEL)), load_dataset("digits"))
    params = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    return {"method": method, "budget": budget, "seed": seed,
            "val_accuracy": result.best_val_accuracy, "test_accuracy": result.test_accuracy,
            "trainable_parameters": params, "images": result.queries["images"],
            "seconds": round(time.perf_counter() - t0, 1), "config": cfg.to_dict()}


@torch.no_grad()
def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    pred = torch.cat([net(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean()) if len(y) else 0.0


def _finetune_row(budget: int, seed: int, lr: float) -> dict[str, Any]:
    """Every weight of the ViT and a new linear head, Adam at ``lr``, batches of 32; the
    budget pays for the training forward passes and ``EVALS`` validations."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    source = load_model(MODEL)
    train, val, test = load_dataset("digits").split(0.15, 0.25, seed)
    size = source.meta.input_size[0]
    prep = InputTransform(size)

    def frames(images: torch.Tensor) -> torch.Tensor:
        return quantize_uint8(prep(images)).detach()

    net = copy.deepcopy(source.module)
    vit: Any = list(net.children())[-1]
    vit.head = torch.nn.Linear(vit.head.in_features, 10)
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x_tr, y_tr, x_va = frames(train.images), train.labels, frames(val.images)
    steps = max(1, (budget - EVALS * len(val)) // 32)
    every = max(1, math.ceil(steps / EVALS))
    gen = torch.Generator().manual_seed(seed + 1)

    def batches() -> Any:
        while True:
            perm = torch.randperm(len(train), generator=gen)
            for i in range(0, len(train) - 31, 32):
                yield perm[i : i + 32]

    best, best_state, used, t0 = -1.0, None, 0, time.perf_counter()
    stream = batches()
    for step in range(steps):
        idx = next(stream)
        net.train()
        loss = F.cross_entropy(net(x_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        used += len(idx)
        if (step + 1) % every == 0 or step + 1 == steps:
            acc = _accuracy(net, x_va, val.labels)
            used += len(val)
            if acc > best:
                best, best_state = acc, copy.deepcopy(net.state_dict())
    assert best_state is not None
    net.load_state_dict(best_state)
    params = sum(p.numel() for p in net.parameters())
    return {"method": "finetune", "budget": budget, "seed": seed, "lr": lr,
            "val_accuracy": best, "test_accuracy": _accuracy(net, frames(test.images),
                                                             test.labels),
            "trainable_parameters": params, "images": used,
            "seconds": round(time.perf_counter() - t0, 1)}


def _run(job: tuple[str, int, int, float | None]) -> dict[str, Any]:
    method, budget, seed, lr = job
    if method == "finetune":
        assert lr is not None
        return _finetune_row(budget, seed, lr)
    return _fit_row(method, budget, seed)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: validation mean / test mean +- std, parameters, images, per method."""
    out = ["| method | trainable parameters | validation / test ± std | images |",
           "|---|---|---|---|"]
    for method in [*METHODS, "finetune"]:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        val = statistics.mean(r["val_accuracy"] for r in mine)
        tests = [r["test_accuracy"] for r in mine]
        std = statistics.stdev(tests) if len(tests) > 1 else 0.0
        out.append(f"| `{method}` | {mine[0]['trainable_parameters']:,} | {val:.3f} / "
                   f"{statistics.mean(tests):.3f} ± {std:.3f} | "
                   f"{max(r['images'] for r in mine):,} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=30_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=[*METHODS, "finetune"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vpt-cpu"))
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        if "finetune" in args.methods:  # the learning rate, on validation (seed 0)
            sweep = list(pool.map(_run, [("finetune", args.budget, args.seeds[0], lr)
                                         for lr in FINETUNE_LRS]))
            lr = max(sweep, key=lambda r: r["val_accuracy"])["lr"]
            for r in sweep:
                r["sweep"] = True
            rows += sweep
        jobs = [(m, args.budget, s, None) for m in args.methods if m != "finetune"
                for s in args.seeds]
        if "finetune" in args.methods:
            jobs += [("finetune", args.budget, s, lr) for s in args.seeds[1:]]
        for row in pool.map(_run, jobs):
            print(json.dumps({k: row[k] for k in ("method", "seed", "val_accuracy",
                                                  "test_accuracy")}), flush=True)
            rows.append(row)
    if "finetune" in args.methods:
        chosen = [r for r in rows if r["method"] == "finetune" and r["lr"] == lr]
        rows = [r for r in rows if r["method"] != "finetune"] + chosen
        rows += [dict(r, method="finetune-sweep") for r in sweep if r["lr"] != lr]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
