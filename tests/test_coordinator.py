"""BlackVIP's Coordinator: its geometry, its gradient, BatchNorm's two modes, its artifact."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from reprogram import coordinator as coord
from reprogram.artifact import Prompt, load_prompt, save_prompt
from reprogram.cli import main
from reprogram.config import FitConfig
from reprogram.data import load_dataset
from reprogram.errors import ConfigError, ModelError
from reprogram.fit import fit
from reprogram.oracles import LocalOracle
from reprogram.presets import preset_config
from reprogram.programs import CoordinatorProgram, ProgramSpec, build_program
from reprogram.zoo.registry import load_model


def _spec(frame: tuple[int, int] = (32, 32)) -> ProgramSpec:
    return ProgramSpec(kind="coordinator", frame_size=frame, inner_size=min(frame),
                       coordinator=coord.resolve("default", frame))


def test_blackvip_geometry_at_its_own_setting() -> None:
    # BlackVIP: a 768-wide [CLS] feature, SRC_DIM 1568 = 32 x 7 x 7, prompt 224 x 224
    assert coord.default_channels(768, (224, 224)) == 32
    spec = coord.CoordinatorSpec(encoder="x", encoder_sha256="", feature_dim=768, channels=32)
    assert spec.grid((224, 224)) == (7, 7)
    assert spec.trigger_dim((224, 224)) == 1568 - 768
    decoder = coord.Decoder(spec, (224, 224))
    z = torch.randn(2, 768)
    out = decoder(decoder.initial(0), z, decoder.buffers(), train=False)
    assert out.shape == (2, 3, 224, 224)
    # the decoder is small: about 9k parameters, as the paper reports
    assert 8_000 < decoder.dim < 10_000
    assert decoder.dim == coord.theta_dim(spec, (224, 224))


def test_initial_theta_is_blackvips_and_seeded() -> None:
    spec = _spec()
    a, b, c = (build_program(spec, seed=s).theta.detach() for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    trigger = a[: spec.coordinator.trigger_dim(spec.frame_size)]  # type: ignore[union-attr]
    assert float(trigger.min()) >= 0.0 and float(trigger.max()) <= 0.1


def test_the_prompt_depends_on_the_image_but_not_on_its_batch() -> None:
    program = build_program(_spec(), seed=0)
    x = torch.rand(6, 3, 32, 32)
    theta = program.theta.detach()[None]
    prompts = program.render_candidates(x, theta)[0] - x
    alone = program.render_candidates(x[:1], theta)[0] - x[:1]
    torch.testing.assert_close(prompts[:1], alone)  # evaluation mode: running averages
    assert float((prompts[0] - prompts[1]).abs().max()) > 1e-4  # input-dependent
    with program.fitting():  # batch statistics: the batch changes the prompt
        in_batch = program.render_candidates(x, theta)[0][:2] - x[:2]
        pair = program.render_candidates(x[:2], theta)[0] - x[:2]
    assert float((in_batch - pair).abs().max()) > 1e-5


def test_running_averages_update_only_while_fitting() -> None:
    program = build_program(_spec(), seed=0)
    x = torch.rand(4, 3, 32, 32)
    thetas = program.theta.detach()[None].repeat(3, 1)
    before = {k: v.clone() for k, v in program.state_dict().items() if k.startswith("bn_")}
    program.render_candidates(x, thetas)
    assert all(torch.equal(before[k], program.state_dict()[k]) for k in before)
    with program.fitting():
        program.render_candidates(x, thetas)
    counts = [int(v) for k, v in program.state_dict().items() if k.endswith("batches_tracked")]
    assert counts and all(c == 3 for c in counts)  # one update per candidate
    assert not torch.equal(before["bn_2_running_mean"], program.bn_2_running_mean)


def test_gradient_matches_finite_differences() -> None:
    program = build_program(_spec(), seed=0).double()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64) * 0.6 + 0.2
    weights = torch.randn(3, 3, 32, 32, dtype=torch.float64)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return (program.render_candidates(x, theta[None])[0] * weights).sum()

    theta = program.theta.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(theta), theta)
    gen = torch.Generator().manual_seed(0)
    picks = torch.randperm(theta.numel(), generator=gen)[:12].tolist()
    picks.append(0)  # a trigger entry
    h = 1e-6
    with torch.no_grad():
        for i in picks:
            e = torch.zeros_like(theta)
            e[i] = h
            fd = (loss(theta + e) - loss(theta - e)) / (2 * h)
            assert math.isclose(float(fd), float(grad[i]), rel_tol=1e-4, abs_tol=1e-7), i


def test_fit_save_load_predicts_the_same(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = preset_config("blackvip", budget=4_000, seed=0, batch_size=32)
    oracle = LocalOracle(load_model(), output="probs", wire="uint8")
    data = load_dataset("digits", seed=0)
    result = fit(cfg, oracle, data)
    assert isinstance(result.model.program, CoordinatorProgram)
    # the best-on-validation snapshot carries the running averages the fit learned
    tracked = result.prompt.tensors["program.bn_2_num_batches_tracked"]
    assert int(tracked) > 0
    path = tmp_path / "bv.safetensors"
    save_prompt(result.prompt, path)
    loaded = load_prompt(path).build()
    oracle = LocalOracle(load_model(), output="probs", wire="uint8")
    images = data.images[:20]
    want = result.model.predict_logits(images, oracle)
    got = loaded.predict_logits(images, oracle)
    torch.testing.assert_close(got, want)
    # the same prompt with another encoder's fingerprint: a one-line error, exit 1
    assert spec_of(result.prompt).coordinator is not None
    tampered = replace(result.prompt, program=replace(
        spec_of(result.prompt), coordinator=replace(spec_of(result.prompt).coordinator,
                                                    encoder_sha256="0" * 64)))
    bad = tmp_path / "other.safetensors"
    save_prompt(tampered, bad)
    code = main(["eval", "--model", "default", "--prompt", str(bad), "--data", "digits"])
    err = capsys.readouterr().err
    assert code != 0 and "another encoder" in err and "Traceback" not in err


def spec_of(prompt: Prompt) -> ProgramSpec:
    return prompt.program


def test_a_prompt_refuses_another_encoder() -> None:
    spec = _spec()
    other = coord.CoordinatorSpec(**{**spec.coordinator.to_dict(),  # type: ignore[union-attr]
                                     "encoder_sha256": "0" * 64})
    with pytest.raises(ModelError, match="learned with another encoder"):
        build_program(ProgramSpec(kind="coordinator", frame_size=(32, 32), inner_size=32,
                                  coordinator=other))


def test_bad_specs_say_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match="expected a coordinator spec"):
        ProgramSpec(kind="coordinator", frame_size=(32, 32), inner_size=32)
    with pytest.raises(ConfigError, match="expected no coordinator"):
        ProgramSpec(kind="expand", frame_size=(32, 32), inner_size=16,
                    coordinator=_spec().coordinator)
    with pytest.raises(ConfigError, match="channels dividing 64"):
        coord.CoordinatorSpec(encoder="default", encoder_sha256="", feature_dim=8, channels=48)
    with pytest.raises(ConfigError, match="raise channels"):
        coord.CoordinatorSpec(encoder="d", encoder_sha256="", feature_dim=96,
                              channels=32).check_frame((32, 32))
    with pytest.raises(ModelError, match="final linear layer"):
        coord.encoder_features(nn.Sequential(nn.Conv2d(3, 3, 1)), torch.rand(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="coordinator_encoder"):
        FitConfig(program="coordinator", coordinator_encoder="", budget=1)


def test_spec_round_trips_through_json() -> None:
    spec = _spec()
    again = ProgramSpec.from_dict(spec.to_dict())
    assert again == spec
    # the other kinds' records are unchanged (no coordinator key)
    assert "coordinator" not in ProgramSpec(kind="full", frame_size=(32, 32),
                                            inner_size=32).to_dict()
