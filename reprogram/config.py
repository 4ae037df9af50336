"""The frozen fit configuration and the factories that turn it into pipeline pieces."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from reprogram.cma import CMAStep, check_pairing
from reprogram.context import CONTEXT_KINDS, context_spec
from reprogram.defaults import ESTIMATOR, RECOMMENDED, TOKEN_PROGRAM
from reprogram.errors import ConfigError
from reprogram.estimators import (
    EstimatorKind,
    GradientEstimator,
    build_estimator,
    spsa_gc_optimizer,
)
from reprogram.labelmaps import LabelMapKind, LabelMapScore, LabelMapSpec, Remainder
from reprogram.losses import LossSpec
from reprogram.program_spec import TOKEN_KINDS, ProgramKind, ProgramSpec, canonical_kind
from reprogram.schedules import ScheduleSpec
from reprogram.tokens import TokenDepth, TokenSpec, ViTAdapter

__all__ = ["LEGACY", "RECOMMENDED", "FitConfig", "OptimizerKind", "recommended_config"]

OptimizerKind = Literal["adam", "sgd", "spsa-gc", "cma"]
_RGF, _SPSA, _CMA = ESTIMATOR["rgf"], ESTIMATOR["spsa"], ESTIMATOR["cma"]
# what a field added later meant for a config saved before it existed
LEGACY: dict[str, Any] = {"remainder": "floor"}


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """Everything that defines a fit; validated once at construction.

    The fit stops at ``epochs`` or when the image ``budget`` (training, label-map fitting and
    validation queries together) cannot pay for another step, whichever comes first.
    ``loss`` and ``schedule`` are nested specs (:class:`~reprogram.losses.LossSpec`,
    :class:`~reprogram.schedules.ScheduleSpec`); a bare kind name or a dict is accepted and
    turned into one. The estimator fields default to :data:`reprogram.defaults.ESTIMATOR`.
    ``optimizer="spsa-gc"`` has its own step-size decay ``lr / (k + spsa_o)^spsa_alpha`` and
    uses ``momentum`` as its gradient-correction ``beta``; ``schedule`` is then not used.
    ``surrogate`` names a local model for the transfer prior of ``estimator="prgf"`` and for a
    white-box warm start of ``warm_start_epochs`` epochs (:mod:`reprogram.surrogate`).
    ``program="vpt-shallow"`` or ``"vpt-deep"`` (VPT, :mod:`reprogram.tokens`) learns
    ``tokens`` prompt tokens of a local ViT, with ``labelmap="head"`` for VPT's linear head.
    ``program="coordinator"`` (BlackVIP) takes its frozen encoder from the model named by
    ``coordinator_encoder`` and scales its prompt by ``coordinator_eps`` (pixels).
    ``estimator="cma"`` (CMA-ES, :mod:`reprogram.cma`) draws ``cma_popsize`` candidates at
    spread ``cma_sigma`` per step and needs ``optimizer="cma"``, which sets theta to its mean
    and trains the label map with Adam at ``lr``.
    ``remainder`` is what a top-k answer's missing classes score: an equal share of the mass
    the answer leaves (``share``) or the flat ``floor``
    (:func:`reprogram.labelmaps.to_log_scores`). ``label_votes > 1`` (a label-only API)
    sends every training frame that many times with Gaussian noise of std ``vote_noise``
    added and learns from the answers' fractions (:mod:`reprogram.votes`).
    """

    program: ProgramKind = "expand"
    inner_size: int | Literal["native"] | None = None
    inner_ratio: float | None = None
    patch_ratio: float | None = None
    resolution: int | None = None
    mask: Literal["none", "border"] = "none"
    labelmap: LabelMapKind = "frequency"
    sources_per_target: int = 1
    labelmap_score: LabelMapScore = "top1"
    estimator: EstimatorKind = "autograd"
    q: int = _RGF["q"]
    mu: float = _RGF["mu"]
    antithetic: bool = _RGF["antithetic"]
    spsa_c: float = _SPSA["c"]
    spsa_gamma: float = _SPSA["gamma"]
    spsa_draws: int = _SPSA["n_draws"]
    spsa_query_theta: bool = _SPSA["query_theta"]
    spsa_alpha: float = 0.4
    spsa_o: float = 1.0
    cma_sigma: float = _CMA["sigma"]
    cma_popsize: int = _CMA["popsize"]
    optimizer: OptimizerKind = "adam"
    lr: float = 0.05
    momentum: float = 0.9
    labelmap_lr: float | None = None
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    init_std: float = 0.0
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
    remainder: Remainder = "share"
    label_votes: int = 1
    vote_noise: float = 0.1
    weight_penalty: float = 0.0
    coordinator_encoder: str = "default"
    coordinator_eps: float = 1.0
    surrogate: str | None = None
    warm_start_epochs: int = 0
    tokens: int = TOKEN_PROGRAM["tokens"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "program", canonical_kind(self.program))  # "pad" -> "expand"
        object.__setattr__(self, "schedule", ScheduleSpec.coerce(self.schedule))
        object.__setattr__(self, "loss", LossSpec.coerce(self.loss))
        for name in ("weight_penalty", "momentum", "init_std", "spsa_alpha", "spsa_o",
                     "vote_noise"):
            if not 0 <= float(getattr(self, name)) < math.inf:
                raise ConfigError(f"expected a finite {name} >= 0, got {getattr(self, name)}")
        for name, allowed in (("program", ProgramKind), ("labelmap", LabelMapKind),
                              ("estimator", EstimatorKind), ("optimizer", OptimizerKind),
                              ("labelmap_score", LabelMapScore), ("remainder", Remainder)):
            if getattr(self, name) not in get_args(allowed):
                raise ConfigError(f"expected {name} in {get_args(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if self.inner_size != "native":
            self._check_at_least_one("inner_size")
        for name in ("inner_ratio", "patch_ratio"):
            if getattr(self, name) is not None and not 0 < float(getattr(self, name)) <= 1:
                raise ConfigError(f"expected {name} in (0, 1], got {getattr(self, name)}")
        for name in ("batch_size", "eval_every", "checkpoint_every", "q", "spsa_draws",
                     "cma_popsize", "label_votes"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"expected {name} >= 1, got {getattr(self, name)}")
        for name in ("lr", "mu", "spsa_c", "coordinator_eps", "cma_sigma"):
            if not 0 < float(getattr(self, name)) < math.inf:
                raise ConfigError(f"expected a finite {name} > 0, got {getattr(self, name)}")
        self._check_surrogate()
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 0:
            raise ConfigError(f"expected tokens an int >= 0, got {self.tokens!r}")
        if self.labelmap == "head" and self.program not in TOKEN_KINDS:
            raise ConfigError(f"expected a token program (vpt-shallow, vpt-deep) for the head "
                              f"label map, got {self.program!r}; pixel programs map the source "
                              f"scores (--labelmap linear)")
        check_pairing(self.estimator, self.optimizer)
        if not isinstance(self.coordinator_encoder, str) or not self.coordinator_encoder:
            raise ConfigError(f"expected coordinator_encoder a model name, got "
                              f"{self.coordinator_encoder!r}")
        if self.epochs is None and self.budget is None:
            raise ConfigError("expected epochs or budget (or both), got neither")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"expected epochs >= 1, got {self.epochs}")
        if self.budget is not None and self.budget < 1:
            raise ConfigError(f"expected a positive budget, got {self.budget}")

    def _check_surrogate(self) -> None:
        w = self.warm_start_epochs
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"expected warm_start_epochs an int >= 0, got {w!r}")
        if self.surrogate is None and (self.estimator == "prgf" or w > 0):
            raise ConfigError("expected a surrogate model for estimator 'prgf' or a warm "
                              "start (--surrogate MODEL), got none")
        if self.surrogate is not None and (not isinstance(self.surrogate, str)
                                           or not self.surrogate):
            raise ConfigError(f"expected surrogate a model name, got {self.surrogate!r}")

    def _check_at_least_one(self, name: str) -> None:
        value = getattr(self, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigError(f"expected {name} >= 1 (an int, or 'native'), got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        """Inverse of :meth:`to_dict`; a config saved before the loss and schedule were nested
        (``"schedule": "cosine"``, no ``loss``) loads too, and one saved before ``remainder``
        existed keeps the floor it ran with."""
        known = {f.name for f in fields(cls)}
        return cls(**{**LEGACY, **{k: v for k, v in d.items() if k in known}})

    def program_spec(self, frame_size: tuple[int, int], native_size: int | None = None,
                     vit: ViTAdapter | None = None,
                     text: tuple[int, int] | None = None) -> ProgramSpec:
        """The program's geometry on a ``frame_size`` input; ``native_size`` (the target
        images' shorter side) is what ``inner_size="native"`` embeds them at; ``vit`` is the
        model's ViT geometry, which token programs need; ``text`` (token width, classes) a
        zero-shot model's, which context vectors (``coop``) need."""
        side = min(frame_size)
        if self.program in CONTEXT_KINDS:
            if text is None:
                raise ConfigError(f"expected a vision-language model for a {self.program}"
                                  " program, got none")
            return ProgramSpec(kind=self.program, frame_size=frame_size, inner_size=side,
                               context=context_spec(self.program, self.tokens, *text))
        if self.program in TOKEN_KINDS:
            if vit is None:
                raise ConfigError(f"expected a ViT's geometry for a {self.program} program, "
                                  f"got none")
            depth: TokenDepth = "shallow" if self.program == "vpt-shallow" else "deep"
            tokens = TokenSpec(depth=depth, tokens=self.tokens, layers=vit.layers,
                               width=vit.width, patch=vit.patch)
            return ProgramSpec(kind=self.program, frame_size=frame_size, inner_size=side,
                               tokens=tokens)
        if self.inner_size == "native":
            if native_size is None:
                raise ConfigError("expected the target images' size for inner_size 'native', "
                                  "got none")
            inner = max(1, min(int(native_size), side))
        elif self.inner_size is not None:
            inner = int(self.inner_size)
        elif self.inner_ratio is not None:
            inner = max(1, round(side * self.inner_ratio))
        else:  # the target image fills the frame, or half of it inside a border
            inner = max(1, side // 2) if self.program in ("expand", "mask") else side
        # a patch is a quarter of the frame's shorter side (8 px at 32, 56 px at 224); Bahng's
        # border is 30 px at 224 (hjbahng/visual_prompting main_clip.py, --prompt_size 30)
        patch: dict[str, Any] = {}
        if self.program in ("patch", "add-patch", "add-pad"):
            if self.patch_ratio is not None:
                size = round(side * self.patch_ratio)
            else:
                size = round(side * 30 / 224) if self.program == "add-pad" else side // 4
            patch = {"patch_size": max(1, size)}
        if self.program == "coordinator":  # the image fills the frame; the encoder is loaded
            from reprogram.coordinator import resolve

            return ProgramSpec(kind="coordinator", frame_size=frame_size, inner_size=side,
                               coordinator=resolve(self.coordinator_encoder, frame_size,
                                                   eps=self.coordinator_eps))
        return ProgramSpec(kind=self.program, frame_size=frame_size, inner_size=inner,
                           resolution=self.resolution, mask=self.mask,
                           init_std=float(self.init_std), **patch)

    def labelmap_spec(self, num_source: int, num_target: int) -> LabelMapSpec:
        return LabelMapSpec(kind=self.labelmap, num_source=num_source, num_target=num_target,
                            sources_per_target=self.sources_per_target, seed=self.seed)

    def build_estimator(self) -> GradientEstimator:
        options: dict[str, Any] = {}
        if self.estimator == "rgf":
            options = {"q": self.q, "mu": self.mu, "antithetic": self.antithetic}
        elif self.estimator == "prgf":
            options = {"q": self.q, "mu": self.mu}
        elif self.estimator == "cma":
            options = {"sigma": self.cma_sigma, "popsize": self.cma_popsize}
        elif self.estimator == "spsa":
            options = {"c": self.spsa_c, "gamma": self.spsa_gamma, "n_draws": self.spsa_draws,
                       "query_theta": self.spsa_query_theta}
        return build_estimator(self.estimator, seed=self.seed, **options)

    def build_optimizer(
        self, theta: torch.Tensor, head: list[torch.nn.Parameter], total_steps: int,
        steps_per_epoch: int = 1,
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        groups: list[dict[str, Any]] = [{"params": [theta], "lr": self.lr}]
        if head:
            groups.append({"params": head, "lr": self.labelmap_lr or self.lr})
        if self.optimizer == "spsa-gc":
            return spsa_gc_optimizer(groups, a=self.lr, alpha=self.spsa_alpha, o=self.spsa_o,
                                     beta=self.momentum)
        opt: torch.optim.Optimizer
        if self.optimizer == "cma":
            groups[0]["assign"] = True
            opt = CMAStep(groups)
        elif self.optimizer == "adam":
            opt = torch.optim.Adam(groups)
        else:
            opt = torch.optim.SGD(groups, momentum=self.momentum)
        factor = self.schedule.factor(total_steps, steps_per_epoch, self.lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def recommended_config(estimator: str, **overrides: Any) -> FitConfig:
    """A :class:`FitConfig` with the recommended defaults for ``estimator``; ``None``-valued
    overrides are ignored, so CLI options that were not given keep the defaults."""
    if estimator not in RECOMMENDED:
        raise ConfigError(f"expected estimator in {sorted(RECOMMENDED)}, got {estimator!r}")
    values: dict[str, Any] = {"estimator": estimator, **RECOMMENDED[estimator]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return FitConfig(**values)
