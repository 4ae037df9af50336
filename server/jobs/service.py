"""Tuning jobs as the routes see them: submit (with every check), view, cancel.

A job's config is a JSON object of :class:`~reprogram.config.FitConfig` fields; the fields it
leaves out take the defaults of ``reprogram fit --model`` (the recommended values of its
estimator, autograd unless it names one, and the token defaults for ``vpt-*`` programs), so
``reprogram fit --on-server`` and a local ``reprogram fit`` with the same options fit the same
config. ``checkpoint`` is the server's; ``surrogate`` and ``coordinator_encoder`` may only
name the zoo's models (never a path on the server).

Before anything is unpacked: the key's unfinished jobs (429 over ``--fit-max-jobs``) and its
fit quota (403 when the job's budget would pass ``--fit-quota``; a job then needs a budget).
"""

from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from reprogram.config import FitConfig, recommended_config
from reprogram.context import CONTEXT_KINDS
from reprogram.defaults import CONTEXT_PROGRAM, TOKEN_PROGRAM
from reprogram.errors import ConfigError
from reprogram.program_spec import TOKEN_KINDS
from reprogram.zoo.registry import ZOO
from server.inference import HTTPStatusError
from server.jobs.archive import BadDataset, DataLimits, extract_archive, tensor_dataset
from server.jobs.runner import JobRunner
from server.jobs.store import DATA_DIR, DATA_TENSORS, Job, JobStore
from server.quota import QuotaExhausted
from server.settings import FitJobs

MODEL_FIELDS = ("surrogate", "coordinator_encoder")  # zoo names only, never paths
_FIELDS = frozenset(f.name for f in fields(FitConfig))


class JobsOff(HTTPStatusError):
    """The server runs no tuning jobs (403)."""

    status_code = 403


class TooManyJobs(HTTPStatusError):
    """The key has ``--fit-max-jobs`` unfinished jobs (429)."""

    status_code = 429
    headers: ClassVar[dict[str, str]] = {"Retry-After": "30"}


class BadConfig(HTTPStatusError):
    """A fit config that cannot run (422)."""

    status_code = 422


def job_config(raw: object) -> FitConfig:
    """The :class:`FitConfig` of a submitted config object (422 with the reason)."""
    if not isinstance(raw, dict):
        raise BadConfig(f"expected 'config' to be a JSON object of fit settings, got"
                        f" {type(raw).__name__}")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise BadConfig(f"unknown fit setting(s) {unknown}; expected FitConfig fields")
    for name in MODEL_FIELDS:
        value = raw.get(name)
        if value is not None and value not in ZOO:
            raise BadConfig(f"expected {name!r} to name one of the zoo's models {sorted(ZOO)},"
                            f" got {value!r}: a tuning job reads no other file on the server")
    options = {k: v for k, v in raw.items() if k != "checkpoint"}
    estimator = options.pop("estimator", None) or "autograd"
    if options.get("program") in TOKEN_KINDS:
        options.update({k: v for k, v in TOKEN_PROGRAM.items() if options.get(k) is None})
    if options.get("program") in CONTEXT_KINDS:
        options.update({k: v for k, v in CONTEXT_PROGRAM.items() if options.get(k) is None})
    try:
        cfg = recommended_config(str(estimator), **options)
    except (ConfigError, TypeError, ValueError) as exc:
        raise BadConfig(f"invalid fit config{_culprit(str(estimator), options)}: {exc}"
                        ) from None
    if cfg.budget is None and cfg.epochs is None:
        raise BadConfig("expected 'budget' (image evaluations) or 'epochs' in the fit config")
    return cfg


def _culprit(estimator: str, options: dict[str, Any]) -> str:
    """`` (field 'lr')``: the first setting that fails on its own, to name it."""
    for name, value in options.items():
        try:
            recommended_config(estimator, **{name: value})
        except (ConfigError, TypeError, ValueError):
            return f" (setting {name!r} = {value!r})"
    return ""


class FitService:
    """Submission, views and cancellation over one :class:`JobStore` and its runner."""

    def __init__(self, spec: FitJobs, store: JobStore, runner: JobRunner,
                 is_vit: Any = None) -> None:
        self.spec = spec
        self.store = store
        self.runner = runner
        self.limits = DataLimits(max_files=spec.max_files, max_bytes=spec.max_bytes,
                                 max_pixels=spec.max_pixels)
        self._is_vit = is_vit  # () -> bool | None (unknown while loading)

    def admit(self, owner: str | None, cfg: FitConfig) -> None:
        """Refuse a job over the key's caps, before its data set is read."""
        mine = [j for j in self.store.all() if j.owner == owner]
        unfinished = [j for j in mine if not j.final]
        if len(unfinished) >= self.spec.max_jobs:
            raise TooManyJobs(f"expected at most {self.spec.max_jobs} unfinished tuning jobs per"
                              f" key (--fit-max-jobs), got {len(unfinished)} already; wait for"
                              " one to end or cancel one")
        if self.spec.quota is not None:
            if cfg.budget is None:
                raise BadConfig("expected a 'budget' in the fit config: this server meters"
                                " tuning jobs (--fit-quota)")
            used = sum(j.charge for j in mine)
            if used + cfg.budget > self.spec.quota:
                raise QuotaExhausted(
                    f"expected a budget of at most {max(0, self.spec.quota - used)} image"
                    f" evaluations under the key's fit quota of {self.spec.quota}, got"
                    f" {cfg.budget}; lower the budget or ask the operator")
        if cfg.program in TOKEN_KINDS and self._is_vit is not None and self._is_vit() is False:
            raise BadConfig(f"expected a ViT for a {cfg.program} program, but the served model"
                            " is not one; use a pixel program (e.g. 'full')")

    def submit_archive(self, owner: str | None, cfg: FitConfig, data: bytes) -> Job:
        """Unpack an ImageFolder archive and queue its job (blocking: run in a thread)."""
        staged = self.store.staging()
        try:
            counts = extract_archive(data, staged / DATA_DIR, self.limits)
            dataset = {"format": "archive", "classes": sorted(counts),
                       "images": sum(counts.values()), "per_class": counts}
            return self._create(staged, owner, cfg, dataset)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def submit_tensors(self, owner: str | None, cfg: FitConfig, body: dict[str, Any]) -> Job:
        """Queue a job on a data set sent as tensors (blocking: run in a thread)."""
        data = tensor_dataset(body, self.limits)
        staged = self.store.staging()
        try:
            torch.save({"images": data.images, "labels": data.labels,
                        "class_names": list(data.class_names)}, str(staged / DATA_TENSORS))
            per_class = {name: int((data.labels == i).sum())
                         for i, name in enumerate(data.class_names)}
            dataset = {"format": "tensors", "classes": list(data.class_names),
                       "images": len(data), "per_class": per_class}
            return self._create(staged, owner, cfg, dataset)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def _create(self, staged: Path, owner: str | None, cfg: FitConfig,
                dataset: dict[str, Any]) -> Job:
        empty = [c for c, n in dataset["per_class"].items() if n == 0]
        if empty:
            raise BadDataset(f"expected images in every class, got none for {empty}")
        config = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint"}
        job = self.store.create(staged, owner=owner, config=config, dataset=dataset)
        self.runner.wake()
        return job

    def view(self, job: Job) -> dict[str, Any]:
        """A job as the API shows it (``GET /v1/fits/{id}``)."""
        progress = self.store.progress(job.id)
        budget = job.config.get("budget")
        out: dict[str, Any] = {
            "id": job.id, "state": job.state, "created": job.created, "started": job.started,
            "finished": job.finished, "config": job.config, "dataset": job.dataset,
            "progress": {"step": progress.get("step", 0), "steps": progress.get("steps"),
                         "images": progress.get("images", 0), "budget": budget,
                         "fraction": _fraction(progress, budget)},
            "val_accuracy": progress.get("best_val_accuracy"),
            "curve": progress.get("curve", []), "error": job.error, "prompt": job.prompt_id,
            "attempts": job.attempts,
        }
        if job.state == "succeeded":
            out["progress"]["fraction"] = 1.0
            out["result"] = self._result(job)
        return out

    def _result(self, job: Job) -> dict[str, Any]:
        summary = self.store.result(job.id)
        return {k: summary.get(k) for k in ("val_accuracy", "test_accuracy", "images", "steps",
                                             "stopped", "seconds")}


def _fraction(progress: dict[str, Any], budget: int | None) -> float | None:
    if budget:
        return min(1.0, float(progress.get("images", 0)) / budget)
    steps = progress.get("steps")
    return min(1.0, float(progress.get("step", 0)) / steps) if steps else None
