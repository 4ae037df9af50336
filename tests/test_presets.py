"""The anchor presets: every value pinned as the papers' code sets it, and each one runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from reprogram.config import FitConfig
from reprogram.context import CONTEXT_KINDS
from reprogram.data import load_dataset
from reprogram.errors import ConfigError
from reprogram.fit import Fitter
from reprogram.oracles import LocalOracle
from reprogram.presets import CLIP_STD, METHOD_FIELDS, PRESETS, Preset, preset_config
from reprogram.zoo.registry import load_model

S = (0.26862954 + 0.26130258 + 0.27577711) / 3  # CLIP's mean channel std

# the values that make each method what it is, typed out again from the sources (a change to
# a preset has to change this table too)
PINNED = {
    "bar-code": {"program": "mask", "inner_size": "native", "estimator": "rgf", "q": 1,
                 "mu": 0.1, "antithetic": False, "labelmap": "frequency",
                 "labelmap_score": "top-prob", "sources_per_target": 6,
                 "loss": {"kind": "focal-bar", "gamma": 4.0, "alpha": 0.8},
                 "optimizer": "adam", "lr": 0.01, "schedule": {"kind": "constant"},
                 "batch_size": 10, "init_std": 0.0, "weight_penalty": 0.0},
    "bar-port": {"program": "expand", "inner_ratio": 64 / 224, "init_std": 1.0,
                 "estimator": "rgf", "q": 5, "mu": 0.01, "labelmap": "frequency",
                 "loss": {"kind": "focal", "gamma": 2.0, "alpha": 0.8}, "optimizer": "sgd",
                 "momentum": 0.0, "lr": 10.0,
                 "schedule": {"kind": "poly", "lr_min": 0.1, "power": 0.9},
                 "batch_size": 128},
    "blackvip": {"program": "coordinator", "coordinator_encoder": "default",
                 "coordinator_eps": S, "estimator": "spsa", "spsa_c": 0.005,
                 "spsa_gamma": 0.2, "spsa_draws": 5, "spsa_query_theta": False,
                 "optimizer": "spsa-gc", "lr": 0.01, "spsa_alpha": 0.4, "spsa_o": 1.0,
                 "momentum": 0.9, "labelmap": "frequency", "batch_size": 128,
                 "loss": {"kind": "ce", "gamma": 2.0, "alpha": 0.8}},
    "blackvip-vp": {"program": "add-pad", "patch_ratio": 30 / 224, "init_std": S,
                    "estimator": "spsa", "spsa_c": 0.01 * S, "spsa_gamma": 0.1,
                    "spsa_draws": 5, "spsa_query_theta": False, "optimizer": "spsa-gc",
                    "lr": 40.0 * S * S, "spsa_alpha": 0.5, "spsa_o": 1.0, "momentum": 0.9,
                    "labelmap": "frequency", "batch_size": 128,
                    "loss": {"kind": "ce", "gamma": 2.0, "alpha": 0.8}},
    "elsayed": {"program": "mask", "inner_size": "native", "estimator": "autograd",
                "labelmap": "first", "weight_penalty": 0.05, "optimizer": "adam", "lr": 0.05,
                "schedule": {"kind": "exponential", "gamma": 0.96, "decay_epochs": 2},
                "batch_size": 50},
    "bahng-pad": {"program": "add-pad", "patch_ratio": 30 / 224, "init_std": S,
                  "estimator": "autograd", "labelmap": "first", "optimizer": "sgd",
                  "lr": 40.0 * S * S, "momentum": 0.9,
                  "schedule": {"kind": "warmup-cosine", "warmup_steps": 1000},
                  "batch_size": 256},
    "bahng-patch": {"program": "add-patch", "patch_ratio": 30 / 224, "init_std": S,
                    "estimator": "autograd", "labelmap": "first", "optimizer": "sgd",
                    "lr": 40.0 * S * S, "momentum": 0.9,
                    "schedule": {"kind": "warmup-cosine", "warmup_steps": 1000},
                    "batch_size": 256},
    "ilm-vp": {"program": "expand", "inner_size": "native", "init_std": 0.0,
               "estimator": "autograd", "labelmap": "iterative", "optimizer": "adam",
               "lr": 0.01,
               "schedule": {"kind": "multistep", "milestones": (0.5, 0.72), "gamma": 0.1},
               "batch_size": 128},
    "bpt-vlm": {"program": "coop", "tokens": 8, "estimator": "cma", "cma_sigma": 0.86,
                "cma_popsize": 30, "optimizer": "cma", "labelmap": "first", "batch_size": 64,
                "loss": {"kind": "ce", "gamma": 2.0, "alpha": 0.8}},
}


def test_every_anchor_is_a_preset() -> None:
    assert set(PRESETS) == set(PINNED)
    assert math.isclose(CLIP_STD, S)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_preset_values_are_pinned(name: str) -> None:
    preset = PRESETS[name]
    assert set(preset.values) == METHOD_FIELDS  # every method field, none inherited
    for key, value in PINNED[name].items():
        got = preset.values[key]
        if isinstance(value, float):
            assert math.isclose(got, value, rel_tol=1e-12), (name, key, got)
        else:
            assert got == value, (name, key, got)
    # the config built from it carries the same values, nested specs included
    cfg = preset_config(name, budget=10_000, seed=0)
    for key, value in PINNED[name].items():
        got = getattr(cfg, key)
        if isinstance(value, dict):
            for sub, v in value.items():
                assert getattr(got, sub) == v, (name, key, sub)
        elif isinstance(value, float):
            assert math.isclose(got, value, rel_tol=1e-12)
        else:
            assert got == value


@pytest.mark.parametrize("name", sorted(PINNED))
def test_every_preset_names_its_sources(name: str) -> None:
    preset = PRESETS[name]
    assert preset.title and preset.sources
    assert set(preset.sources) <= METHOD_FIELDS
    # each value that differs from ours is traced to a line of the paper or its code
    ours = FitConfig(estimator="rgf", program="full", budget=1).to_dict()
    differing = {k for k in PINNED[name] if k != "loss" and ours.get(k) != PINNED[name][k]}
    untraced = sorted(differing - set(preset.sources))
    assert not untraced, f"{name}: no source for {untraced}"


def test_a_preset_must_spell_out_every_field() -> None:
    values = dict(PRESETS["ilm-vp"].values)
    del values["lr"]
    with pytest.raises(ConfigError, match="missing \\['lr'\\]"):
        Preset("broken", "broken", values, {})
    with pytest.raises(ConfigError, match="expected a preset among"):
        preset_config("bar", budget=1)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_every_preset_sets_up_a_fit_on_the_default_model(name: str) -> None:
    # the default model has 10 classes: BAR's 6 sources per target do not fit, 1 does;
    # context vectors need a vision-language model, whose classes are the target's
    run = {"sources_per_target": 1} if name == "bar-code" else {}
    cfg = preset_config(name, budget=200_000, seed=0, **run)
    model = load_model("shapes-clip" if cfg.program in CONTEXT_KINDS else "default")
    oracle = LocalOracle(model, output="probs", wire="uint8")
    data = load_dataset("digits", seed=0)
    if oracle.zero_shot:
        oracle.use_labels(tuple(data.class_names))
    fitter = Fitter(cfg, oracle, data)
    spec = fitter.model.program.spec
    if PINNED[name].get("inner_size") == "native":
        assert spec.inner_size == 8  # digits are 8x8
    if "patch_ratio" in PINNED[name]:
        assert spec.patch_size == round(32 * 30 / 224)
    per_step = fitter.estimator.queries_per_step
    expected = {"rgf": cfg.q + 1, "spsa": 2 * cfg.spsa_draws, "autograd": 1,
                "cma": cfg.cma_popsize + 1}[cfg.estimator]
    assert per_step == expected


def test_bar_code_needs_enough_source_classes() -> None:
    cfg = preset_config("bar-code", budget=200_000)
    oracle = LocalOracle(load_model(), output="probs", wire="uint8")
    with pytest.raises(ConfigError, match="sources_per_target"):
        Fitter(cfg, oracle, load_dataset("digits", seed=0))


def test_reprogram_fit_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reprogram import cli
    from reprogram.artifact import load_prompt

    out = tmp_path / "p.safetensors"
    rc = cli.main(["fit", "--model", "default", "--data", "digits", "--preset", "ilm-vp",
                   "--budget", "4000", "--lr", "0.02", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    config = load_prompt(out).config
    assert config["labelmap"] == "iterative" and config["schedule"]["kind"] == "multistep"
    assert config["lr"] == 0.02  # an option given on the command line overrides the preset
    assert config["inner_size"] == "native" and config["batch_size"] == 128
    capsys.readouterr()
    # a white-box preset against an endpoint, or BAR's 6 sources on 10 classes: one line
    rc = cli.main(["fit", "--model", "default", "--data", "digits", "--preset", "bar-code",
                   "--budget", "4000", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "sources_per_target" in err and len(err.strip().splitlines()) == 1
