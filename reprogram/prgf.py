"""Prior-guided random gradient-free estimation (P-RGF).

Cheng, Dong, Pang, Su, Zhu, "Improving Black-box Adversarial Attacks with a Transfer-based
Prior", NeurIPS 2019 (Algorithm 1; extended in Dong et al., TPAMI 2022). A transfer prior ``v``
(here: the exact gradient of the same objective with a local *surrogate* model in place of the
API, :mod:`reprogram.surrogate`) is mixed with random directions at the coefficient that
maximizes the expected cosine similarity between the estimate and the true gradient:

- ``alpha = v . grad / ||grad||`` (``v`` unit) is estimated from one query at ``theta + mu v``
  (``v . grad``) and the norm of the gradient's part orthogonal to ``v`` measured at the
  previous step (the norm changes slowly; the paper reuses it the same way);
- ``lambda*`` from ``alpha^2``, ``d`` and ``q`` (:func:`optimal_lambda`, the paper's eq. 12):
  0 when the prior is no better than a random direction, 1 when it is good enough alone;
- ``u_i = sqrt(lambda) v + sqrt(1 - lambda) xi_i`` with ``xi_i`` uniform on the unit sphere
  orthogonal to ``v``, and ``g = (1/q) sum_i [(L(theta + mu u_i) - L(theta)) / mu] u_i``;
  ``lambda* = 1`` spends no random queries and takes ``g = (v . grad) v``.

The first step has no norm estimate yet and uses ``lambda = 0`` (plain random directions
orthogonal to ``v``; the prior's own derivative is still measured). P-RGF estimates a
*direction*; its length varies with ``lambda`` by up to a factor ``d``, which would upset
Adam's running moments, so the estimate is rescaled to the estimated gradient norm
``sqrt((v . grad)^2 + ||grad_perp||^2)``. A step costs ``q + 2`` candidates (``theta``,
``theta + mu v``, the ``q`` directions) in two oracle calls, ``2`` when ``lambda* = 1``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from reprogram.defaults import ESTIMATOR
from reprogram.errors import ConfigError, EstimatorError
from reprogram.estimators import GradientEstimator, Objective, _positive

__all__ = ["PRGFEstimator", "optimal_lambda"]


def optimal_lambda(alpha2: float, d: int, q: int) -> float:
    """The paper's eq. 12: the weight of the prior that maximizes the expected cosine
    similarity, for ``alpha^2`` (squared cosine of prior and gradient), dimension ``d`` and
    ``q`` random directions."""
    m = d + 2 * q - 2
    if alpha2 <= 1.0 / m:
        return 0.0
    if alpha2 >= (2 * q - 1) / m:
        return 1.0
    num = (1 - alpha2) * (alpha2 * m - 1)
    den = 2 * alpha2 * d * q - alpha2**2 * d * m - 1
    return min(1.0, max(0.0, num / den))


class PRGFEstimator(GradientEstimator):
    """P-RGF (see the module docstring). Set :attr:`prior` (a tensor of ``theta``'s shape)
    before each :meth:`value_and_grad`; a step without one is an error."""

    kind = "prgf"

    def __init__(self, q: int = ESTIMATOR["rgf"]["q"], mu: float = ESTIMATOR["rgf"]["mu"], *,
                 seed: int) -> None:
        super().__init__(seed=seed)
        _positive("q", q, integer=True)
        _positive("mu", mu)
        self.q, self.mu = q, float(mu)
        self.prior: Tensor | None = None
        self.perp_sq: float | None = None  # ||grad_perp||^2 measured at the last step
        self.last: dict[str, float] = {}  # alpha^2 and lambda of the last step, for logs

    @property
    def queries_per_step(self) -> int:
        return self.q + 2

    def _take_prior(self, theta: Tensor) -> Tensor:
        prior, self.prior = self.prior, None
        if prior is None or prior.numel() != theta.numel():
            raise EstimatorError("expected a prior gradient (a surrogate's) before each P-RGF "
                                 "step, got none; give the fit a surrogate model")
        v = prior.detach().flatten().to(torch.float64)
        norm = float(v.norm())
        if not math.isfinite(norm) or norm == 0.0:  # no information: a random direction
            v = self._randn((theta.numel(),), v)
            norm = float(v.norm())
        return v / norm

    def _estimate(self, objective: Objective, theta: Tensor) -> tuple[Tensor, Tensor]:
        d, q, mu = theta.numel(), self.q, self.mu
        v = self._take_prior(theta)
        vt = v.to(theta.dtype).view(theta.shape)
        first = self._evaluate(objective, torch.stack([theta, theta + mu * vt]))
        f0 = float(first[0].detach())
        dv = (float(first[1].detach()) - f0) / mu  # v . grad
        lam = 0.0
        if self.perp_sq is not None:
            alpha2 = dv * dv / max(dv * dv + self.perp_sq, 1e-300)
            lam = optimal_lambda(alpha2, d, q)
            self.last = {"alpha2": alpha2, "lambda": lam}
        if lam >= 1.0:
            norm = math.sqrt(dv * dv + (self.perp_sq or 0.0))
            grad = math.copysign(norm, dv) * v
            return first[0], grad
        xi = self._randn((q, d), v).to(torch.float64)
        xi = xi - (xi @ v)[:, None] * v[None]
        xi = xi / xi.norm(dim=1, keepdim=True)
        u = math.sqrt(lam) * v[None] + math.sqrt(1 - lam) * xi
        dirs = u.to(theta.dtype).view(q, *theta.shape)
        losses = self._evaluate(objective, theta[None] + mu * dirs)
        slopes = (losses.detach().to(torch.float64) - f0) / mu
        perp = (slopes - math.sqrt(lam) * dv) / math.sqrt(1 - lam)  # xi_i . grad
        self.perp_sq = (d - 1) / q * float((perp**2).sum())
        direction = slopes @ u / q
        length = float(direction.norm())
        norm = math.sqrt(dv * dv + self.perp_sq)
        grad = direction * (norm / length) if length > 0 else direction
        return first[0], grad

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "perp_sq": self.perp_sq}

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        perp = state.get("perp_sq")
        if perp is not None and (isinstance(perp, bool) or not isinstance(perp, int | float)):
            raise ConfigError(f"expected perp_sq a number or None, got {perp!r}")
        self.perp_sq = None if perp is None else float(perp)
