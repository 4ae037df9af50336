"""P-RGF: better than RGF with an informative prior, no worse than RGF with a useless one."""

from __future__ import annotations

import math

import pytest
import torch

from reprogram.errors import EstimatorError
from reprogram.estimators import RGFEstimator, build_estimator
from reprogram.prgf import PRGFEstimator, optimal_lambda

D = 192  # our default grid: 3 x 8 x 8


def _problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=gen, dtype=torch.float64) / math.sqrt(D)
    h = a @ a.T + 0.1 * torch.eye(D, dtype=torch.float64)
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    theta = torch.randn(D, generator=gen, dtype=torch.float64)
    return h, b, theta


def _objective(h: torch.Tensor, b: torch.Tensor):  # type: ignore[no-untyped-def]
    def losses(thetas: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((thetas @ h) * thetas).sum(1) + thetas @ b

    return losses


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


def _mean_cos(prior_of, seeds: range, q: int = 10) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    prgf_cos, rgf_cos = [], []
    for seed in seeds:
        h, b, theta = _problem(seed)
        true = h @ theta + b
        objective = _objective(h, b)
        prgf = PRGFEstimator(q=q, mu=1e-4, seed=seed)
        rgf = RGFEstimator(q=q + 1, mu=1e-4, seed=seed)  # the same q + 2 queries per step
        for _ in range(3):  # the first step measures the gradient norm
            prgf.prior = prior_of(true, seed)
            _, g = prgf.value_and_grad(objective, theta)
        prgf_cos.append(_cos(g, true))
        _, g = rgf.value_and_grad(objective, theta)
        rgf_cos.append(_cos(g, true))
    return sum(prgf_cos) / len(prgf_cos), sum(rgf_cos) / len(rgf_cos)


def test_an_informative_prior_beats_rgf_at_the_same_queries() -> None:
    def informative(true: torch.Tensor, seed: int) -> torch.Tensor:
        noise = torch.randn(D, generator=torch.Generator().manual_seed(100 + seed),
                            dtype=torch.float64)
        return true / true.norm() + 1.2 * noise / noise.norm()  # cosine about 0.6

    prgf, rgf = _mean_cos(informative, range(8))
    assert prgf > rgf + 0.3, (prgf, rgf)


def test_a_useless_prior_falls_back_to_rgf() -> None:
    def noise(true: torch.Tensor, seed: int) -> torch.Tensor:
        return torch.randn(D, generator=torch.Generator().manual_seed(200 + seed),
                           dtype=torch.float64)

    prgf, rgf = _mean_cos(noise, range(8))
    # random directions orthogonal to a useless prior: RGF's quality, within noise
    assert prgf > rgf - 0.06, (prgf, rgf)
    assert prgf < rgf + 0.1


def test_optimal_lambda_is_the_papers() -> None:
    d, q = 192, 10
    m = d + 2 * q - 2
    assert optimal_lambda(0.5 / m, d, q) == 0.0
    assert optimal_lambda((2 * q - 1) / m + 1e-9, d, q) == 1.0
    # continuous at both ends, and growing with alpha
    assert optimal_lambda(1 / m + 1e-12, d, q) < 1e-6
    assert optimal_lambda((2 * q - 1) / m - 1e-12, d, q) > 1 - 1e-6
    grid = [optimal_lambda(a / 100, d, q) for a in range(1, 20)]
    assert grid == sorted(grid)


def test_a_prior_is_required_and_state_round_trips() -> None:
    h, b, theta = _problem(0)
    est = build_estimator("prgf", seed=0, q=4, mu=1e-3)
    assert isinstance(est, PRGFEstimator) and est.queries_per_step == 6
    with pytest.raises(EstimatorError, match="prior"):
        est.value_and_grad(_objective(h, b), theta)
    est.prior = h @ theta + b
    est.value_and_grad(_objective(h, b), theta)
    again = PRGFEstimator(q=4, mu=1e-3, seed=0)
    again.load_state_dict(est.state_dict())
    assert again.perp_sq == est.perp_sq and again.step == est.step
