"""Gradient estimators: ``value_and_grad(objective, theta) -> (loss, grad)``.

An *objective* maps a batch of ``P`` candidate parameter tensors ``thetas [P, *theta_shape]``
to losses ``[P]`` with ONE batched oracle call. The loss at index 0 is the loss at ``theta``
itself (SPSA with ``query_theta=False`` never evaluates ``theta`` and reports the mean of a
perturbed pair instead); losses may carry an autograd graph to label-map parameters (the
``linear`` map): estimators return the reported loss attached, so the fit loop can
``loss.backward()`` for the label map, then write ``grad`` into ``theta.grad`` and step one
torch optimizer (DESIGN.md section 8.2).

Kinds:

- ``autograd``: exact gradient through a differentiable (local) oracle.
- ``rgf``: random gradient-free estimate (BAR, Tsai et al. 2020, "Transfer Learning without
  Knowing: Reprogramming Black-box Machine Learning Models with Scarce Data and Limited
  Resources").
- ``prgf``: RGF guided by a transfer prior, a surrogate model's gradient (Cheng et al. 2019;
  :mod:`reprogram.prgf`).
- ``spsa``: simultaneous perturbation (BlackVIP, Oh et al. 2023, "BlackVIP: Black-Box Visual
  Prompting for Robust Transfer Learning"); pair it with :func:`spsa_gc_optimizer` for the
  gradient correction (SPSA-GC).
- ``cma``: CMA-ES (Black-Box Tuning, Sun et al. 2022; :mod:`reprogram.cma`): one generation per
  step, its "gradient" the move of the search mean, applied exactly by the ``cma`` optimizer.

Every random draw comes from the estimator's own ``torch.Generator`` (CPU), whose state is part
of :meth:`GradientEstimator.state_dict`, so a resumed fit is bit-identical.
"""

from __future__ import annotations

import inspect
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor

from reprogram.defaults import ESTIMATOR, SPSA_GC
from reprogram.errors import ConfigError, EstimatorError

__all__ = [
    "AutogradEstimator",
    "EstimatorKind",
    "GradientEstimator",
    "Objective",
    "RGFEstimator",
    "SPSAEstimator",
    "build_estimator",
    "spsa_gc_optimizer",
]

logger = logging.getLogger(__name__)

Objective = Callable[[Tensor], Tensor]
EstimatorKind = Literal["autograd", "rgf", "spsa", "prgf", "cma"]
PerturbationKind = Literal["rademacher", "segmented"]


def _positive(name: str, value: object, *, integer: bool = False) -> None:
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        kind = "an int" if integer else "a number"
        raise ConfigError(f"expected {name} to be {kind}, got {type(value).__name__} {value!r}")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"expected {name} > 0, got {value!r}")


class GradientEstimator(ABC):
    """Base class: owns validation, the step counter and the seeded generator.

    Subclasses set :attr:`kind`, :attr:`requires_differentiable`, implement
    :attr:`queries_per_step` (candidates ``P`` per step; a step costs ``P * N`` oracle images
    for a batch of ``N``) and the hook :meth:`_estimate`.
    """

    kind: ClassVar[str]
    requires_differentiable: ClassVar[bool] = False

    def __init__(self, *, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"expected seed an int >= 0, got {seed!r}")
        self.seed = seed
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)

    @property
    @abstractmethod
    def queries_per_step(self) -> int:
        """Number of candidate parameter tensors ``P`` evaluated per call."""

    @abstractmethod
    def _estimate(self, objective: Objective, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(loss at theta, grad)``; ``self.step`` is already incremented."""

    def check(self, oracle_differentiable: bool) -> None:
        """Raise :class:`EstimatorError` if this estimator cannot use the oracle."""
        if self.requires_differentiable and not oracle_differentiable:
            raise EstimatorError(
                f"expected a differentiable oracle (a local model) for estimator "
                f"{self.kind!r}, got a non-differentiable one (an HTTP endpoint, an ONNX "
                f"model or an output kind without scores); "
                "use estimator 'rgf' or 'spsa'"
            )

    def value_and_grad(self, objective: Objective, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Loss at ``theta`` (0-dim, possibly with a graph) and a detached gradient estimate."""
        if not isinstance(theta, Tensor) or not theta.is_floating_point():
            raise EstimatorError(f"expected a floating-point theta tensor, got {theta!r:.80}")
        self.step += 1
        loss, grad = self._estimate(objective, theta.detach())
        return loss, grad.detach().to(theta.dtype).reshape(theta.shape)

    def _evaluate(self, objective: Objective, thetas: Tensor) -> Tensor:
        losses = objective(thetas)
        if not isinstance(losses, Tensor) or tuple(losses.shape) != (thetas.shape[0],):
            got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise EstimatorError(
                f"expected objective losses of shape ({thetas.shape[0]},), got {got}"
            )
        if not bool(torch.isfinite(losses.detach()).all()):
            logger.warning("%s: non-finite loss among %d candidates", self.kind, losses.numel())
        return losses

    def state_dict(self) -> dict[str, Any]:
        """Step counter and generator state (a uint8 tensor), for bit-identical resume."""
        return {"kind": self.kind, "step": self.step, "rng_state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; :class:`ConfigError` if it belongs elsewhere."""
        if state.get("kind") != self.kind:
            raise ConfigError(
                f"expected estimator state of kind {self.kind!r}, got {state.get('kind')!r}"
            )
        step, rng = state.get("step"), state.get("rng_state")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"expected step an int >= 0, got {step!r}")
        if not isinstance(rng, Tensor) or rng.dtype != torch.uint8:
            raise ConfigError(f"expected rng_state a uint8 tensor, got {type(rng).__name__}")
        self.step = step
        self.generator.set_state(rng.clone())

    def _randn(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        out = torch.randn(shape, generator=self.generator, dtype=torch.float64)
        return out.to(device=like.device, dtype=like.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, step={self.step})"


class AutogradEstimator(GradientEstimator):
    """Exact gradient by backpropagation through a differentiable oracle (white-box)."""

    kind = "autograd"
    requires_differentiable = True

    @property
    def queries_per_step(self) -> int:
        return 1

    def _estimate(self, objective: Objective, theta: Tensor) -> tuple[Tensor, Tensor]:
        thetas = theta.clone()[None].requires_grad_(True)
        loss = self._evaluate(objective, thetas)[0]
        if not loss.requires_grad:
            raise EstimatorError(
                "expected a loss differentiable in theta for estimator 'autograd', got a loss "
                "without a graph (is the oracle differentiable?); use 'rgf' or 'spsa'"
            )
        (grad,) = torch.autograd.grad(loss, thetas, retain_graph=True, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(thetas)
        return loss, grad[0]


class RGFEstimator(GradientEstimator):
    """Random gradient-free estimator of BAR (Tsai et al. 2020).

    ``g = (b/q) * sum_j [(L(theta + mu u_j) - L(theta)) / mu] u_j`` with ``u_j`` uniform on the
    unit sphere of ``R^d`` (a normalized standard Gaussian) and ``b = d``; ``q + 1`` candidates
    in one objective call, ``theta`` first. ``antithetic=True`` uses central differences
    ``(L(theta + mu u_j) - L(theta - mu u_j)) / (2 mu)`` (``2q + 1`` candidates: ``theta``,
    then the ``q`` plus, then the ``q`` minus points). ``E[g]`` is the gradient of the
    ``mu``-smoothed loss. The defaults are :data:`reprogram.defaults.ESTIMATOR` ``["rgf"]``;
    the anchors' values (BAR's code: ``q = 1``, ``mu = 0.1``) are in :mod:`reprogram.presets`.
    """

    kind = "rgf"

    def __init__(
        self,
        q: int = ESTIMATOR["rgf"]["q"],
        mu: float = ESTIMATOR["rgf"]["mu"],
        antithetic: bool = ESTIMATOR["rgf"]["antithetic"],
        *,
        seed: int,
    ) -> None:
        super().__init__(seed=seed)
        _positive("q", q, integer=True)
        _positive("mu", mu)
        if not isinstance(antithetic, bool):
            raise ConfigError(f"expected antithetic a bool, got {antithetic!r}")
        self.q, self.mu, self.antithetic = q, float(mu), antithetic

    @property
    def queries_per_step(self) -> int:
        return (2 if self.antithetic else 1) * self.q + 1

    def _estimate(self, objective: Objective, theta: Tensor) -> tuple[Tensor, Tensor]:
        d, q, mu = theta.numel(), self.q, self.mu
        u = self._randn((q, d), theta)
        u = u / u.norm(dim=1, keepdim=True)
        dirs = u.view(q, *theta.shape)
        parts = [theta[None], theta[None] + mu * dirs]
        if self.antithetic:
            parts.append(theta[None] - mu * dirs)
        losses = self._evaluate(objective, torch.cat(parts))
        flat = losses.detach().to(u.dtype)
        if self.antithetic:
            slopes = (flat[1 : q + 1] - flat[q + 1 :]) / (2 * mu)
        else:
            slopes = (flat[1:] - flat[0]) / mu
        grad = (d / q) * (slopes @ u)
        return losses[0], grad


class SPSAEstimator(GradientEstimator):
    """SPSA estimator of BlackVIP (Oh et al. 2023).

    At call ``k = 1, 2, ...``: ``c_k = c / k^gamma``; draw ``D`` from ``{-1, +1}^d``
    (``rademacher``) or BlackVIP's segmented uniform (magnitude ``U[0.5, 1]``, random sign);
    ``g = mean over draws of [L(theta + c_k D) - L(theta - c_k D)] / (2 c_k) * D^-1``.
    ``2 * n_draws + 1`` candidates in one call: ``theta``, the plus points, the minus points;
    with ``query_theta=False`` (BlackVIP, ``trainers/blackvip.py`` ``spsa_grad_estimate_bi``,
    which never evaluates ``theta`` itself) only the ``2 * n_draws`` perturbed points, and the
    loss reported is the mean of the last pair, ``(L(theta + c_k D) + L(theta - c_k D)) / 2``
    (with its graph, so a linear label map still learns from it).
    Both distributions give ``E[g] = grad + O(c_k^2)`` (the sign of ``D_j`` is independent of
    ``D_i``). For the gradient correction and the step schedule see :func:`spsa_gc_optimizer`.
    """

    kind = "spsa"

    def __init__(
        self,
        c: float = ESTIMATOR["spsa"]["c"],
        gamma: float = ESTIMATOR["spsa"]["gamma"],
        n_draws: int = ESTIMATOR["spsa"]["n_draws"],
        dist: PerturbationKind = "segmented",
        query_theta: bool = ESTIMATOR["spsa"]["query_theta"],
        *,
        seed: int,
    ) -> None:
        super().__init__(seed=seed)
        _positive("c", c)
        if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not gamma >= 0:
            raise ConfigError(f"expected gamma a number >= 0, got {gamma!r}")
        _positive("n_draws", n_draws, integer=True)
        if dist not in get_args(PerturbationKind):
            raise ConfigError(f"expected dist in {get_args(PerturbationKind)}, got {dist!r}")
        if not isinstance(query_theta, bool):
            raise ConfigError(f"expected query_theta a bool, got {query_theta!r}")
        self.c, self.gamma, self.n_draws, self.dist = float(c), float(gamma), n_draws, dist
        self.query_theta = query_theta

    @property
    def queries_per_step(self) -> int:
        return 2 * self.n_draws + int(self.query_theta)

    def c_k(self, k: int) -> float:
        """Perturbation size at call ``k`` (1-based)."""
        return self.c / k**self.gamma

    def _draw(self, n: int, d: int, like: Tensor) -> Tensor:
        gen = self.generator
        sign = torch.randint(0, 2, (n, d), generator=gen, dtype=torch.float64) * 2 - 1
        if self.dist == "rademacher":
            out = sign
        else:
            out = sign * (torch.rand((n, d), generator=gen, dtype=torch.float64) * 0.5 + 0.5)
        return out.to(device=like.device, dtype=like.dtype)

    def _estimate(self, objective: Objective, theta: Tensor) -> tuple[Tensor, Tensor]:
        n, d = self.n_draws, theta.numel()
        ck = self.c_k(self.step)
        pert = self._draw(n, d, theta)
        dirs = pert.view(n, *theta.shape)
        parts = [theta[None] + ck * dirs, theta[None] - ck * dirs]
        if self.query_theta:
            parts.insert(0, theta[None])
        losses = self._evaluate(objective, torch.cat(parts))
        first = int(self.query_theta)
        flat = losses.detach().to(pert.dtype)
        slopes = (flat[first : first + n] - flat[first + n :]) / (2 * ck)
        grad = (slopes[:, None] / pert).mean(dim=0)
        if self.query_theta:
            return losses[0], grad
        return (losses[first + n - 1] + losses[-1]) / 2, grad


def spsa_gc_optimizer(
    params: Any,
    a: float = 0.01,
    alpha: float = SPSA_GC["alpha"],
    o: float = SPSA_GC["o"],
    beta: float = SPSA_GC["beta"],
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SPSA-GC's update (BlackVIP, Oh et al. 2023) as a torch optimizer and schedule.

    The gradient correction ``m = beta m + g; theta -= a_k (g + beta m)`` (``m_0 = 0``) is
    exactly ``torch.optim.SGD(momentum=beta, nesterov=True, dampening=0)``, and the step size
    ``a_k = a / (k + o)^alpha`` is a ``LambdaLR``: call ``scheduler.step()`` after every
    ``optimizer.step()``, so the k-th step (k = 1, 2, ...) uses ``a / (k + o)^alpha``.
    """
    for name, value in (("a", a), ("alpha", alpha), ("o", o), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigError(f"expected {name} a number >= 0, got {value!r}")
    if beta <= 0:
        raise ConfigError(f"expected beta > 0 (nesterov needs momentum), got {beta!r}")
    optimizer = torch.optim.SGD(params, lr=a, momentum=beta, nesterov=True, dampening=0.0)

    def factor(epoch: int) -> float:
        return 1.0 / (epoch + 1 + o) ** alpha

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


_ESTIMATORS: dict[str, type[GradientEstimator]] = {
    "autograd": AutogradEstimator,
    "rgf": RGFEstimator,
    "spsa": SPSAEstimator,
}


def build_estimator(kind: EstimatorKind, *, seed: int, **options: Any) -> GradientEstimator:
    """Build an estimator by name; :class:`ConfigError` on unknown kinds or options."""
    if kind not in get_args(EstimatorKind):
        raise ConfigError(f"expected estimator kind in {get_args(EstimatorKind)}, got {kind!r}")
    cls: type[GradientEstimator]
    if kind == "prgf":  # P-RGF builds on this module (reprogram.prgf)
        from reprogram.prgf import PRGFEstimator

        cls = PRGFEstimator
    elif kind == "cma":  # CMA-ES (reprogram.cma)
        from reprogram.cma import CMAEstimator

        cls = CMAEstimator
    else:
        cls = _ESTIMATORS[kind]
    allowed = {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "seed")}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"expected options for estimator {kind!r} among {sorted(allowed)}, got {unknown}"
        )
    return cls(seed=seed, **options)
