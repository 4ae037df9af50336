"""Tests for reprogram.estimators: unbiasedness, alignment with autograd, structure, state, GC."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprogram.errors import ConfigError, EstimatorError
from reprogram.estimators import (
    AutogradEstimator,
    GradientEstimator,
    RGFEstimator,
    SPSAEstimator,
    build_estimator,
    spsa_gc_optimizer,
)
from reprogram.labelmaps import LabelMapSpec, build_labelmap
from reprogram.programs import ProgramSpec, build_program

log = logging.getLogger(__name__)

Objective = Callable[[Tensor], Tensor]
SHAPE = (3, 2, 2)  # d = 12


def _quadratic() -> tuple[Objective, Tensor, Tensor]:
    """L(theta) = 0.5 theta^T A theta + b^T theta (batched), a point theta and grad L(theta)."""
    gen = torch.Generator().manual_seed(0)
    d = 12
    m = torch.randn(d, d, generator=gen, dtype=torch.float64)
    a = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    theta = torch.randn(SHAPE, generator=gen, dtype=torch.float64)

    def objective(thetas: Tensor) -> Tensor:
        flat = thetas.flatten(1)
        return 0.5 * torch.einsum("pi,ij,pj->p", flat, a, flat) + flat @ b

    grad = (a @ theta.flatten() + b).view(SHAPE)
    return objective, theta, grad


def _mean_estimate(
    est: GradientEstimator, objective: Objective, theta: Tensor, calls: int
) -> Tensor:
    total = torch.zeros_like(theta)
    for _ in range(calls):
        _, g = est.value_and_grad(objective, theta)
        total += g
    return total / calls


def _rel_err(estimate: Tensor, truth: Tensor) -> float:
    return float((estimate - truth).norm() / truth.norm())


# ---------------------------------------------------------------- (1) expected value


@pytest.mark.parametrize(
    "est",
    [
        RGFEstimator(q=500, mu=1e-4, seed=1),
        RGFEstimator(q=250, mu=1e-4, antithetic=True, seed=2),
        SPSAEstimator(c=1e-3, n_draws=500, dist="rademacher", seed=3),
        SPSAEstimator(c=1e-3, n_draws=500, dist="segmented", seed=4),
    ],
    ids=["rgf", "rgf-antithetic", "spsa-rademacher", "spsa-segmented"],
)
def test_mean_estimate_converges_to_true_gradient(est: GradientEstimator) -> None:
    objective, theta, grad = _quadratic()
    mean = _mean_estimate(est, objective, theta, calls=40)
    err = _rel_err(mean, grad)
    log.info("%r: relative error of the mean estimate %.4f", est, err)
    assert err < 0.1
    # A single estimate is unbiased but noisy: clearly worse than the mean of 40.
    _, single = type(est)(**_options(est), seed=99).value_and_grad(objective, theta)
    assert _rel_err(single, grad) > err


def _options(est: GradientEstimator) -> dict[str, object]:
    if isinstance(est, RGFEstimator):
        return {"q": est.q, "mu": est.mu, "antithetic": est.antithetic}
    assert isinstance(est, SPSAEstimator)
    return {"c": est.c, "n_draws": est.n_draws, "dist": est.dist}


def test_autograd_is_exact_on_quadratic() -> None:
    objective, theta, grad = _quadratic()
    loss, g = AutogradEstimator(seed=0).value_and_grad(objective, theta)
    assert torch.allclose(g, grad)
    assert torch.allclose(loss.detach(), objective(theta[None])[0])


# ---------------------------------------------------------------- (2) alignment with autograd


def _cosines(est: GradientEstimator, objective: Objective, theta: Tensor, trials: int) -> Tensor:
    _, truth = AutogradEstimator(seed=0).value_and_grad(objective, theta)
    out = []
    for _ in range(trials):
        _, g = est.value_and_grad(objective, theta)
        out.append(F.cosine_similarity(g.flatten(), truth.flatten(), dim=0))
    return torch.stack(out)


def _mlp_problem() -> tuple[Objective, Tensor]:
    """A tiny fixed random tanh MLP of theta (3, 8, 8): d = 192."""
    gen = torch.Generator().manual_seed(1)
    w1 = torch.randn(192, 32, generator=gen, dtype=torch.float64) / 192**0.5
    w2 = torch.randn(32, generator=gen, dtype=torch.float64) / 32**0.5
    theta = torch.randn(3, 8, 8, generator=gen, dtype=torch.float64)

    def objective(thetas: Tensor) -> Tensor:
        return torch.tanh(thetas.flatten(1) @ w1) @ w2

    return objective, theta


def _cnn_problem() -> tuple[Objective, Tensor]:
    """Frozen random CNN + pad program (R=8, d=192) + first label map + CE on 16 images."""
    torch.manual_seed(0)  # only for the CNN's default initialisation
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).requires_grad_(False)
    spec = ProgramSpec(kind="pad", frame_size=(32, 32), inner_size=24, resolution=8, init_std=0.5)
    program = build_program(spec, seed=1)
    labelmap = build_labelmap(LabelMapSpec(kind="first", num_source=10, num_target=5))
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=gen)
    x = program.input_transform(raw)
    y = torch.randint(0, 5, (16,), generator=gen)

    def objective(thetas: Tensor) -> Tensor:
        p = thetas.shape[0]
        logits = net(program.apply(x, thetas).flatten(0, 1)).view(p, 16, 10)
        ce = F.cross_entropy(labelmap(logits).flatten(0, 1), y.repeat(p), reduction="none")
        return ce.view(p, 16).mean(1)

    return objective, program.theta.detach().clone()


@pytest.mark.parametrize("problem", ["mlp", "cnn"])
def test_rgf_cosine_with_autograd_is_positive_and_grows_with_q(problem: str) -> None:
    objective, theta = _mlp_problem() if problem == "mlp" else _cnn_problem()
    trials = 30 if problem == "mlp" else 10
    mu = 1e-4 if problem == "mlp" else 0.01
    low = _cosines(RGFEstimator(q=5, mu=mu, seed=0), objective, theta, trials)
    high = _cosines(RGFEstimator(q=50, mu=mu, seed=1), objective, theta, trials // 2)
    log.info("rgf %s: cos q=5 %.3f, q=50 %.3f", problem, low.mean(), high.mean())
    # Theory for q << d = 192: E[cos] ~ sqrt(q / d) = 0.16 (q=5) and 0.51 (q=50).
    assert float(low.mean()) > 0.07
    assert float(high.mean()) > 0.3
    assert float(high.mean()) > float(low.mean()) + 0.15


@pytest.mark.parametrize("problem", ["mlp", "cnn"])
def test_spsa_cosine_with_autograd_is_positive_and_grows_with_draws(problem: str) -> None:
    objective, theta = _mlp_problem() if problem == "mlp" else _cnn_problem()
    trials = 30 if problem == "mlp" else 12
    c = 1e-4 if problem == "mlp" else 0.01
    low = _cosines(SPSAEstimator(c=c, n_draws=1, seed=0), objective, theta, trials)
    high = _cosines(SPSAEstimator(c=c, n_draws=25, seed=1), objective, theta, trials // 2)
    log.info("spsa %s: cos draws=1 %.3f, draws=25 %.3f", problem, low.mean(), high.mean())
    assert float(low.mean()) > 0.02
    assert float(high.mean()) > 0.2
    assert float(high.mean()) > float(low.mean()) + 0.1


# ---------------------------------------------------------------- structure of the candidates


class _Recorder:
    """Linear objective b . theta that records the candidates it is given."""

    def __init__(self, d: int = 12) -> None:
        self.b = torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        self.calls: list[Tensor] = []

    def __call__(self, thetas: Tensor) -> Tensor:
        self.calls.append(thetas.detach().clone())
        return thetas.flatten(1) @ self.b


@pytest.mark.parametrize("antithetic", [False, True])
def test_rgf_candidates(antithetic: bool) -> None:
    rec, theta = _Recorder(), torch.randn(SHAPE, dtype=torch.float64)
    est = RGFEstimator(q=7, mu=0.3, antithetic=antithetic, seed=0)
    loss, g = est.value_and_grad(rec, theta)
    (cands,) = rec.calls
    assert cands.shape[0] == est.queries_per_step == (15 if antithetic else 8)
    assert torch.equal(cands[0], theta) and torch.allclose(loss, rec(theta[None])[0])
    steps = (cands[1:8] - theta).flatten(1)
    assert torch.allclose(steps.norm(dim=1), torch.full((7,), 0.3, dtype=torch.float64))
    if antithetic:
        assert torch.allclose(cands[8:] - theta, -(cands[1:8] - theta))
    # Linear L: every difference quotient is exact, so g = (d/q) sum_j (u_j . b) u_j.
    u = steps / 0.3
    assert torch.allclose(g.flatten(), (12 / 7) * (u @ rec.b) @ u)
    assert g.shape == theta.shape


@pytest.mark.parametrize("dist", ["rademacher", "segmented"])
def test_spsa_candidates_and_schedule(dist: str) -> None:
    rec, theta = _Recorder(), torch.randn(SHAPE, dtype=torch.float64)
    est = SPSAEstimator(c=0.2, gamma=0.5, n_draws=3, dist=dist, seed=0)  # type: ignore[arg-type]
    for k in (1, 2, 3):
        _, g = est.value_and_grad(rec, theta)
        cands = rec.calls[-1]
        assert cands.shape[0] == est.queries_per_step == 7
        assert torch.equal(cands[0], theta)
        plus, minus = cands[1:4] - theta, cands[4:] - theta
        assert torch.allclose(plus, -minus)
        ck = 0.2 / k**0.5
        assert est.c_k(k) == pytest.approx(ck)
        mags = (plus / ck).abs()
        if dist == "rademacher":
            assert torch.allclose(mags, torch.ones_like(mags))
        else:
            assert float(mags.min()) >= 0.5 - 1e-9 and float(mags.max()) <= 1.0 + 1e-9
        big_d = (plus / ck).flatten(1)
        expected = ((big_d @ rec.b)[:, None] / big_d).mean(0)
        assert torch.allclose(g.flatten(), expected)


@pytest.mark.parametrize("kind", ["autograd", "rgf", "spsa"])
def test_loss_keeps_graph_to_labelmap_parameters(kind: str) -> None:
    w = torch.tensor(2.0, requires_grad=True)
    objective, theta, _ = _quadratic()

    def scaled(thetas: Tensor) -> Tensor:
        return objective(thetas) * w

    est = build_estimator(kind, seed=0)  # type: ignore[arg-type]
    loss, g = est.value_and_grad(scaled, theta)
    assert loss.dim() == 0 and not g.requires_grad and g.shape == theta.shape
    loss.backward()
    assert w.grad is not None
    assert torch.allclose(w.grad, objective(theta[None])[0].to(w.dtype))


# ---------------------------------------------------------------- (3) differentiability check


def test_autograd_requires_differentiable_oracle() -> None:
    est = AutogradEstimator(seed=0)
    assert est.requires_differentiable and est.queries_per_step == 1
    with pytest.raises(EstimatorError, match="expected a differentiable oracle"):
        est.check(False)
    est.check(True)
    for zo in (RGFEstimator(seed=0), SPSAEstimator(seed=0)):
        assert not zo.requires_differentiable
        zo.check(False)
    with pytest.raises(EstimatorError):
        est.value_and_grad(lambda t: t.flatten(1).sum(1).detach(), torch.zeros(SHAPE))


def test_objective_with_wrong_output_shape_is_rejected() -> None:
    with pytest.raises(EstimatorError, match="expected objective losses"):
        RGFEstimator(q=3, seed=0).value_and_grad(lambda t: t.sum(), torch.zeros(SHAPE))


# ---------------------------------------------------------------- (4) state dict


@pytest.mark.parametrize(
    ("kind", "options"),
    [("rgf", {"q": 4, "mu": 0.1}), ("spsa", {"n_draws": 2, "c": 0.1})],
)
def test_state_dict_round_trip_gives_identical_next_estimates(
    kind: str, options: dict[str, object]
) -> None:
    objective, theta, _ = _quadratic()
    est = build_estimator(kind, seed=7, **options)  # type: ignore[arg-type]
    for _ in range(2):
        est.value_and_grad(objective, theta)
    state = copy.deepcopy(est.state_dict())
    _, expected = est.value_and_grad(objective, theta)
    _, again = est.value_and_grad(objective, theta)
    resumed = build_estimator(kind, seed=123, **options)  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    assert resumed.step == 2
    assert torch.equal(resumed.value_and_grad(objective, theta)[1], expected)
    assert torch.equal(resumed.value_and_grad(objective, theta)[1], again)
    assert not torch.equal(expected, again)
    with pytest.raises(ConfigError):
        AutogradEstimator(seed=0).load_state_dict(state)


# ---------------------------------------------------------------- (5) SPSA-GC optimizer


def test_spsa_gc_optimizer_is_nesterov_with_decaying_step() -> None:
    a, alpha, o, beta = 0.05, 0.4, 1.0, 0.9
    p0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g1 = torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64)
    g2 = torch.tensor([-0.2, 0.5, 0.2], dtype=torch.float64)
    param = nn.Parameter(p0.clone())
    opt, sched = spsa_gc_optimizer([param], a=a, alpha=alpha, o=o, beta=beta)
    # Step 1: m = g1; theta -= a/(1+o)^alpha * (g1 + beta m).
    param.grad = g1.clone()
    opt.step()
    sched.step()
    m = g1
    p1 = p0 - a / (1 + o) ** alpha * (g1 + beta * m)
    assert torch.allclose(param.detach(), p1)
    # Step 2: m = beta m + g2; theta -= a/(2+o)^alpha * (g2 + beta m).
    param.grad = g2.clone()
    opt.step()
    sched.step()
    m = beta * m + g2
    p2 = p1 - a / (2 + o) ** alpha * (g2 + beta * m)
    assert torch.allclose(param.detach(), p2)


# ---------------------------------------------------------------- factory


def test_build_estimator_options() -> None:
    assert isinstance(build_estimator("autograd", seed=0), AutogradEstimator)
    rgf = build_estimator("rgf", seed=0, q=5, mu=0.01, antithetic=True)
    assert isinstance(rgf, RGFEstimator) and rgf.queries_per_step == 11
    spsa = build_estimator("spsa", seed=0, n_draws=2)
    assert isinstance(spsa, SPSAEstimator) and spsa.queries_per_step == 5
    with pytest.raises(ConfigError, match="expected estimator kind"):
        build_estimator("nes", seed=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="expected options"):
        build_estimator("rgf", seed=0, sigma=0.1)
    with pytest.raises(ConfigError):
        build_estimator("autograd", seed=0, q=5)
    bad_rgf: list[dict[str, object]] = [{"q": 0}, {"mu": -1.0}, {"q": 2.5}, {"antithetic": 1}]
    for bad in bad_rgf:
        with pytest.raises(ConfigError):
            build_estimator("rgf", seed=0, **bad)
    bad_spsa: list[dict[str, object]] = [
        {"c": 0.0},
        {"dist": "gaussian"},
        {"n_draws": 0},
        {"gamma": -1.0},
    ]
    for bad in bad_spsa:
        with pytest.raises(ConfigError):
            build_estimator("spsa", seed=0, **bad)
    with pytest.raises(ConfigError):
        build_estimator("rgf", seed=-1)
