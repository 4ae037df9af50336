"""Tests for reprogram.programs: geometry, ranges, coarse upsampling, specs, input transform."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reprogram.errors import ConfigError, DataError
from reprogram.programs import InputTransform, Program, ProgramSpec, build_program


def _spec(**kw: object) -> ProgramSpec:
    base: dict[str, object] = {"kind": "expand", "frame_size": (32, 32), "inner_size": 24}
    base.update(kw)
    return ProgramSpec(**base)  # type: ignore[arg-type]


SPECS = [
    _spec(),
    _spec(resolution=8),
    _spec(kind="patch", inner_size=32, patch_size=8),
    _spec(kind="patch", inner_size=20, patch_size=8, resolution=4),
    _spec(kind="full"),
    _spec(kind="full", mask="border", resolution=8),
    _spec(frame_size=(28, 36), inner_size=20, resolution=4),
    _spec(kind="add-pad", inner_size=32, patch_size=4),
    _spec(kind="add-pad", inner_size=32, patch_size=4, resolution=8),
    _spec(kind="add-patch", inner_size=32, patch_size=8),
    _spec(kind="add-patch", inner_size=32, patch_size=8, resolution=4),
    _spec(kind="mask", inner_size=16),
    _spec(kind="mask", inner_size=16, resolution=8),
]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.resolution}-{s.mask}")
def test_shapes_and_range_for_extreme_theta(spec: ProgramSpec) -> None:
    program = build_program(spec, seed=1)
    x = _images(5, spec.inner_size)
    h, w = spec.frame_size
    for value in (-100.0, 100.0):
        with torch.no_grad():
            program.theta.fill_(value)
        out = program(x).detach()
        assert out.shape == (5, 3, h, w)
        assert out.dtype == torch.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert program.delta().shape == (3, h, w)


def test_theta_shape_and_dimension() -> None:
    assert build_program(_spec(resolution=8)).theta.numel() == 192
    assert build_program(_spec()).theta_shape == (3, 32, 32)
    assert build_program(_spec(kind="patch", inner_size=32, patch_size=6)).theta_shape == (3, 6, 6)
    params = list(build_program(_spec(resolution=8)).named_parameters())
    assert [name for name, _ in params] == ["theta"]


def test_pad_inside_is_image_and_border_is_sigmoid_theta() -> None:
    program = build_program(_spec(init_std=1.0), seed=3)
    x = _images(4, 24)
    out = program(x)
    top = left = 4
    assert torch.equal(out[:, :, top : top + 24, left : left + 24], x)
    expected = torch.sigmoid(program.theta.detach())
    border = torch.ones(32, 32, dtype=torch.bool)
    border[top : top + 24, left : left + 24] = False
    for i in range(4):
        assert torch.allclose(out[i][:, border], expected[:, border])
    assert torch.allclose(program.delta()[:, border], expected[:, border])
    assert float(program.delta()[:, ~border].abs().max()) == 0.0


def test_coarse_resolution_bilinear_upsampling_by_hand() -> None:
    # Frame 8x8, R = 4 (scale 2); theta varies along the width only.
    program = build_program(_spec(frame_size=(8, 8), inner_size=4, resolution=4))
    v = torch.tensor([0.0, 1.0, 3.0, -2.0])
    with torch.no_grad():
        program.theta.copy_(v.view(1, 1, 4).expand(3, 4, 4))
    row0 = program(torch.zeros(1, 3, 4, 4))[0, :, 0, :]
    # align_corners=False, scale 2: output i samples source (i + 0.5) / 2 - 0.5 (edge-clamped).
    up = torch.tensor(
        [
            v[0],
            0.75 * v[0] + 0.25 * v[1],
            0.25 * v[0] + 0.75 * v[1],
            0.75 * v[1] + 0.25 * v[2],
            0.25 * v[1] + 0.75 * v[2],
            0.75 * v[2] + 0.25 * v[3],
            0.25 * v[2] + 0.75 * v[3],
            v[3],
        ]
    )
    assert torch.allclose(row0, torch.sigmoid(up).expand(3, 8), atol=1e-6)


def test_constant_coarse_theta_gives_constant_border() -> None:
    program = build_program(_spec(resolution=1))
    with torch.no_grad():
        program.theta.copy_(torch.tensor([-1.0, 0.0, 2.0]).view(3, 1, 1))
    out = program(_images(1, 24))[0]
    assert torch.allclose(out[:, 0, :], torch.sigmoid(torch.tensor([-1.0, 0.0, 2.0]))[:, None])


def test_patch_replaces_top_left_corner_only() -> None:
    program = build_program(_spec(kind="patch", inner_size=32, patch_size=5, init_std=1.0))
    x = _images(2, 32)
    out = program(x)
    assert torch.allclose(
        out[:, :, :5, :5], torch.sigmoid(program.theta.detach())[None].expand(2, -1, -1, -1)
    )
    keep = torch.ones(32, 32, dtype=torch.bool)
    keep[:5, :5] = False
    assert torch.equal(out[:, :, keep], x[:, :, keep])


@pytest.mark.parametrize("mask", ["none", "border"])
def test_full_overlay_is_elsayed(mask: str) -> None:
    program = build_program(_spec(kind="full", mask=mask, init_std=0.5), seed=2)
    x = _images(3, 24)
    out = program(x)
    embed = torch.zeros(3, 3, 32, 32)
    embed[:, :, 4:28, 4:28] = x
    m = torch.ones(32, 32)
    if mask == "border":
        m[4:28, 4:28] = 0.0
    expected = (embed + m * torch.tanh(program.theta.detach())).clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.resolution}-{s.mask}")
def test_apply_matches_forward_per_candidate(spec: ProgramSpec) -> None:
    program = build_program(spec)
    x = _images(3, spec.inner_size, seed=5)
    gen = torch.Generator().manual_seed(7)
    thetas = torch.randn(4, *program.theta_shape, generator=gen)
    batch = program.apply(x, thetas)
    assert batch.shape == (4, 3, 3, *spec.frame_size)
    for p in range(4):
        with torch.no_grad():
            program.theta.copy_(thetas[p])
        assert torch.allclose(batch[p], program(x), atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.resolution}-{s.mask}")
def test_gradient_flows_to_theta_and_thetas(spec: ProgramSpec) -> None:
    program = build_program(spec, seed=0)
    x = _images(2, spec.inner_size)
    weights = torch.randn(2, 3, *spec.frame_size, generator=torch.Generator().manual_seed(1))
    (program(x) * weights).sum().backward()
    assert program.theta.grad is not None and float(program.theta.grad.abs().sum()) > 0
    thetas = torch.zeros(2, *program.theta_shape, requires_grad=True)
    program.apply(x, thetas).sum().backward()
    assert thetas.grad is not None and float(thetas.grad.abs().sum()) > 0


def test_module_apply_with_function_still_works() -> None:
    program = build_program(_spec(resolution=8))
    seen: list[str] = []
    nn.Sequential(program).apply(lambda m: seen.append(type(m).__name__))
    assert "Program" in seen


def test_build_is_seeded() -> None:
    a = build_program(_spec(init_std=0.1), seed=4).theta
    b = build_program(_spec(init_std=0.1), seed=4).theta
    c = build_program(_spec(init_std=0.1), seed=5).theta
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(build_program(_spec()).theta.detach().abs().max()) == 0.0


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.resolution}-{s.mask}")
def test_spec_dict_round_trip(spec: ProgramSpec) -> None:
    d = json.loads(json.dumps(spec.to_dict()))
    assert ProgramSpec.from_dict(d) == spec


@pytest.mark.parametrize(
    "bad",
    [
        {"inner_size": 32},  # pad needs a border
        {"inner_size": 40, "kind": "full"},
        {"kind": "ring"},
        {"frame_size": (32,)},
        {"resolution": 0},
        {"resolution": 64},
        {"mask": "border"},  # only for full
        {"kind": "patch", "patch_size": 40},
        {"kind": "add-patch", "patch_size": 40, "inner_size": 32},
        {"kind": "add-pad", "patch_size": 17, "inner_size": 32},  # border wider than half
        {"kind": "mask", "inner_size": 32},  # mask needs a border
        {"kind": "mask", "mask": "border"},  # the mask kind's mask is implied
        {"init_std": -1.0},
        {"inner_size": 2.5},
        {"inner_size": True},
    ],
)
def test_bad_specs_raise_config_error(bad: dict[str, object]) -> None:
    d = _spec().to_dict() | bad
    with pytest.raises(ConfigError):
        ProgramSpec.from_dict(d)


def test_from_dict_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(ConfigError, match="expected"):
        ProgramSpec.from_dict(_spec().to_dict() | {"colour": "red"})
    with pytest.raises(ConfigError):
        ProgramSpec.from_dict({"kind": "pad", "frame_size": [32, 32]})


def test_program_rejects_wrong_input_shapes() -> None:
    program = build_program(_spec(resolution=8))
    with pytest.raises(DataError):
        program(torch.rand(2, 3, 32, 32))
    with pytest.raises(DataError):
        program.apply(torch.rand(2, 3, 24, 24), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ConfigError):
        Program(_spec(resolution=8), torch.zeros(3, 4, 4))


def test_input_transform_uint8_grayscale() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=gen)
    out = InputTransform(16)(x)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    expected = F.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(out[:, :1], expected, atol=1e-6)
    same = InputTransform(inner_size=8)(x)
    assert torch.equal(same[:, 0:1], x.float() / 255)


def test_input_transform_downsampling_is_antialiased() -> None:
    # A 1-pixel checkerboard averages to ~0.5 with antialiasing; plain bilinear aliases.
    board = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float()
    out = InputTransform(inner_size=8)(board.expand(1, 3, 64, 64))
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=0.05)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_input_transform_rejects_bad_images() -> None:
    t = InputTransform(inner_size=8)
    with pytest.raises(DataError):
        t(torch.rand(2, 4, 8, 8))
    with pytest.raises(DataError):
        t(torch.rand(2, 3, 8, 8) * 255)
    with pytest.raises(DataError):
        t(torch.rand(3, 8, 8))
    with pytest.raises(ConfigError):
        InputTransform(inner_size=0)


def test_render_from_raw_uint8() -> None:
    spec = _spec(resolution=8)
    program = build_program(spec)
    raw = torch.full((2, 1, 10, 10), 255, dtype=torch.uint8)
    out = program.render(raw)
    assert torch.allclose(out[:, :, 4:28, 4:28], torch.ones(2, 3, 24, 24))


# ----------------------------------------------------------------------------- named kinds
def test_pad_is_a_deprecated_alias_of_expand() -> None:
    old = ProgramSpec(kind="pad", frame_size=(32, 32), inner_size=24)  # type: ignore[arg-type]
    assert old.kind == "expand" and old == _spec(kind="expand")
    assert ProgramSpec.from_dict(old.to_dict() | {"kind": "pad"}) == old
    assert old.to_dict()["kind"] == "expand"


def test_add_pad_adds_theta_on_a_border_of_the_full_size_image() -> None:
    """Bahng et al.'s padding prompt: ``x + theta * M`` on the whole image, ``M`` a border of
    ``patch_size`` pixels, clipped to the pixel range."""
    program = build_program(_spec(kind="add-pad", inner_size=32, patch_size=4), seed=0)
    theta = 0.2 * torch.randn(program.theta_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        program.theta.copy_(theta)
    x = _images(2, 32, seed=3)
    out = program(x)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[4:28, 4:28] = False
    torch.testing.assert_close(out[:, :, ~border], x[:, :, ~border])
    torch.testing.assert_close(out[:, :, border], (x + theta)[:, :, border].clamp(0, 1))


def test_add_patch_adds_theta_on_the_top_left_square() -> None:
    program = build_program(_spec(kind="add-patch", inner_size=32, patch_size=8), seed=0)
    theta = 0.2 * torch.randn(program.theta_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        program.theta.copy_(theta)
    x = _images(2, 32, seed=3)
    out = program(x)
    expected = x.clone()
    expected[:, :, :8, :8] = (x[:, :, :8, :8] + theta).clamp(0, 1)
    torch.testing.assert_close(out, expected)


def test_mask_is_elsayed_tanh_border_around_the_native_size_image() -> None:
    """``X~ + tanh(W * M)`` in the paper's [-1, 1] range, mapped to [0, 1] pixels: the image
    inside, ``(1 + tanh(W)) / 2`` outside; ``W`` inside the mask changes nothing."""
    program = build_program(_spec(kind="mask", inner_size=16), seed=0)
    theta = 2.0 * torch.randn(program.theta_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        program.theta.copy_(theta)
    x = _images(2, 16, seed=3)
    out = program(x)
    x_paper = F.pad(2 * x - 1, (8, 8, 8, 8))  # embedded in zeros of the [-1, 1] range
    m = torch.ones(32, 32)
    m[8:24, 8:24] = 0
    torch.testing.assert_close(out, (x_paper + torch.tanh(theta * m) + 1) / 2)
    with torch.no_grad():
        program.theta[:, 8:24, 8:24] += 5.0
    torch.testing.assert_close(program(x), out)
