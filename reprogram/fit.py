"""One fit loop for every estimator: white-box autograd and black-box zeroth-order alike.

data -> program -> oracle -> label map -> loss -> estimator -> torch optimizer. The train /
validation / test split is seeded; the best program is chosen on validation and the test
split is evaluated once, at the end. Checkpoints hold the complete state (parameters,
optimizer, schedule, estimator RNG, data order, query counts), so a resumed fit ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reprogram.artifact import Prompt
from reprogram.config import FitConfig
from reprogram.context import CONTEXT_KINDS
from reprogram.data import TargetDataset
from reprogram.errors import BudgetExhausted, ConfigError
from reprogram.fsutil import write_atomic
from reprogram.labelmaps import build_labelmap
from reprogram.oracles import Oracle
from reprogram.pipeline import Reprogrammer
from reprogram.prgf import PRGFEstimator
from reprogram.program_spec import TOKEN_KINDS
from reprogram.programs import build_program
from reprogram.surrogate import Surrogate, warm_start
from reprogram.votes import vote_noise

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]

# where a fit's wall time goes: model queries (all of them), then the client's work in each
# phase without its queries (estimator: candidates, program rendering, label map and loss).
# On a GPU, kernels run asynchronously: their time lands in whichever phase waits for them.
PHASES = ("queries", "estimator", "optimizer", "validation", "labelmap_fit", "test")


@dataclass
class FitResult:
    """What a fit produced: the best (validation-selected) prompt and how it got there."""

    model: Reprogrammer
    prompt: Prompt
    history: list[dict[str, Any]]
    best_val_accuracy: float
    best_step: int
    test_accuracy: float | None
    steps: int
    queries: dict[str, int]
    stop_reason: str
    seconds: float
    # wall seconds of this process's run per phase (PHASES), model queries apart
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    batch_idx: int = 0
    data_gen: torch.Generator = field(default_factory=torch.Generator)
    epoch_gen_state: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: float = -1.0
    best_step: int = 0
    best_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    last_eval_step: int = -1


_CHECKPOINT_KEYS = frozenset({
    "config", "model", "optimizer", "scheduler", "estimator", "oracle", "step", "epoch",
    "batch_idx", "epoch_gen_state", "history", "best_val", "best_step", "best",
    "last_eval_step",
})


def _snapshot(model: Reprogrammer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


MAX_EVALUATIONS = 25
EVAL_SHARE = 0.1


def plan(cfg: FitConfig, per_step: int, n_train: int, n_val: int,
         labelmap_cost: int) -> tuple[int, int]:
    """``(total steps, steps between validations)`` from epochs, the budget, or both.

    Unless ``eval_every`` is set, a fit validates at most 25 times and, under a budget, spends
    at most about 10% of it on validation; one final validation is always reserved.
    """
    per_epoch = math.ceil(n_train / cfg.batch_size)
    steps = cfg.epochs * per_epoch if cfg.epochs else None
    n_evals = MAX_EVALUATIONS
    if cfg.budget is not None:
        spendable = cfg.budget - n_val - labelmap_cost
        if cfg.eval_every is not None:
            by_budget = int(spendable / (per_step + n_val / cfg.eval_every))
        else:
            n_evals = max(1, min(MAX_EVALUATIONS, int(EVAL_SHARE * spendable / max(n_val, 1))))
            by_budget = int((spendable - n_evals * n_val) / per_step)
        steps = by_budget if steps is None else min(steps, by_budget)
    total = max(int(steps or 0), 1)
    return total, cfg.eval_every or max(1, -(-total // n_evals))


class Fitter:
    """Runs :func:`fit`; holds the pieces so checkpoints can capture and restore them."""

    def __init__(self, cfg: FitConfig, oracle: Oracle, data: TargetDataset, *,
                 surrogate: Surrogate | None = None,
                 init: dict[str, torch.Tensor] | None = None) -> None:
        self.cfg = cfg
        self.oracle = oracle
        if oracle.zero_shot:  # a vision-language model: the target's names are its classes
            oracle.use_labels(tuple(data.class_names))
        self.train, self.val, self.test = data.split(cfg.val_fraction, cfg.test_fraction,
                                                     cfg.seed)
        info = oracle.info
        vit = oracle.token_adapter() if cfg.program in TOKEN_KINDS else None
        text = (oracle.context_width(), info.num_classes) if cfg.program in CONTEXT_KINDS else None
        spec = cfg.program_spec(info.input_size, native_size=min(data.images.shape[2:]),
                                vit=vit, text=text)
        program = build_program(spec, seed=cfg.seed)
        num_source = vit.width if vit is not None and cfg.labelmap == "head" else info.num_classes
        labelmap = build_labelmap(cfg.labelmap_spec(num_source, data.num_classes))
        self.model = Reprogrammer(program, labelmap, floor=cfg.floor, remainder=cfg.remainder,
                                  weight_penalty=cfg.weight_penalty).to(oracle.device)
        if init is not None:  # a warm start (reprogram.surrogate.warm_start)
            self.model.load_state_dict(init)
        if surrogate is None and cfg.surrogate is not None:
            surrogate = Surrogate(cfg.surrogate, oracle)
        self.surrogate = surrogate
        self.estimator = cfg.build_estimator()
        self.estimator.check(oracle.differentiable)
        if oracle.budget is None and cfg.budget is not None:
            oracle.budget = cfg.budget
        self.x_train = self.model.transform(self.train.images)
        self.y_train = self.train.labels.to(oracle.device)
        n_train = len(self.train)
        self.steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        if cfg.label_votes > 1 and oracle.info.base_kind != "label":
            raise ConfigError(f"expected a label-only API for label votes (label_votes "
                              f"{cfg.label_votes}), got one that answers "
                              f"{oracle.info.base_kind}; votes only help label answers")
        self.queries_per_step = self.estimator.queries_per_step * cfg.label_votes
        per_step = self.queries_per_step * min(cfg.batch_size, n_train)
        lm_cost = n_train if labelmap.needs_fit else 0
        # a step is taken only while a final validation stays affordable (see run())
        least = 2 * len(self.val) + lm_cost + per_step
        if cfg.budget is not None and cfg.budget < least:
            raise ConfigError(f"expected a budget of at least {least} images (two validations "
                              f"of {len(self.val)}, a label-map fit of {lm_cost} and one step "
                              f"of {per_step}), got {cfg.budget}")
        if labelmap.refit_every_epoch:  # one more pass over the training set per epoch
            per_step += math.ceil(n_train / self.steps_per_epoch)
        self.total_steps, self.eval_every = plan(cfg, per_step, n_train, len(self.val),
                                                 lm_cost)
        head = list(labelmap.parameters())
        self.optimizer, self.scheduler = cfg.build_optimizer(
            program.theta, head, self.total_steps, self.steps_per_epoch)
        self.state = _State()
        self.state.data_gen.manual_seed(cfg.seed + 1)
        # seconds per phase, model queries apart (see _phase); not saved in checkpoints
        self.timings = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[name]``, less the oracle's query time,
        which goes to ``timings["queries"]``."""
        t0, q0 = time.perf_counter(), self.oracle.query_seconds
        try:
            yield
        finally:
            queries = self.oracle.query_seconds - q0
            self.timings["queries"] += queries
            self.timings[name] += time.perf_counter() - t0 - queries

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_payload(self) -> dict[str, Any]:
        s = self.state
        return {
            "config": self.cfg.to_dict(),
            "model": _snapshot(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "estimator": self.estimator.state_dict(),
            "oracle": self.oracle.counts(),
            "step": s.step, "epoch": s.epoch, "batch_idx": s.batch_idx,
            "epoch_gen_state": s.epoch_gen_state, "history": s.history,
            "best_val": s.best_val, "best_step": s.best_step, "best": s.best_tensors,
            "last_eval_step": s.last_eval_step,
        }

    def restore(self, path: Path) -> None:
        try:
            ck = torch.load(str(path), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise ConfigError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
        except Exception as exc:  # torch's unpickler raises KeyError, IndexError ... on junk
            raise ConfigError(f"cannot read checkpoint {str(path)!r}: expected a file written "
                              f"by `reprogram fit`, got {type(exc).__name__}: {exc}") from exc
        if not isinstance(ck, dict) or not set(ck) >= _CHECKPOINT_KEYS:
            raise ConfigError(f"expected a checkpoint written by `reprogram fit` at "
                              f"{str(path)!r}, got another file")
        mine = {k: v for k, v in self.cfg.to_dict().items() if k != "checkpoint"}
        try:  # a config saved before a field existed ran as that field's default
            saved = FitConfig.from_dict(ck["config"]).to_dict()
        except (ConfigError, TypeError, ValueError):
            saved = dict(ck["config"])
        theirs = {k: v for k, v in saved.items() if k != "checkpoint"}
        if mine != theirs:
            diff = sorted(k for k in mine if mine.get(k) != theirs.get(k))
            raise ConfigError(f"checkpoint {str(path)!r} was made with other settings "
                              f"({', '.join(diff)}); use the same options to resume")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.estimator.load_state_dict(ck["estimator"])
        self.oracle.load_counts(ck["oracle"])
        s = self.state
        s.step, s.epoch, s.batch_idx = ck["step"], ck["epoch"], ck["batch_idx"]
        s.epoch_gen_state = ck["epoch_gen_state"]
        s.history, s.best_val, s.best_step = ck["history"], ck["best_val"], ck["best_step"]
        s.best_tensors, s.last_eval_step = ck["best"], ck["last_eval_step"]
        if s.epoch_gen_state is not None:
            s.data_gen.set_state(s.epoch_gen_state)
        log.info("resumed from %s at step %d (%d images used)", path, s.step,
                 self.oracle.images_used)

    # ----------------------------------------------------------------- the loop
    def _evaluate(self, loss: float | None) -> dict[str, Any]:
        s = self.state
        with self._phase("validation"):
            acc = self.model.accuracy(self.val.images, self.val.labels, self.oracle)
        if acc > s.best_val:
            s.best_val, s.best_step, s.best_tensors = acc, s.step, _snapshot(self.model)
        s.last_eval_step = s.step
        row = {"step": s.step, "epoch": s.epoch, "queries": self.oracle.images_used,
               "requests": self.oracle.requests_used, "loss": loss, "val_accuracy": acc}
        s.history.append(row)
        return row

    def _start_epoch(self) -> torch.Tensor:
        s = self.state
        s.epoch_gen_state = s.data_gen.get_state()
        perm = torch.randperm(len(self.train), generator=s.data_gen)
        lm = self.model.labelmap
        if s.batch_idx == 0 and lm.needs_fit and (s.epoch == 0 or lm.refit_every_epoch):
            with self._phase("labelmap_fit"):
                self.model.fit_labelmap(self.train.images, self.train.labels, self.oracle,
                                        score=self.cfg.labelmap_score)
        return perm

    def run(self, callback: Callback | None = None) -> str:
        cfg, s = self.cfg, self.state
        per_epoch = self.steps_per_epoch
        reserve = len(self.val)
        if s.last_eval_step < 0:
            self._evaluate(None)
        perm = None
        while True:
            if cfg.epochs is not None and s.epoch >= cfg.epochs:
                return "epochs"
            if s.step >= self.total_steps and cfg.budget is not None and cfg.epochs is None:
                return "budget"
            if perm is None:
                if s.epoch_gen_state is not None and s.batch_idx > 0:
                    s.data_gen.set_state(s.epoch_gen_state)
                perm = self._start_epoch()
            idx = perm[s.batch_idx * cfg.batch_size : (s.batch_idx + 1) * cfg.batch_size]
            cost = self.queries_per_step * len(idx)
            if not self.oracle.can_afford(cost + reserve):
                return "budget"
            with self._phase("estimator"), self.model.program.fitting():
                x, y = self.x_train[idx], self.y_train[idx]
                if self.surrogate is not None and isinstance(self.estimator, PRGFEstimator):
                    self.estimator.prior = self.surrogate.gradient(
                        self.model, x, y, cfg.loss, self.model.program.theta)
                noise = vote_noise(cfg.label_votes, cfg.vote_noise, self.oracle.info.input_size,
                                   seed=cfg.seed, step=s.step)
                objective = self.model.objective(x, y, self.oracle, loss=cfg.loss, noise=noise)
                loss, grad = self.estimator.value_and_grad(objective,
                                                           self.model.program.theta)
            with self._phase("optimizer"):
                self.optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                self.model.program.theta.grad = grad
                self.optimizer.step()
                self.scheduler.step()
            s.step += 1
            s.batch_idx += 1
            row: dict[str, Any] = {"step": s.step, "loss": loss.item(),
                                   "queries": self.oracle.images_used}
            if s.step % self.eval_every == 0:
                row = self._evaluate(loss.item())
            if s.batch_idx >= per_epoch:
                s.epoch += 1
                s.batch_idx = 0
                s.epoch_gen_state = s.data_gen.get_state()
                perm = None
            if cfg.checkpoint and s.step % cfg.checkpoint_every == 0:
                _save_checkpoint(Path(cfg.checkpoint), self.checkpoint_payload())
            if callback is not None:
                callback({**row, "best_val_accuracy": s.best_val,
                          "total_steps": self.total_steps, "budget": self.oracle.budget})


def fit(
    cfg: FitConfig,
    oracle: Oracle,
    data: TargetDataset,
    *,
    resume: bool = False,
    callback: Callback | None = None,
    source_fingerprint: dict[str, Any] | None = None,
    evaluate_test: bool = True,
) -> FitResult:
    """Learn a program and label map for ``data`` on ``oracle`` (see the module docstring);
    ``evaluate_test=False`` leaves the test split untouched (a trial of a search)."""
    t0 = time.perf_counter()
    surrogate = Surrogate(cfg.surrogate, oracle) if cfg.surrogate is not None else None
    init = None
    resuming = resume and bool(cfg.checkpoint) and Path(str(cfg.checkpoint)).is_file()
    if surrogate is not None and cfg.warm_start_epochs and not resuming:
        init = warm_start(cfg, surrogate, data)
    fitter = Fitter(cfg, oracle, data, surrogate=surrogate, init=init)
    if resume:
        if not cfg.checkpoint:
            raise ConfigError("expected a checkpoint path to resume from, got none")
        if Path(cfg.checkpoint).is_file():
            fitter.restore(Path(cfg.checkpoint))
        else:
            log.warning("no checkpoint at %s; starting a new fit", cfg.checkpoint)
    try:
        reason = fitter.run(callback)
    except BudgetExhausted as exc:
        log.info("stopped: %s", exc)
        reason = "budget"
    s = fitter.state
    if s.last_eval_step != s.step and oracle.can_afford(len(fitter.val)):
        try:
            fitter._evaluate(None)
        except BudgetExhausted as exc:  # the request cap can end what the image budget allows
            log.info("no final validation: %s", exc)
    if cfg.checkpoint:
        _save_checkpoint(Path(cfg.checkpoint), fitter.checkpoint_payload())
    model = fitter.model
    if s.best_tensors:
        model.load_state_dict(s.best_tensors)
    train_queries = oracle.images_used
    budget, oracle.budget = oracle.budget, None  # the test split is counted apart
    max_requests, oracle.max_requests = oracle.max_requests, None
    try:
        with fitter._phase("test"):
            test_acc = model.accuracy(fitter.test.images, fitter.test.labels, oracle) if len(
                fitter.test) and evaluate_test else None
    finally:
        oracle.budget, oracle.max_requests = budget, max_requests
    queries = {"images": train_queries, "requests": oracle.requests_used,
               "test_images": oracle.images_used - train_queries}
    if surrogate is not None:  # free: a local model, counted apart
        queries["surrogate_images"] = surrogate.images_used
    info = oracle.info
    prompt = Prompt.from_reprogrammer(
        model, target_classes=data.class_names,
        source=source_fingerprint or {**info.fingerprint, "name": info.name},
        wire_dtype=info.wire_dtype, output_kind=info.output_kind, config=cfg.to_dict(),
        seed=cfg.seed, queries=queries,
        metrics={"val_accuracy": s.best_val, "test_accuracy": test_acc,
                 "best_step": s.best_step, "steps": s.step, "dataset": data.name,
                 "splits": {"train": len(fitter.train), "val": len(fitter.val),
                            "test": len(fitter.test)}},
    )
    return FitResult(model=model, prompt=prompt, history=s.history, best_val_accuracy=s.best_val,
                     best_step=s.best_step, test_accuracy=test_acc, steps=s.step,
                     queries=queries, stop_reason=reason, seconds=time.perf_counter() - t0,
                     timings=dict(fitter.timings))
