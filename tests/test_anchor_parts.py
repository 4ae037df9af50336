"""The parts the anchors need: focal losses, schedules, SPSA without the query at theta, BAR's
top-probability map scores, Elsayed's weight penalty, and the one table of defaults."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from reprogram.config import FitConfig, recommended_config
from reprogram.defaults import ESTIMATOR, RECOMMENDED
from reprogram.errors import ConfigError
from reprogram.estimators import RGFEstimator, SPSAEstimator
from reprogram.labelmaps import LabelMap, LabelMapSpec, top_prob_matrix
from reprogram.losses import LossSpec
from reprogram.schedules import ScheduleSpec


def test_cross_entropy_is_torch_cross_entropy() -> None:
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(LossSpec()(logits, y), F.cross_entropy(logits, y, reduction="none"))


def test_focal_loss_is_lin_et_al() -> None:
    logits, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    p = torch.softmax(logits, -1)[0, 0].item()
    got = LossSpec(kind="focal", gamma=2.0)(logits, y).item()
    assert math.isclose(got, -((1 - p) ** 2) * math.log(p), rel_tol=1e-6)
    # gamma 0 is cross-entropy
    assert torch.allclose(LossSpec(kind="focal", gamma=0.0)(logits, y),
                          F.cross_entropy(logits, y, reduction="none"))


def test_bar_focal_loss_is_per_class_binary_focal_on_mapped_probabilities() -> None:
    probs, y = torch.tensor([[0.6, 0.3, 0.1]]), torch.tensor([0])
    got = LossSpec(kind="focal-bar", gamma=4.0, alpha=0.8)(probs.log(), y).item()
    terms = [0.8 * 0.4**4 * -math.log(0.6), 0.2 * 0.3**4 * -math.log(0.7),
             0.2 * 0.1**4 * -math.log(0.9)]
    assert math.isclose(got, sum(terms) / 3, rel_tol=1e-5)
    assert LossSpec(kind="focal-bar").needs_log_probs and not LossSpec().needs_log_probs


def test_loss_spec_is_checked() -> None:
    with pytest.raises(ConfigError, match="loss kind"):
        LossSpec(kind="hinge")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="alpha"):
        LossSpec(kind="focal-bar", alpha=1.5)
    assert FitConfig(loss="focal", epochs=1).loss == LossSpec(kind="focal")
    assert FitConfig(loss={"kind": "focal", "gamma": 3.0}, epochs=1).loss.gamma == 3.0


def _factors(spec: ScheduleSpec, total: int, per_epoch: int = 10, lr: float = 1.0) -> list:
    f = spec.factor(total, per_epoch, lr)
    return [f(t) for t in range(total)]


def test_schedules() -> None:
    assert _factors(ScheduleSpec(kind="constant"), 5) == [1.0] * 5
    cos = _factors(ScheduleSpec(kind="cosine"), 100)
    assert cos[0] == 1.0 and math.isclose(cos[50], 0.5) and cos[99] < 0.001
    warm = _factors(ScheduleSpec(kind="warmup-cosine", warmup_steps=10), 110)
    assert warm[0] == pytest.approx(0.1) and warm[9] == pytest.approx(1.0)
    assert warm[10] == 1.0 and warm[60] == pytest.approx(0.5)
    poly = _factors(ScheduleSpec(kind="poly", lr_min=0.1, power=0.9), 100, lr=10.0)
    assert poly[0] == 1.0 and poly[90] == pytest.approx(0.01) and poly[99] == pytest.approx(0.01)
    assert poly[45] == pytest.approx(0.01 + 0.99 * 0.5**0.9)
    steps = _factors(ScheduleSpec(kind="multistep"), 100)
    assert steps[49] == 1.0 and steps[50] == pytest.approx(0.1) and steps[72] == pytest.approx(
        0.01)
    exp = _factors(ScheduleSpec(kind="exponential", gamma=0.96, decay_epochs=2), 60, 10)
    assert exp[19] == 1.0 and exp[20] == pytest.approx(0.96) and exp[59] == pytest.approx(0.9216)
    with pytest.raises(ConfigError, match="milestones"):
        ScheduleSpec(kind="multistep", milestones=(0.5, 1.5))


def test_old_configs_with_a_schedule_name_still_load() -> None:
    saved = FitConfig(epochs=1).to_dict()
    saved["schedule"] = "cosine"
    del saved["loss"]
    cfg = FitConfig.from_dict(saved)
    assert cfg.schedule == ScheduleSpec(kind="cosine") and cfg.loss == LossSpec()
    assert FitConfig.from_dict(FitConfig(epochs=1, schedule="poly").to_dict()) == FitConfig(
        epochs=1, schedule="poly")


def test_spsa_without_the_query_at_theta() -> None:
    theta = torch.randn(3, 2, 2, dtype=torch.float64)
    target = torch.randn(3, 2, 2, dtype=torch.float64)
    seen: list[int] = []

    def objective(thetas: torch.Tensor) -> torch.Tensor:
        seen.append(len(thetas))
        return ((thetas - target) ** 2).flatten(1).sum(1)

    with_theta = SPSAEstimator(c=0.01, gamma=0.0, n_draws=5, query_theta=True, seed=3)
    without = SPSAEstimator(c=0.01, gamma=0.0, n_draws=5, query_theta=False, seed=3)
    assert with_theta.queries_per_step == 11 and without.queries_per_step == 10
    loss_a, grad_a = with_theta.value_and_grad(objective, theta)
    loss_b, grad_b = without.value_and_grad(objective, theta)
    assert seen == [11, 10]
    assert torch.allclose(grad_a, grad_b)  # the same draws, the same estimate
    assert loss_a.item() == pytest.approx(((theta - target) ** 2).sum().item())
    # the loss reported without the query at theta is the mean of the last +/- pair
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-3)


def test_top_probability_scores_follow_bar() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.25, 0.45]])
    labels = torch.tensor([0, 1, 1])
    score = top_prob_matrix(probs, labels, num_target=2, k=2)
    expected = torch.tensor([[0.7, 0.3], [0.2, 0.5], [0.0, 0.425]], dtype=torch.float64)
    assert torch.allclose(score, expected)
    lm = LabelMap(LabelMapSpec(kind="frequency", num_source=3, num_target=2))
    lm.fit_matrix(score)
    assert lm.assignment.flatten().tolist() == [0, 1]


def test_weight_penalty_adds_lambda_times_the_squared_norm() -> None:
    from reprogram.labelmaps import build_labelmap
    from reprogram.oracles import LocalOracle
    from reprogram.pipeline import Reprogrammer
    from reprogram.programs import build_program
    from reprogram.zoo.registry import load_model

    oracle = LocalOracle(load_model(), output="probs", wire="fp32")
    spec = FitConfig(program="mask", epochs=1).program_spec(oracle.info.input_size)
    program = build_program(spec, seed=0)
    labelmap = build_labelmap(LabelMapSpec(kind="first", num_source=10, num_target=10))
    x = program.input_transform(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
    y = torch.tensor([0, 1, 2, 3])
    thetas = torch.randn(2, *program.theta_shape)
    plain = Reprogrammer(program, labelmap).objective(x, y, oracle)(thetas)
    lam = 0.05
    penalised = Reprogrammer(program, labelmap, weight_penalty=lam).objective(x, y, oracle)(
        thetas)
    assert torch.allclose(penalised - plain, lam * thetas.pow(2).flatten(1).sum(1), atol=1e-5)


def test_one_table_of_defaults() -> None:
    rgf = inspect.signature(RGFEstimator.__init__).parameters
    spsa = inspect.signature(SPSAEstimator.__init__).parameters
    cfg = FitConfig(epochs=1)
    for name, value in ESTIMATOR["rgf"].items():
        assert rgf[name].default == value == getattr(cfg, name)
    for name, field in (("c", "spsa_c"), ("gamma", "spsa_gamma"), ("n_draws", "spsa_draws"),
                        ("query_theta", "spsa_query_theta")):
        assert spsa[name].default == ESTIMATOR["spsa"][name] == getattr(cfg, field)
    # the CLI's recommended configs repeat no estimator value: they get the table's
    rec = recommended_config("rgf", epochs=1)
    assert (rec.q, rec.mu) == (ESTIMATOR["rgf"]["q"], ESTIMATOR["rgf"]["mu"])
    assert all(k not in ("q", "mu", "spsa_c") for entry in RECOMMENDED.values() for k in entry)
