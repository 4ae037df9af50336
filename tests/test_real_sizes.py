"""Real sizes: programs and coarse grids scale with the frame (224 px, non-square), the target
image is placed by the documented policy, and AutoVP's input-scaling search picks the inner
size on validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reprogram.config import recommended_config
from reprogram.data import load_digits
from reprogram.errors import ConfigError
from reprogram.fit import fit
from reprogram.oracles import LocalOracle
from reprogram.programs import ProgramSpec, build_program, grid_shape
from reprogram.scaling import scaled_inner, search_scale
from reprogram.zoo.loaders import load_path
from reprogram.zoo.registry import SourceModel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def test_coarse_grids_keep_the_frame_aspect() -> None:
    assert grid_shape(8, (32, 32)) == (8, 8)
    assert grid_shape(8, (224, 224)) == (8, 8)
    assert grid_shape(8, (24, 40)) == (8, 13) and grid_shape(8, (40, 24)) == (13, 8)
    assert grid_shape(8, (224, 320)) == (8, 11)
    assert grid_shape(4, (4, 200)) == (4, 200)  # never more cells than pixels
    spec = ProgramSpec(kind="full", frame_size=(24, 40), inner_size=24, resolution=8)
    assert spec.theta_shape == (3, 8, 13)


@pytest.mark.parametrize("kind", ["pad", "full"])
def test_placement_on_a_non_square_frame_is_centred(kind: str) -> None:
    spec = ProgramSpec(kind=kind, frame_size=(25, 40), inner_size=10, resolution=4)  # type: ignore[arg-type]
    program = build_program(spec, seed=0)
    white = torch.full((2, 1, 7, 5), 255, dtype=torch.uint8)  # any size, grey or RGB
    with torch.no_grad():
        out = program.render(white)
    assert tuple(out.shape) == (2, 3, 25, 40)
    # the image sits at top = (25 - 10) // 2 = 7, left = (40 - 10) // 2 = 15
    inside = out[:, :, 7:17, 15:25]
    if kind == "pad":
        assert bool((inside == 1).all())
        assert not bool((out[:, :, 7:17, 14] == 1).all())  # the column left of it is program
    else:  # an all-zero overlay on a black frame: the image alone
        assert bool((inside == 1).all()) and float(out.sum()) == float(inside.sum())


def test_default_sizes_are_fractions_of_the_frame() -> None:
    cfg = recommended_config("rgf", budget=1000, program="patch")
    assert cfg.program_spec((224, 224)).patch_size == 56
    assert cfg.program_spec((32, 32)).patch_size == 8
    assert recommended_config("autograd", budget=1000).program_spec((224, 300)).inner_size == 112


def test_autovp_scales() -> None:
    assert [scaled_inner("pad", (32, 32), s) for s in (0.5, 1.0, 1.5)] == [9, 18, 27]
    assert [scaled_inner("full", (224, 224), s) for s in (0.5, 1.0, 1.5)] == [64, 128, 192]
    assert scaled_inner("pad", (32, 32), 4.0) == 30 and scaled_inner("full", (32, 32), 4.0) == 32
    with pytest.raises(ConfigError, match="or full program"):
        scaled_inner("patch", (32, 32), 1.0)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory, model: SourceModel) -> SourceModel:
    """The default network (global pooling: any size runs) exported at 24 x 40."""
    folder = tmp_path_factory.mktemp("wide")
    traced = torch.jit.trace(model.module.eval(), torch.rand(2, 3, 24, 40))
    traced.save(str(folder / "model.pt"))
    (folder / "config.json").write_text(json.dumps(
        {"format": "torchscript", "input_size": [24, 40],
         "class_names": list(model.meta.class_names)}))
    return load_path(folder)


@pytest.mark.parametrize(("estimator", "program"), [("rgf", "full"), ("autograd", "pad")])
def test_fits_end_to_end_on_a_non_square_frame(wide_model: SourceModel, estimator: str,
                                               program: str) -> None:
    cfg = recommended_config(estimator, budget=3000, program=program, seed=0)
    result = fit(cfg, LocalOracle(wide_model), load_digits())
    assert result.prompt.program.frame_size == (24, 40)
    assert result.test_accuracy is not None and result.queries["images"] <= 3000
    if estimator == "rgf":
        assert tuple(result.model.program.theta.shape) == (3, 8, 13)


def test_scale_search_picks_the_best_validation_and_spends_within_budget(
        model: SourceModel) -> None:
    oracle = LocalOracle(model)
    cfg = recommended_config("rgf", budget=12000, seed=0)
    chosen, trials = search_scale(cfg, oracle, load_digits())
    assert [t.inner_size for t in trials] == [9, 18, 27]
    best = max(trials, key=lambda t: (t.val_accuracy, -t.inner_size))
    assert chosen.inner_size == best.inner_size
    spent = sum(t.queries for t in trials)
    assert spent == oracle.images_used <= 0.3 * 12000
    assert chosen.budget == 12000 - spent
    result = fit(chosen, oracle, load_digits())
    assert result.queries["images"] <= 12000  # the search and the fit, one budget
    assert result.queries["test_images"] == 450  # the test split once, after the search


def test_cli_scale_errors_are_one_line(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from reprogram.cli import main

    base = ["fit", "--data", "digits", "--budget", "3000", "--out", str(tmp_path / "p.st")]
    for extra, match in ((["--scale", "auto", "--inner-size", "10"], "got both"),
                         (["--scale", "big"], "auto or a number"),
                         (["--scale", "auto", "--program", "patch"], "or full program")):
        assert main([*base, *extra]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
