"""The CLI's command handlers: arguments in, library calls, human-readable output."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from reprogram.artifact import Prompt, check_compatible, load_prompt, save_prompt
from reprogram.config import FitConfig, recommended_config
from reprogram.context import CONTEXT_KINDS
from reprogram.data import TargetDataset, load_dataset
from reprogram.defaults import (
    CONTEXT_BLACK_BOX,
    CONTEXT_PROGRAM,
    LABEL_VOTES,
    TOKEN_PROGRAM,
    WARM_START_EPOCHS,
    blackbox_estimator,
)
from reprogram.errors import ConfigError, DataError
from reprogram.oracles import Oracle
from reprogram.plots import learning_curve, program_picture
from reprogram.vlm import bind_prompt_labels

log = logging.getLogger("reprogram")


def _progress(total: int | None, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", unit_scale=True, disable=not enabled,
                dynamic_ncols=True, desc="fit", file=sys.stderr)


# Test hook: the README's test (tests/test_readme.py) runs its long fits short by setting this
# variable; when it is unset (as for every user) ``--budget`` is used exactly as given.
BUDGET_CAP_ENV = "REPROGRAM_BUDGET_CAP"


def capped_budget(budget: int | None) -> int | None:
    """``--budget``, lowered to ``$REPROGRAM_BUDGET_CAP`` when that is set and smaller."""
    raw = os.environ.get(BUDGET_CAP_ENV)
    if not raw or budget is None:
        return budget
    try:
        cap = int(raw)
    except ValueError:
        raise ConfigError(f"expected an integer in ${BUDGET_CAP_ENV}, got {raw!r}") from None
    if budget <= cap:
        return budget
    log.warning("--budget %d capped to %d by $%s", budget, cap, BUDGET_CAP_ENV)
    return cap


def fit_config_from_args(args: argparse.Namespace, differentiable: bool = True,
                         output: str = "probs") -> FitConfig:
    """The fit config of ``reprogram fit``: ``--preset NAME`` (an anchor method, every value
    as its paper's code sets it), or the recommended defaults, where the estimator defaults to
    autograd on a differentiable local model and, on an endpoint or an ONNX model, to the
    black-box estimator for the budget and answer kind (``output``: probs, logits, topk or
    label; :func:`reprogram.defaults.blackbox_estimator`), and a label-only API adds label
    votes (:data:`reprogram.defaults.LABEL_VOTES`); the options given on the command line
    override either."""
    checkpoint = args.checkpoint or str(Path(args.out).with_suffix(".ckpt"))
    options = dict(
        program=args.program, inner_size=args.inner_size, resolution=args.resolution,
        labelmap=args.labelmap, sources_per_target=args.sources_per_target,
        q=args.q, mu=args.mu, antithetic=args.antithetic, spsa_c=args.spsa_c,
        cma_sigma=args.cma_sigma, cma_popsize=args.cma_popsize, remainder=args.remainder,
        label_votes=args.label_votes, vote_noise=args.vote_noise,
        optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
        budget=capped_budget(args.budget), eval_every=args.eval_every, seed=args.seed,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        checkpoint=checkpoint, checkpoint_every=args.checkpoint_every,
        weight_penalty=args.weight_penalty, estimator=args.estimator,
        coordinator_encoder=args.coordinator_encoder, coordinator_eps=args.coordinator_eps,
        tokens=args.tokens,
    )
    options.update(_surrogate_options(args))
    if getattr(args, "preset", None):
        from reprogram.presets import preset_config

        return preset_config(args.preset, **options)
    # the budget as given picks the estimator, so a capped test run fits what a user's would
    black_box = ((bool(args.endpoint) and not getattr(args, "on_server", False))
                 or not differentiable)
    context = options["program"] in CONTEXT_KINDS
    estimator = options.pop("estimator")
    if estimator is None:  # context vectors through an API: CMA-ES, as BPT-VLM
        estimator = "cma" if context and black_box else _default_estimator(
            dict(options, budget=args.budget), black_box, output)
    if output == "label":
        options.update({k: v for k, v in LABEL_VOTES.items() if options.get(k) is None})
    if options["program"] in ("vpt-shallow", "vpt-deep"):
        options.update({k: v for k, v in TOKEN_PROGRAM.items() if options.get(k) is None})
    if context:
        options.update({k: v for k, v in _context_defaults(estimator).items()
                        if options.get(k) is None})
    return recommended_config(estimator, **options)


# what a black-box context fit with another estimator than CMA-ES keeps of BPT-VLM's defaults
_CONTEXT_SHAPE = ("labelmap", "tokens", "batch_size")


def _context_defaults(estimator: str) -> dict[str, Any]:
    """CoOp's optimizer white-box, BPT-VLM's CMA-ES black-box, else BPT-VLM's geometry."""
    if estimator == "autograd":
        return CONTEXT_PROGRAM
    if estimator == "cma":
        return CONTEXT_BLACK_BOX
    return {k: CONTEXT_BLACK_BOX[k] for k in _CONTEXT_SHAPE}
# options that only RGF reads: given without --estimator, they ask for RGF
_RGF_OPTIONS = ("q", "mu", "antithetic")


def _default_estimator(options: dict[str, Any], black_box: bool, output: str) -> str:
    if not black_box:
        return "autograd"
    if (any(options.get(k) is not None for k in _RGF_OPTIONS)
            or options.get("optimizer") not in (None, "cma")):
        return "rgf"
    return blackbox_estimator(options["budget"], output)


def _surrogate_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--surrogate``: the estimator (prgf for the prior) and the warm start's epochs."""
    surrogate = getattr(args, "surrogate", None)
    if surrogate is None:
        if getattr(args, "warm_start_epochs", None):
            raise ConfigError("expected --surrogate MODEL with --warm-start-epochs")
        return {}
    use = args.surrogate_use
    out: dict[str, Any] = {"surrogate": surrogate, "warm_start_epochs": 0}
    if use in ("both", "warm"):
        out["warm_start_epochs"] = (WARM_START_EPOCHS if args.warm_start_epochs is None
                                    else args.warm_start_epochs)
    if use in ("both", "prior") and args.estimator is None:
        out["estimator"] = "prgf"
    return out


def _scale(args: argparse.Namespace, cfg: FitConfig, oracle: Oracle,
           data: TargetDataset) -> tuple[FitConfig, list[dict[str, Any]] | None]:
    """Apply ``--scale auto|S`` (AutoVP's input scaling, :mod:`reprogram.scaling`)."""
    from reprogram.scaling import scaled_inner, search_scale

    if args.scale is None:
        return cfg, None
    if args.inner_size is not None:
        raise ConfigError("expected --scale or --inner-size, got both")
    if args.scale == "auto":
        if args.resume:
            raise ConfigError("expected --scale auto without --resume; resume with "
                              "--inner-size N, N being the size the search chose")
        cfg, trials = search_scale(cfg, oracle, data)
        return cfg, [t.to_dict() for t in trials]
    try:
        scale = float(args.scale)
    except ValueError:
        raise ConfigError(f"expected --scale auto or a number, got {args.scale!r}") from None
    inner = scaled_inner(cfg.program, oracle.info.input_size, scale)
    return replace(cfg, inner_size=inner), None


def cmd_fit(args: argparse.Namespace, oracle: Oracle) -> int:
    from reprogram.fit import fit

    cfg = fit_config_from_args(args, oracle.differentiable, oracle.info.base_kind)
    if cfg.epochs is None and cfg.budget is None:
        raise ConfigError("expected --budget N or --epochs N")
    if oracle.zero_shot and args.labelmap is None:  # class k is target class k: no map
        cfg = replace(cfg, labelmap="first")
    out = Path(args.out)
    if not out.parent.exists():
        raise ConfigError(f"expected an existing folder for --out, got {str(out.parent)!r}")
    if out.is_dir():
        raise ConfigError(f"expected a file path for --out, got the folder {str(out)!r}")
    data = load_dataset(args.data, seed=cfg.seed)
    cfg, trials = _scale(args, cfg, oracle, data)
    bars: list[Any] = []  # opened at the first step: a fit that fails to start draws nothing

    def on_step(row: dict[str, Any]) -> None:
        if not bars:
            bars.append(_progress(cfg.budget, not args.no_progress))
        bar = bars[0]
        bar.update(row["queries"] - bar.n)
        post = {"loss": f"{row['loss']:.3f}" if row.get("loss") is not None else "-",
                "best_val": f"{row['best_val_accuracy']:.3f}"}
        bar.set_postfix(post, refresh=False)

    try:
        result = fit(cfg, oracle, data, resume=args.resume, callback=on_step)
    finally:
        for bar in bars:
            bar.close()
    prompt = result.prompt
    if trials is not None:
        prompt = replace(prompt, metrics={**prompt.metrics, "scale_search": trials})
    save_prompt(prompt, out)
    curve = learning_curve(result.history, out.with_suffix(".curve.png"),
                           title=f"{cfg.estimator} on {data.name}")
    summary = {
        "prompt": str(out), "learning_curve": str(curve),
        "val_accuracy": round(result.best_val_accuracy, 4),
        "test_accuracy": None if result.test_accuracy is None else round(result.test_accuracy, 4),
        "queries": result.queries, "steps": result.steps, "stopped": result.stop_reason,
        "seconds": round(result.seconds, 1),
    }
    if trials is not None:
        summary["scale_search"] = trials
        summary["inner_size"] = cfg.inner_size
    print(json.dumps(summary, indent=2))
    return 0


def cmd_fit_on_server(args: argparse.Namespace) -> int:
    """``reprogram fit --endpoint URL --on-server``: the server fits the config a local
    ``reprogram fit --model`` would, white-box, as a tuning job (:mod:`reprogram.remote`)."""
    from reprogram.remote import fit_on_server

    if not args.endpoint:
        raise ConfigError("expected --endpoint URL with --on-server (the server that fits)")
    for flag, given in (("--resume", args.resume), ("--scale", args.scale),
                        ("--surrogate", args.surrogate), ("--model", args.model)):
        if given:
            raise ConfigError(f"expected no {flag} with --on-server: the server runs the fit")
    cfg = fit_config_from_args(args, differentiable=True)
    if cfg.epochs is None and cfg.budget is None:
        raise ConfigError("expected --budget N or --epochs N")
    out = Path(args.out)
    if not out.parent.exists():
        raise ConfigError(f"expected an existing folder for --out, got {str(out.parent)!r}")
    result = fit_on_server(args, cfg, lambda total: _progress(total, not args.no_progress))
    print(json.dumps(result, indent=2))
    return 0


def _prompt_for(args: argparse.Namespace, oracle: Oracle) -> Prompt:
    prompt = load_prompt(args.prompt)
    oracle.adopt_vocabulary(prompt.source.get("vocabulary"))
    bind_prompt_labels(oracle, prompt)  # a zero-shot model: the prompt's classes and template
    info = oracle.info
    check_compatible(prompt, info.input_size, info.num_classes, info.fingerprint,
                     allow_unverified=getattr(args, "allow_unverified_model", False),
                     oracle=oracle)
    return prompt


def evaluation_split(prompt: Prompt, data: TargetDataset, split: str) -> TargetDataset:
    """The split of ``data`` that the prompt's own fit used (same seed and fractions)."""
    if split == "all":
        return data
    cfg = FitConfig.from_dict(prompt.config) if prompt.config else None
    if cfg is None:
        raise ConfigError("prompt records no fit config; use --split all")
    train, val, test = data.split(cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return {"train": train, "val": val, "test": test}[split]


def cmd_eval(args: argparse.Namespace, oracle: Oracle) -> int:
    prompt = _prompt_for(args, oracle)
    data = load_dataset(args.data, seed=prompt.seed)
    if tuple(data.class_names) != prompt.target_classes:
        raise DataError(f"expected classes {list(prompt.target_classes)}, got "
                        f"{list(data.class_names)}")
    part = evaluation_split(prompt, data, args.split)
    model = prompt.build()
    acc = model.accuracy(part.images, part.labels, oracle)
    print(json.dumps({"prompt": args.prompt, "data": args.data, "split": args.split,
                      "images": len(part), "accuracy": round(acc, 6),
                      "queries": oracle.counts()}, indent=2))
    return 0


def read_images(paths: list[str]) -> torch.Tensor:
    """Image files as uint8 RGB ``[N,3,H,W]`` (resized to the first image's size)."""
    arrays: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    for p in paths:
        try:
            with Image.open(p) as img:
                rgb = img.convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image {p!r}: {exc}") from exc
        size = size or rgb.size
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        arrays.append(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


def cmd_apply(args: argparse.Namespace, oracle: Oracle) -> int:
    if args.top_k < 1:
        raise ConfigError(f"expected --top-k >= 1, got {args.top_k}")
    prompt = _prompt_for(args, oracle)
    model = prompt.build()
    probs = model.predict_proba(read_images(args.images), oracle)
    k = min(args.top_k, probs.shape[1])
    for path, row in zip(args.images, probs, strict=True):
        top = row.topk(k)
        print(json.dumps({"image": path, "label": prompt.target_classes[int(top.indices[0])],
                          "top": [{"label": prompt.target_classes[int(i)],
                                   "score": round(float(v), 6)}
                                  for v, i in zip(top.values, top.indices, strict=True)]}))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    prompt = load_prompt(args.prompt)
    meta = prompt.metadata()
    meta["tensors"] = {k: list(v.shape) for k, v in prompt.tensors.items()}
    print(json.dumps(meta, indent=2))
    if args.png:
        model = prompt.build()
        if args.data:
            samples = load_dataset(args.data).images[:6]
        else:
            inner = prompt.program.inner_size
            samples = torch.full((1, 3, inner, inner), 128, dtype=torch.uint8)
        with torch.no_grad():
            framed = model.program.render(samples)
            pixels = model.program.delta()
        print(f"wrote {program_picture(pixels, framed, Path(args.png))}", file=sys.stderr)
    return 0
