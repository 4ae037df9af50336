"""CMA-ES on the program's parameters, as Black-Box Tuning does for prompts behind an API.

Sun, Shao, Qian, Huang, Qiu, "Black-Box Tuning for Language-Model-as-a-Service", ICML 2022
(and BPT-VLM for vision-language prompts): a covariance-matrix-adaptation evolution strategy
(Hansen 2016, "The CMA Evolution Strategy: A Tutorial") searches a low-dimensional prompt
from loss values alone. Here the search space is the coarse grid the black-box defaults use
(``resolution`` 8: ``d = 192``), which is already as small as BBT's random projection.

One fit step is one CMA-ES generation: ``popsize`` candidates drawn from ``N(m, sigma^2 C)``
(the ``cmaes`` package, ask/tell) and the mean ``m`` itself, all on the same mini-batch in ONE
oracle call (``popsize + 1`` candidates; the mean's loss carries the graph a linear label map
learns from). The step's "gradient" is ``theta - m'`` with ``m'`` the updated mean, and the
``cma`` optimizer (:class:`CMAStep`) applies it exactly (``theta <- m'``) while Adam trains the
label map, so the pipeline stays estimator -> optimizer.

Restarts: when the strategy stops (its step size or spread collapses, or the losses flatten;
``cmaes``' ``should_stop``), it restarts at its current mean with the initial ``sigma`` and
``C = I``. The population size stays fixed (not IPOP's doubling), so a step's query cost is
known in advance for the budget's plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from cmaes import CMA
from torch import Tensor

from reprogram.defaults import ESTIMATOR
from reprogram.errors import ConfigError
from reprogram.estimators import GradientEstimator, Objective, _positive

__all__ = ["CMAEstimator", "CMAStep"]

_SEED_SPAN = 2**31 - 1


class CMAEstimator(GradientEstimator):
    """CMA-ES as an estimator of the step ``theta - m'`` (see the module docstring)."""

    kind = "cma"

    def __init__(self, sigma: float = ESTIMATOR["cma"]["sigma"],
                 popsize: int = ESTIMATOR["cma"]["popsize"], *, seed: int) -> None:
        super().__init__(seed=seed)
        _positive("sigma", sigma)
        _positive("popsize", popsize, integer=True)
        if popsize < 2:
            raise ConfigError(f"expected popsize >= 2 (CMA-ES ranks candidates), got {popsize}")
        self.sigma, self.popsize = float(sigma), popsize
        self.cma: CMA | None = None
        self.restarts = 0

    @property
    def queries_per_step(self) -> int:
        return self.popsize + 1

    def _new_cma(self, mean: np.ndarray) -> CMA:
        seed = int(torch.randint(0, _SEED_SPAN, (1,), generator=self.generator))
        with np.errstate(divide="ignore"):  # popsize 2: no rank-mu update (cmu = 0)
            return CMA(mean=mean, sigma=self.sigma, population_size=self.popsize, seed=seed)

    def _estimate(self, objective: Objective, theta: Tensor) -> tuple[Tensor, Tensor]:
        flat = theta.detach().flatten().to(torch.float64).cpu().numpy()
        if self.cma is None:
            self.cma = self._new_cma(flat)
        elif self.cma.should_stop():
            self.restarts += 1
            self.cma = self._new_cma(np.asarray(self.cma.mean, dtype=np.float64))
        cma = self.cma
        xs = np.stack([cma.ask() for _ in range(self.popsize)])
        cands = torch.from_numpy(xs).to(device=theta.device, dtype=theta.dtype)
        thetas = torch.cat([theta[None], cands.view(self.popsize, *theta.shape)])
        losses = self._evaluate(objective, thetas)
        values = losses.detach().to(torch.float64).cpu().numpy()[1:]
        worst = float(np.max(values[np.isfinite(values)])) if np.isfinite(values).any() else 0.0
        values = np.where(np.isfinite(values), values, worst + 1.0)  # a NaN ranks last
        cma.tell([(x, float(v)) for x, v in zip(xs, values, strict=True)])
        mean = torch.from_numpy(np.asarray(cma.mean, dtype=np.float64))
        grad = theta.detach().flatten().to(torch.float64).cpu() - mean
        return losses[0], grad.to(theta.device)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "restarts": self.restarts,
                "cma": None if self.cma is None else _cma_state(self.cma)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        restarts = state.get("restarts", 0)
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
            raise ConfigError(f"expected restarts an int >= 0, got {restarts!r}")
        self.restarts = restarts
        saved = state.get("cma")
        self.cma = None if saved is None else _cma_from_state(saved, self.popsize)


def _to_torch(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.astype(np.float64, copy=True))
    if isinstance(value, np.generic):
        return value.item()
    return value


def _cma_state(cma: CMA) -> dict[str, Any]:
    """The strategy's attributes as tensors and numbers, with its random generator's state, so
    a checkpoint stays loadable with ``torch.load(weights_only=True)``. The covariance is kept
    whole: ``cmaes``' own pickle keeps one triangle, and the rounding of a re-symmetrized
    matrix would change the next draws."""
    state = {k: _to_torch(v) for k, v in vars(cma).items() if k != "_rng"}
    name, key, pos, has_gauss, cached = cma._rng.get_state()
    state["_rng_state"] = {"name": str(name), "key": torch.from_numpy(key.astype(np.int64)),
                           "pos": int(pos), "has_gauss": int(has_gauss),
                           "cached": float(cached)}
    return state


def _cma_from_state(saved: Any, popsize: int) -> CMA:
    if not isinstance(saved, Mapping) or not isinstance(saved.get("_rng_state"), Mapping):
        raise ConfigError("expected a saved CMA-ES state, got something else")
    rng = saved["_rng_state"]
    state = {k: (v.numpy().copy() if isinstance(v, Tensor) else v)
             for k, v in saved.items() if k != "_rng_state"}
    if state.get("_popsize") != popsize:
        raise ConfigError(f"expected a CMA-ES state with population {popsize}, got "
                          f"{state.get('_popsize')!r}")
    cma = CMA.__new__(CMA)
    vars(cma).update(state)
    cma._rng = np.random.RandomState()
    key = rng["key"].numpy().astype(np.uint32)
    cma._rng.set_state((rng["name"], key, int(rng["pos"]), int(rng["has_gauss"]),
                        float(rng["cached"])))
    return cma


class CMAStep(torch.optim.Adam):
    """The ``cma`` optimizer: parameter groups marked ``assign`` take their gradient as the
    exact step (``p <- p - grad``: the CMA-ES mean); the others (the label map) are Adam's.
    The learning-rate schedule scales only Adam's groups."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            if group.get("assign"):
                for p in group["params"]:
                    if p.grad is not None:
                        if not bool(torch.isfinite(p.grad).all()):
                            raise ConfigError("expected a finite CMA-ES step, got NaN/inf")
                        p.sub_(p.grad)
                        p.grad = None
        return super().step(closure)


def check_pairing(estimator: str, optimizer: str) -> None:
    """CMA-ES moves theta itself: estimator ``cma`` and optimizer ``cma`` go together."""
    if (estimator == "cma") != (optimizer == "cma"):
        raise ConfigError(f"expected estimator 'cma' with optimizer 'cma' (CMA-ES sets theta to "
                          f"its mean; Adam trains the label map), got estimator {estimator!r} "
                          f"with optimizer {optimizer!r}")

