"""Tests for reprogram.oracles: output kinds, 8-bit wire, budgets and counting, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reprogram.errors import BudgetExhausted, ConfigError, DataError
from reprogram.oracles import LocalOracle, parse_output_kind, quantize_uint8, reduce_scores
from reprogram.zoo.registry import SourceModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- output kinds
def test_parse_output_kind() -> None:
    assert parse_output_kind("probs") == ("probs", 0)
    assert parse_output_kind("logits") == ("logits", 0)
    assert parse_output_kind("label") == ("label", 0)
    assert parse_output_kind("topk:3") == ("topk", 3)
    for bad in ("topk", "topk:0", "topk:-1", "topk:x", "top3", "", "PROBS"):
        with pytest.raises(ConfigError, match="output kind"):
            parse_output_kind(bad)


def test_reduce_scores() -> None:
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    assert reduce_scores(logits, "logits") is logits
    probs = reduce_scores(logits, "probs")
    torch.testing.assert_close(probs, F.softmax(logits, -1))
    for k in (1, 3, 10, 50):
        top = reduce_scores(logits, f"topk:{k}")
        kept = min(k, 10)
        assert ((top > 0).sum(-1) == kept).all()
        assert (top.sum(-1) <= 1 + 1e-6).all()
        # the kept entries are the largest probabilities, unchanged
        idx = probs.topk(kept, -1).indices
        torch.testing.assert_close(top.gather(-1, idx), probs.gather(-1, idx))
    label = reduce_scores(logits, "label")
    assert torch.equal(label, F.one_hot(logits.argmax(-1), 10).float())


def test_quantize_uint8_is_the_8_bit_grid_with_straight_through_gradient() -> None:
    x = torch.rand(1000, requires_grad=True)
    q = quantize_uint8(x)
    assert torch.equal(q, torch.round(x.detach() * 255) / 255)
    q.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones(1000))


# ----------------------------------------------------------------------------- LocalOracle
def test_info_and_differentiable(model: SourceModel) -> None:
    oracle = LocalOracle(model)
    info = oracle.info
    assert info.input_size == (32, 32) and info.num_classes == 10
    assert info.class_names == model.meta.class_names
    assert info.wire_dtype == "uint8" and info.output_kind == "probs"
    assert info.fingerprint["weights_sha256"] == model.meta.weights_sha256
    assert LocalOracle(model, quantize=False).info.wire_dtype == "fp32"
    expected = {"probs": True, "logits": True, "topk:3": False, "label": False}
    for kind, diff in expected.items():
        o = LocalOracle(model, output=kind)
        assert o.differentiable is diff
        assert o.info.output_kind == kind
    with pytest.raises(ConfigError):
        LocalOracle(model, output="top5")
    with pytest.raises(ConfigError, match="max_batch"):
        LocalOracle(model, max_batch=0)


def test_gradient_flows_through_the_8_bit_wire(model: SourceModel) -> None:
    x = _images(2).requires_grad_(True)
    LocalOracle(model, output="logits", quantize=True).query(x)[:, 0].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_quantization_equals_feeding_the_rounded_image(model: SourceModel) -> None:
    x = _images(8, seed=2)
    q = torch.round(x * 255) / 255
    with torch.no_grad():
        direct = model.module(q)
        float_out = model.module(x)
    got = LocalOracle(model, output="logits", quantize=True).query(x)
    assert torch.equal(got, direct)
    off = LocalOracle(model, output="logits", quantize=False).query(x)
    assert torch.equal(off, float_out)
    assert not torch.equal(direct, float_out)  # the rounding matters for this model
    # a perturbation below half a grey level vanishes on the 8-bit wire
    tiny = LocalOracle(model, output="logits").query((q + 0.4 / 255).clamp(0, 1))
    assert torch.equal(tiny, LocalOracle(model, output="logits").query(q))


def test_output_kinds_of_local_oracle(model: SourceModel) -> None:
    x = _images(5, seed=3)
    with torch.no_grad():
        logits = model.module(torch.round(x * 255) / 255)
    probs = LocalOracle(model, output="probs").query(x)
    torch.testing.assert_close(probs, F.softmax(logits, -1))
    assert torch.equal(LocalOracle(model, output="logits").query(x), logits)
    top = LocalOracle(model, output="topk:3").query(x)
    assert ((top > 0).sum(-1) == 3).all() and (top.sum(-1) <= 1 + 1e-6).all()
    assert torch.equal(top.argmax(-1), logits.argmax(-1))
    label = LocalOracle(model, output="label").query(x)
    assert torch.equal(label.sum(-1), torch.ones(5))
    assert set(label.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(label.argmax(-1), logits.argmax(-1))


def test_inputs_are_clamped(model: SourceModel) -> None:
    x = _images(3, seed=4) * 3 - 1
    oracle = LocalOracle(model, output="logits")
    assert torch.equal(oracle.query(x), oracle.query(x.clamp(0, 1)))


def test_chunking_gives_the_same_scores_and_one_request(model: SourceModel) -> None:
    x = _images(10, seed=5)
    whole = LocalOracle(model, output="logits")
    chunked = LocalOracle(model, output="logits", max_batch=3)
    torch.testing.assert_close(chunked.query(x), whole.query(x), atol=1e-5, rtol=1e-5)
    assert chunked.counts() == {"images": 10, "requests": 1}


def test_counts_images_and_requests(model: SourceModel) -> None:
    oracle = LocalOracle(model)
    assert oracle.counts() == {"images": 0, "requests": 0}
    oracle.query(_images(4))
    oracle.query(_images(3))
    assert oracle.counts() == {"images": 7, "requests": 2}
    assert oracle.remaining() is None
    empty = oracle.query(torch.zeros(0, 3, 32, 32))
    assert empty.shape == (0, 10)
    assert oracle.images_used == 7
    oracle.load_counts({"images": 100, "requests": 9})
    assert oracle.counts() == {"images": 100, "requests": 9}


def test_budget_raises_before_spending(model: SourceModel) -> None:
    oracle = LocalOracle(model, budget=10)
    oracle.query(_images(6))
    assert oracle.remaining() == 4 and oracle.can_afford(4) and not oracle.can_afford(5)
    with pytest.raises(BudgetExhausted, match="budget 10"):
        oracle.query(_images(5))
    assert oracle.counts() == {"images": 6, "requests": 1}  # nothing was spent
    oracle.query(_images(4))
    assert oracle.counts() == {"images": 10, "requests": 2} and oracle.remaining() == 0
    with pytest.raises(BudgetExhausted):
        oracle.query(_images(1))
    assert oracle.images_used == 10
    assert isinstance(BudgetExhausted("x"), RuntimeError)


def test_request_cap(model: SourceModel) -> None:
    oracle = LocalOracle(model, max_requests=2)
    oracle.query(_images(1))
    oracle.query(_images(1))
    with pytest.raises(BudgetExhausted, match="request cap 2"):
        oracle.query(_images(1))
    assert oracle.counts() == {"images": 2, "requests": 2}


def test_bad_budgets_are_config_errors(model: SourceModel) -> None:
    with pytest.raises(ConfigError, match="budget"):
        LocalOracle(model, budget=-1)
    with pytest.raises(ConfigError, match="request"):
        LocalOracle(model, max_requests=-1)


@pytest.mark.parametrize(
    "x",
    [
        torch.rand(2, 1, 32, 32),
        torch.rand(2, 3, 16, 32),
        torch.rand(2, 3, 32, 31),
        torch.rand(3, 32, 32),
        torch.rand(1, 2, 3, 32, 32),
        torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
    ],
    ids=["gray", "short", "narrow", "3d", "5d", "uint8"],
)
def test_bad_inputs_are_data_errors(model: SourceModel, x: torch.Tensor) -> None:
    oracle = LocalOracle(model, budget=100)
    with pytest.raises(DataError, match="expected"):
        oracle.query(x)
    assert oracle.counts() == {"images": 0, "requests": 0}


# ----------------------------------------------------------------------------- saturated pixels
def test_saturated_pixels_keep_their_gradient_through_the_oracle(model: SourceModel) -> None:
    """White-box ``full``: pixels exactly at 0 (black frame, ``tanh(0)``) and at 1 (a white
    image pixel) get the program's gradient, which one-sided finite differences from inside
    [0, 1] confirm."""
    from reprogram.programs import ProgramSpec, build_program

    program = build_program(ProgramSpec(kind="full", frame_size=(32, 32), inner_size=16))
    x_t = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).double()
    x_t[:, :, :4, :4] = 1.0  # saturated at the top: white image pixels, theta = 0 keeps them 1
    # a smooth model (softplus, no max-pool ties among the black border's zeros), same meta
    torch.manual_seed(0)
    smooth = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 16),
                                 torch.nn.Softplus(), torch.nn.Linear(16, 10)).double()
    oracle = LocalOracle(SourceModel(smooth, model.meta, True), output="logits",
                         quantize=False)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return oracle.query(program.apply(x_t, theta[None])[0])[:, 3].sum()

    theta = torch.zeros(program.theta_shape, dtype=torch.float64, requires_grad=True)
    loss(theta).backward()
    assert theta.grad is not None
    eps = 1e-6
    # (channel, row, col, inward direction): border pixels at 0 grow, white pixels shrink
    probes = [(0, 0, 0, 1.0), (1, 5, 30, 1.0), (2, 31, 16, 1.0),
              (0, 8, 8, -1.0), (2, 11, 10, -1.0)]
    with torch.no_grad():
        rendered = program.apply(x_t, theta[None])[0]
        base = loss(theta)
        for c, i, j, sign in probes:
            assert float(rendered[:, c, i, j].min()) in (0.0, 1.0)
            assert float(rendered[:, c, i, j].max()) in (0.0, 1.0)
            step = theta.detach().clone()
            step[c, i, j] += sign * eps
            fd = float(loss(step) - base) / (sign * eps)
            grad = float(theta.grad[c, i, j])
            assert abs(grad) > 1e-4, "a saturated pixel lost its gradient"
            assert grad == pytest.approx(fd, rel=1e-3, abs=1e-6)
