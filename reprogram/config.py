"""The frozen fit configuration and the factories that turn it into pipeline pieces."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

import torch

from reprogram.errors import ConfigError
from reprogram.estimators import (
    EstimatorKind,
    GradientEstimator,
    build_estimator,
    spsa_gc_optimizer,
)
from reprogram.labelmaps import LabelMapKind, LabelMapSpec
from reprogram.program_spec import ProgramKind, ProgramSpec, canonical_kind

OptimizerKind = Literal["adam", "sgd", "spsa-gc"]
ScheduleKind = Literal["constant", "cosine"]


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """Everything that defines a fit; validated once at construction.

    The fit stops at ``epochs`` or when the image ``budget`` (training, label-map fitting and
    validation queries together) cannot pay for another step, whichever comes first.
    """

    program: ProgramKind = "expand"
    inner_size: int | None = None
    resolution: int | None = None
    mask: Literal["none", "border"] = "none"
    labelmap: LabelMapKind = "frequency"
    sources_per_target: int = 1
    estimator: EstimatorKind = "autograd"
    q: int = 10
    mu: float = 0.5
    antithetic: bool = False
    spsa_c: float = 0.01
    spsa_gamma: float = 0.1
    spsa_draws: int = 1
    optimizer: OptimizerKind = "adam"
    lr: float = 0.05
    labelmap_lr: float | None = None
    schedule: ScheduleKind = "cosine"
    batch_size: int = 32
    epochs: int | None = None
    budget: int | None = None
    eval_every: int | None = None
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    checkpoint: str | None = None
    checkpoint_every: int = 100
    floor: float = 1e-6
    weight_penalty: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "program", canonical_kind(self.program))  # "pad" -> "expand"
        if not 0 <= float(self.weight_penalty) < math.inf:
            raise ConfigError(f"expected a finite weight_penalty >= 0, got {self.weight_penalty}")
        for name, allowed in (("program", ProgramKind), ("labelmap", LabelMapKind),
                              ("estimator", EstimatorKind), ("optimizer", OptimizerKind),
                              ("schedule", ScheduleKind)):
            if getattr(self, name) not in get_args(allowed):
                raise ConfigError(f"expected {name} in {get_args(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        for name in ("batch_size", "eval_every", "checkpoint_every", "q", "spsa_draws",
                     "inner_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"expected {name} >= 1, got {getattr(self, name)}")
        for name in ("lr", "mu", "spsa_c"):
            if not 0 < float(getattr(self, name)) < math.inf:
                raise ConfigError(f"expected a finite {name} > 0, got {getattr(self, name)}")
        if self.epochs is None and self.budget is None:
            raise ConfigError("expected epochs or budget (or both), got neither")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"expected epochs >= 1, got {self.epochs}")
        if self.budget is not None and self.budget < 1:
            raise ConfigError(f"expected a positive budget, got {self.budget}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def program_spec(self, frame_size: tuple[int, int]) -> ProgramSpec:
        # default: the target image fills the frame, or half of it inside a border
        bordered = self.program in ("expand", "mask")
        inner = self.inner_size or (max(1, min(frame_size) // 2) if bordered
                                    else min(frame_size))
        # a patch is a quarter of the frame's shorter side (8 px at 32, 56 px at 224); Bahng's
        # border is 30 px at 224 (hjbahng/visual_prompting main_clip.py, --prompt_size 30)
        patch = {}
        if self.program in ("patch", "add-patch"):
            patch = {"patch_size": max(1, min(frame_size) // 4)}
        elif self.program == "add-pad":
            patch = {"patch_size": max(1, round(min(frame_size) * 30 / 224))}
        return ProgramSpec(kind=self.program, frame_size=frame_size, inner_size=inner,
                           resolution=self.resolution, mask=self.mask, **patch)

    def labelmap_spec(self, num_source: int, num_target: int) -> LabelMapSpec:
        return LabelMapSpec(kind=self.labelmap, num_source=num_source, num_target=num_target,
                            sources_per_target=self.sources_per_target, seed=self.seed)

    def build_estimator(self) -> GradientEstimator:
        options: dict[str, Any] = {}
        if self.estimator == "rgf":
            options = {"q": self.q, "mu": self.mu, "antithetic": self.antithetic}
        elif self.estimator == "spsa":
            options = {"c": self.spsa_c, "gamma": self.spsa_gamma, "n_draws": self.spsa_draws}
        return build_estimator(self.estimator, seed=self.seed, **options)

    def build_optimizer(
        self, theta: torch.Tensor, head: list[torch.nn.Parameter], total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        groups: list[dict[str, Any]] = [{"params": [theta], "lr": self.lr}]
        if head:
            groups.append({"params": head, "lr": self.labelmap_lr or self.lr})
        if self.optimizer == "spsa-gc":
            return spsa_gc_optimizer(groups, a=self.lr)
        opt: torch.optim.Optimizer
        if self.optimizer == "adam":
            opt = torch.optim.Adam(groups)
        else:
            opt = torch.optim.SGD(groups, momentum=0.9)
        if self.schedule == "cosine":
            sched: torch.optim.lr_scheduler.LRScheduler = (
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1)))
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return opt, sched


# The defaults that learned fastest per query on the default model and digits (see the README's
# results section for the measurements behind them).
RECOMMENDED: dict[str, dict[str, Any]] = {
    "autograd": {"program": "expand", "labelmap": "linear", "optimizer": "adam", "lr": 0.05,
                 "batch_size": 32},
    # black-box: a full-frame overlay on an 8x8 grid (d = 192), the target image filling the
    # frame, a learned linear label map (exact gradient), RGF with a radius that survives the
    # 8-bit wire, and Adam
    "rgf": {"program": "full", "resolution": 8, "labelmap": "linear",
            "optimizer": "adam", "lr": 0.05, "batch_size": 32, "q": 10, "mu": 1.0,
            "antithetic": False},
    "spsa": {"program": "full", "resolution": 8, "labelmap": "linear",
             "optimizer": "adam", "lr": 0.05, "batch_size": 32, "spsa_c": 0.05},
}


def recommended_config(estimator: str, **overrides: Any) -> FitConfig:
    """A :class:`FitConfig` with the recommended defaults for ``estimator``; ``None``-valued
    overrides are ignored, so CLI options that were not given keep the defaults."""
    if estimator not in RECOMMENDED:
        raise ConfigError(f"expected estimator in {sorted(RECOMMENDED)}, got {estimator!r}")
    values: dict[str, Any] = {"estimator": estimator, **RECOMMENDED[estimator]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return FitConfig(**values)
