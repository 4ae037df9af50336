"""Tests for reprogram.config and reprogram.fit: the loop, budgets, validation selection, resume."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from reprogram import fit as fit_module
from reprogram.artifact import load_prompt, save_prompt
from reprogram.config import RECOMMENDED, FitConfig, recommended_config
from reprogram.data import TargetDataset, load_digits
from reprogram.errors import ConfigError, EstimatorError
from reprogram.estimators import RGFEstimator, SPSAEstimator
from reprogram.fit import PHASES, FitResult, Fitter, fit, plan
from reprogram.oracle_wrapper import OracleWrapper
from reprogram.oracles import LocalOracle
from reprogram.zoo.registry import SourceModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> TargetDataset:
    """200 digits (20 per class): 120 train, 30 validation, 50 test with the default split."""
    ds = load_digits()
    idx = torch.cat([torch.nonzero(ds.labels == c).flatten()[:20] for c in range(10)])
    return ds.subset(idx, ":small")


def _cfg(**kw: Any) -> FitConfig:
    base: dict[str, Any] = {
        "inner_size": 8, "resolution": 4, "batch_size": 16, "epochs": 2, "eval_every": 4,
        "lr": 0.1, "q": 4, "mu": 0.5, "spsa_c": 0.1, "seed": 3,
    }
    return FitConfig(**{**base, **kw})


class SpyOracle(OracleWrapper):
    """A LocalOracle seen through a log: every query's size and which target images it held.

    The target image sits unchanged in the centre of every frame (pad program, inner size =
    image size), so each queried frame is traced back to the split it came from.
    """

    def __init__(self, inner: LocalOracle, splits: dict[str, TargetDataset], inner_size: int,
                 budget: int | None = None) -> None:
        super().__init__(inner, budget=budget)
        self.keys: dict[bytes, str] = {}
        for name, part in splits.items():
            for img in part.images:
                self.keys[self._key(img.expand(3, -1, -1))] = name
        assert len(self.keys) == sum(len(p) for p in splits.values())  # images are unique
        self.top = (32 - inner_size) // 2
        self.size = inner_size
        self.log: list[dict[str, int]] = []
        self.test_seen: list[bytes] = []

    @staticmethod
    def _key(img: torch.Tensor) -> bytes:
        return bytes(img.to(torch.uint8).contiguous().numpy().tobytes())

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        t, s = self.top, self.size
        centre = torch.round(x.detach()[:, :, t : t + s, t : t + s] * 255)
        counts = {"train": 0, "val": 0, "test": 0}
        for img in centre:
            key = self._key(img)
            counts[self.keys[key]] += 1
            if self.keys[key] == "test":
                self.test_seen.append(key)
        self.log.append(counts)
        return super()._query(x)


def _spy(model: SourceModel, cfg: FitConfig, data: TargetDataset,
         budget: int | None = None) -> SpyOracle:
    train, val, test = data.split(cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return SpyOracle(LocalOracle(model), {"train": train, "val": val, "test": test},
                     cfg.inner_size or 16, budget=budget)


# ----------------------------------------------------------------------------- FitConfig
def test_config_validation() -> None:
    cfg = FitConfig(epochs=1)
    assert FitConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    bad: list[dict[str, Any]] = [
        {}, {"epochs": 0}, {"budget": 0}, {"epochs": 1, "program": "zoom"},
        {"epochs": 1, "labelmap": "best"}, {"epochs": 1, "estimator": "nes"},
        {"epochs": 1, "optimizer": "lbfgs"}, {"epochs": 1, "schedule": "step"},
        {"epochs": 1, "batch_size": 0}, {"epochs": 1, "q": 0}, {"epochs": 1, "lr": 0},
        {"epochs": 1, "mu": -1.0}, {"epochs": 1, "checkpoint_every": 0},
    ]
    for kw in bad:
        with pytest.raises(ConfigError, match="expected"):
            FitConfig(**kw)
    assert plan(FitConfig(epochs=1, eval_every=7), 10, 1000, 100, 0) == (32, 7)
    for n_train, interval in ((32, 1), (25 * 32, 1), (26 * 32, 2), (100 * 32, 4),
                              (101 * 32, 5)):  # epochs only: at most 25 validations
        assert plan(FitConfig(epochs=1), 32, n_train, 100, 0) == (n_train // 32, interval)
    # a budget: validation takes at most ~10% of it, and the steps use the rest
    steps, every = plan(FitConfig(budget=100_000), 352, 1000, 270, 0)
    n_evals = -(-steps // every)
    assert n_evals * 270 <= 0.1 * 100_000 and steps * 352 + (n_evals + 1) * 270 <= 100_000
    small_steps, small_every = plan(FitConfig(budget=5_000), 32, 1000, 270, 0)
    assert small_steps * 32 + 270 * (-(-small_steps // small_every) + 1) <= 5_000
    assert small_steps >= 100
    spec = FitConfig(epochs=1).program_spec((32, 32))
    assert spec.inner_size == 16 and spec.frame_size == (32, 32)
    est = _cfg(estimator="rgf", antithetic=True).build_estimator()
    assert isinstance(est, RGFEstimator) and est.q == 4 and est.antithetic
    assert est.queries_per_step == 9
    spsa = _cfg(estimator="spsa", spsa_draws=2).build_estimator()
    assert isinstance(spsa, SPSAEstimator) and spsa.queries_per_step == 5


def test_recommended_config() -> None:
    cfg = recommended_config("spsa", budget=1000, lr=None, seed=5)
    assert cfg.estimator == "spsa" and cfg.optimizer == RECOMMENDED["spsa"]["optimizer"]
    assert cfg.lr == RECOMMENDED["spsa"]["lr"]  # None overrides keep the default
    assert (cfg.budget, cfg.seed) == (1000, 5)
    assert recommended_config("rgf", epochs=2, q=3).q == 3
    with pytest.raises(ConfigError, match="estimator"):
        recommended_config("nes", epochs=1)
    with pytest.raises(ConfigError, match="epochs or budget"):
        recommended_config("autograd")


def test_optimizer_and_schedule_factories() -> None:
    theta = torch.nn.Parameter(torch.zeros(3))
    head = [torch.nn.Parameter(torch.zeros(2))]
    opt, sched = _cfg(optimizer="adam", labelmap_lr=0.01).build_optimizer(theta, head, 10)
    assert isinstance(opt, torch.optim.Adam)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine to 0
    opt, sched = _cfg(optimizer="spsa-gc").build_optimizer(theta, [], 10)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 2**0.4)  # a / (k + o)^alpha, k=1


# ----------------------------------------------------------------------------- the loop
def test_fit_learns_and_reports(model: SourceModel, data: TargetDataset,
                                tmp_path: Path) -> None:
    cfg = _cfg(estimator="autograd", epochs=3, lr=0.3, inner_size=16, resolution=None)
    rows: list[dict[str, Any]] = []
    result = fit(cfg, LocalOracle(model), data, callback=rows.append)
    assert isinstance(result, FitResult)
    assert result.stop_reason == "epochs" and result.steps == 24 == len(rows)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert result.history[0]["step"] == 0 and result.history[-1]["step"] == 24
    assert result.best_val_accuracy == max(r["val_accuracy"] for r in result.history)
    assert result.test_accuracy is not None and result.test_accuracy > 0.2  # chance is 0.1
    meta = result.prompt.metadata()
    assert meta["metrics"]["test_accuracy"] == result.test_accuracy
    assert meta["metrics"]["splits"] == {"train": 120, "val": 30, "test": 50}
    assert meta["seed"] == 3 and meta["config"] == cfg.to_dict()
    assert meta["source"]["weights_sha256"] == model.meta.weights_sha256
    assert result.queries["test_images"] == 50
    # the artifact predicts what the fitted model predicts
    path = save_prompt(result.prompt, tmp_path / "p.safetensors")
    oracle = LocalOracle(model)
    rebuilt = load_prompt(path).build()
    assert torch.equal(rebuilt.predict_logits(data.images, oracle),
                       result.model.predict_logits(data.images, oracle))


class _SlowOracle(OracleWrapper):
    """Every query takes at least ``delay`` seconds longer (to see where the time is booked)."""

    def __init__(self, inner: LocalOracle, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay
        self.calls = 0

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        self.calls += 1
        time.sleep(self.delay)
        return super()._query(x)


def test_fit_books_its_time_per_phase_with_queries_apart(model: SourceModel,
                                                         data: TargetDataset) -> None:
    delay = 0.1  # large against the client's own work, even on a loaded machine
    oracle = _SlowOracle(LocalOracle(model), delay)
    result = fit(_cfg(estimator="rgf", epochs=2), oracle, data)
    t = result.timings
    assert set(t) == set(PHASES) and all(v >= 0 for v in t.values())
    assert t["queries"] >= oracle.calls * delay  # every query's sleep is booked to queries
    assert t["estimator"] < oracle.calls * delay / 2  # ... and none of it to the client maths
    assert t["validation"] < t["queries"] and t["test"] < t["queries"]
    assert t["optimizer"] > 0 and t["estimator"] > 0
    assert sum(t.values()) <= result.seconds


def test_autograd_refuses_a_non_differentiable_oracle(model: SourceModel,
                                                      data: TargetDataset) -> None:
    oracle = LocalOracle(model, output="label")
    with pytest.raises(EstimatorError, match="differentiable"):
        fit(_cfg(estimator="autograd"), oracle, data)
    assert oracle.images_used == 0


# ----------------------------------------------------------------------------- budget
def test_budget_stops_cleanly_and_test_is_counted_apart(model: SourceModel,
                                                        data: TargetDataset) -> None:
    budget = 1500
    cfg = _cfg(estimator="rgf", epochs=None, budget=budget, eval_every=5)
    oracle = _spy(model, cfg, data)
    result = fit(cfg, oracle, data)
    per_step = 5 * 16  # (q + 1) candidates x batch
    assert result.stop_reason == "budget"
    assert result.steps > 5
    train_val = sum(r["train"] + r["val"] for r in oracle.log)
    assert train_val == result.queries["images"] <= budget
    assert budget - result.queries["images"] < per_step + 30  # cannot pay another step + val
    assert result.queries["test_images"] == 50 == sum(r["test"] for r in oracle.log)
    assert oracle.images_used == train_val + 50
    assert oracle.budget == budget  # lifted for the test split only


@pytest.mark.parametrize("oracle_budget", [700, 100])
def test_oracle_budget_stops_an_epoch_fit(model: SourceModel, data: TargetDataset,
                                          oracle_budget: int) -> None:
    """The oracle's own budget binds first: the fit returns what it learned so far."""
    cfg = _cfg(estimator="spsa", optimizer="spsa-gc", epochs=50)
    oracle = _spy(model, cfg, data, budget=oracle_budget)
    result = fit(cfg, oracle, data)
    assert result.stop_reason == "budget"
    spent = sum(r["train"] + r["val"] for r in oracle.log)
    assert spent == result.queries["images"] <= oracle_budget
    if oracle_budget == 100:  # not even the label-map fit (120 images) could be paid
        assert result.steps == 0
    else:
        assert result.steps >= 1
        assert oracle_budget - spent < 3 * 16 + 30
    assert result.queries["test_images"] == 50 and result.test_accuracy is not None


# ----------------------------------------------------------------------------- selection
def test_validation_selects_the_prompt_and_test_runs_once_at_the_end(
    model: SourceModel, data: TargetDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    evals: list[tuple[int, float, dict[str, torch.Tensor]]] = []
    original = Fitter._evaluate

    def spy_evaluate(self: Fitter, loss: float | None) -> dict[str, Any]:
        row = original(self, loss)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        evals.append((row["step"], row["val_accuracy"], state))
        return row

    monkeypatch.setattr(Fitter, "_evaluate", spy_evaluate)
    cfg = _cfg(estimator="rgf", epochs=4, eval_every=2, lr=1.0, optimizer="sgd")
    oracle = _spy(model, cfg, data)
    result = fit(cfg, oracle, data)

    accs = [acc for _, acc, _ in evals]
    best = accs.index(max(accs))  # the first of the best
    assert best != len(accs) - 1, "the test needs a fit whose last evaluation is not the best"
    step, acc, state = evals[best]
    assert result.best_val_accuracy == acc and result.best_step == step
    assert result.prompt.metrics["val_accuracy"] == acc
    for name, value in state.items():
        assert torch.equal(result.prompt.tensors[name], value), name
        assert torch.equal(result.model.state_dict()[name], value), name
    assert not torch.equal(evals[-1][2]["program.theta"], state["program.theta"])

    # test images: each exactly once, all after the last training or validation query
    first_test = next(i for i, r in enumerate(oracle.log) if r["test"])
    assert all(r["test"] == 0 for r in oracle.log[:first_test])
    assert all(r["train"] == 0 and r["val"] == 0 for r in oracle.log[first_test:])
    assert len(oracle.test_seen) == len(set(oracle.test_seen)) == 50
    # the reported test accuracy is the selected model's
    _, val, test = data.split(cfg.val_fraction, cfg.test_fraction, cfg.seed)
    fresh = LocalOracle(model)
    assert result.model.accuracy(test.images, test.labels, fresh) == result.test_accuracy
    assert result.model.accuracy(val.images, val.labels, fresh) == acc


# ----------------------------------------------------------------------------- resume
class Killed(Exception):
    pass


def _kill_at(step: int) -> fit_module.Callback:
    def callback(row: dict[str, Any]) -> None:
        if row["step"] == step:
            raise Killed(f"killed after step {step}")

    return callback


def _final_state(path: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v for k, v in ck["model"].items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


RESUME_CASES = {
    # name: (config overrides, step to kill at)
    "autograd": ({"estimator": "autograd", "inner_size": 16, "resolution": None}, 12),
    "autograd-replay": ({"estimator": "autograd", "inner_size": 16, "resolution": None}, 14),
    "rgf": ({"estimator": "rgf", "antithetic": True}, 8),
    "spsa-gc": ({"estimator": "spsa", "optimizer": "spsa-gc", "spsa_draws": 2}, 12),
    "iterative": ({"estimator": "rgf", "labelmap": "iterative", "optimizer": "sgd",
                   "epochs": 3}, 12),
    "linear": ({"estimator": "spsa", "labelmap": "linear", "labelmap_lr": 0.05}, 4),
    "cma": ({"estimator": "cma", "optimizer": "cma", "labelmap": "linear", "cma_popsize": 6,
             "cma_sigma": 0.3}, 6),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_killed_and_resumed_fit_equals_an_uninterrupted_one(
    model: SourceModel, data: TargetDataset, tmp_path: Path, case: str
) -> None:
    overrides, kill = RESUME_CASES[case]
    every = 4
    whole_cfg = _cfg(**overrides, checkpoint=str(tmp_path / "whole.pt"), checkpoint_every=every)
    whole = fit(whole_cfg, LocalOracle(model), data)

    cfg = dataclasses.replace(whole_cfg, checkpoint=str(tmp_path / "run.pt"))
    with pytest.raises(Killed):
        fit(cfg, LocalOracle(model), data, callback=_kill_at(kill))
    at_kill = _final_state(tmp_path / "run.pt")
    last_checkpoint = kill - kill % every

    steps: list[int] = []
    resumed = fit(cfg, LocalOracle(model), data, resume=True,
                  callback=lambda row: steps.append(row["step"]))
    assert steps[0] == last_checkpoint + 1 and steps[-1] == whole.steps  # really resumed

    end_whole, end_resumed = _final_state(tmp_path / "whole.pt"), _final_state(tmp_path / "run.pt")
    assert _max_diff(end_whole, end_resumed) < 1e-6
    assert _max_diff(at_kill, end_resumed) > 1e-3  # training went on after the checkpoint
    assert _max_diff(whole.prompt.tensors, resumed.prompt.tensors) < 1e-6
    assert resumed.steps == whole.steps and resumed.best_step == whole.best_step
    assert resumed.history == whole.history
    assert resumed.queries == whole.queries
    assert resumed.test_accuracy == whole.test_accuracy


def test_resume_with_other_settings_is_refused(model: SourceModel, data: TargetDataset,
                                               tmp_path: Path) -> None:
    cfg = _cfg(estimator="rgf", checkpoint=str(tmp_path / "run.pt"), checkpoint_every=2)
    with pytest.raises(Killed):
        fit(cfg, LocalOracle(model), data, callback=_kill_at(2))
    for change in ({"lr": 0.2}, {"seed": 4}, {"estimator": "spsa"}, {"q": 5}):
        oracle = LocalOracle(model)
        with pytest.raises(ConfigError, match=f"other settings.*{next(iter(change))}"):
            fit(dataclasses.replace(cfg, **change), oracle, data, resume=True)
        assert oracle.images_used == 0
    # the checkpoint path itself may move
    moved = tmp_path / "moved.pt"
    (tmp_path / "run.pt").rename(moved)
    result = fit(dataclasses.replace(cfg, checkpoint=str(moved)), LocalOracle(model), data,
                 resume=True)
    assert result.steps == 16
    with pytest.raises(ConfigError, match="checkpoint path"):
        fit(dataclasses.replace(cfg, checkpoint=None), LocalOracle(model), data, resume=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        fit(dataclasses.replace(cfg, checkpoint=str(tmp_path / "junk.pt")), LocalOracle(model),
            data, resume=True)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="expected a checkpoint written by"):
        fit(dataclasses.replace(cfg, checkpoint=str(tmp_path / "other.pt")), LocalOracle(model),
            data, resume=True)


@pytest.mark.parametrize(("labelmap", "eval_every", "budget", "batch_size"), [
    ("frequency", 5, 3000, 16),
    ("iterative", 5, 3000, 16),  # the label-map re-fit at every epoch is paid for
    ("frequency", None, 4100, 15),  # about 25 evaluations: never more than planned
])
def test_budget_plan_matches_the_steps_taken(model: SourceModel, data: TargetDataset,
                                             labelmap: str, eval_every: int | None,
                                             budget: int, batch_size: int) -> None:
    """The planned step count (the cosine schedule's length) is what the budget pays for."""
    cfg = _cfg(estimator="rgf", labelmap=labelmap, epochs=None, budget=budget,
               eval_every=eval_every, batch_size=batch_size)
    fitter = Fitter(cfg, LocalOracle(model), data)
    planned, n_val = fitter.total_steps, len(fitter.val)
    result = fit(cfg, LocalOracle(model), data)
    assert result.queries["images"] <= budget
    assert result.steps == planned > 16  # more than two epochs, so iterative re-fits
    if eval_every is None:  # at most 25 validations after the initial one, ~10% of the budget
        assert 2 <= len(result.history) <= 26
        assert (len(result.history) - 2) * n_val <= 0.1 * budget


def test_a_checkpoint_saved_before_a_field_existed_resumes(model: SourceModel,
                                                           data: TargetDataset,
                                                           tmp_path: Path) -> None:
    """A checkpoint written by an older release lacks the fields added since (here `tokens`):
    they ran as their defaults, so it resumes; a changed value is still refused."""
    cfg = _cfg(estimator="rgf", checkpoint=str(tmp_path / "run.pt"), checkpoint_every=2)
    with pytest.raises(Killed):
        fit(cfg, LocalOracle(model), data, callback=_kill_at(2))
    ck = torch.load(str(tmp_path / "run.pt"), map_location="cpu", weights_only=True)
    del ck["config"]["tokens"]
    torch.save(ck, str(tmp_path / "run.pt"))
    with pytest.raises(ConfigError, match=r"other settings \(lr\)"):
        fit(dataclasses.replace(cfg, lr=0.2), LocalOracle(model), data, resume=True)
    assert fit(cfg, LocalOracle(model), data, resume=True).steps == 16
