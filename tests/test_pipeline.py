"""Tests for reprogram.pipeline: the objective, predictions and the frequency label-map fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reprogram.data import load_digits
from reprogram.labelmaps import LabelMapSpec, build_labelmap
from reprogram.oracles import LocalOracle
from reprogram.pipeline import Reprogrammer
from reprogram.programs import ProgramSpec, build_program
from reprogram.zoo.registry import SourceModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_digits()
    return ds.images[:120], ds.labels[:120]


def _reprogrammer(kind: str = "first", floor: float = 1e-6, seed: int = 0) -> Reprogrammer:
    spec = ProgramSpec(kind="pad", frame_size=(32, 32), inner_size=16, resolution=8,
                       init_std=1.0)
    program = build_program(spec, seed=seed)
    labelmap = build_labelmap(LabelMapSpec(kind=kind, num_source=10, num_target=10))  # type: ignore[arg-type]
    return Reprogrammer(program, labelmap, floor=floor)


def _direct_logits(rp: Reprogrammer, model: SourceModel, images: torch.Tensor,
                   thetas: torch.Tensor, output: str) -> torch.Tensor:
    """Target logits [P, N, K_t] computed by hand from the pieces."""
    x_t = rp.transform(images)
    frames = rp.program.render_candidates(x_t, thetas)  # [P, N, 3, 32, 32]
    with torch.no_grad():
        logits = model.module(torch.round(frames.flatten(0, 1) * 255) / 255)
    if output == "logits":
        log_scores = logits
    else:
        log_scores = torch.log(F.softmax(logits, -1).clamp(min=rp.floor))
    return rp.labelmap(log_scores.view(*frames.shape[:2], -1))


@pytest.mark.parametrize("output", ["probs", "logits"])
def test_objective_matches_a_direct_computation(
    model: SourceModel, digits: tuple[torch.Tensor, torch.Tensor], output: str
) -> None:
    images, labels = digits[0][:12], digits[1][:12]
    rp = _reprogrammer("random")
    oracle = LocalOracle(model, output=output)
    objective = rp.objective(rp.transform(images), labels, oracle)
    gen = torch.Generator().manual_seed(3)
    thetas = torch.randn(4, *rp.program.theta_shape, generator=gen)
    losses = objective(thetas)
    assert losses.shape == (4,)
    assert oracle.counts() == {"images": 4 * 12, "requests": 1}  # one batched query
    target = _direct_logits(rp, model, images, thetas, output)
    want = torch.stack([F.cross_entropy(target[p], labels) for p in range(4)])
    torch.testing.assert_close(losses, want, atol=1e-5, rtol=1e-5)
    assert len(set(losses.tolist())) == 4  # the candidates really differ


def test_objective_is_differentiable_on_a_local_oracle(
    model: SourceModel, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images, labels = digits[0][:6], digits[1][:6]
    rp = _reprogrammer("linear")
    objective = rp.objective(rp.transform(images), labels, LocalOracle(model))
    thetas = rp.program.theta.detach()[None].clone().requires_grad_(True)
    objective(thetas).sum().backward()
    assert thetas.grad is not None and float(thetas.grad.abs().sum()) > 0
    assert rp.labelmap.weight is not None and rp.labelmap.weight.grad is not None


def test_predict_and_accuracy(model: SourceModel,
                              digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits[0][:40], digits[1][:40]
    rp = _reprogrammer("random")
    oracle = LocalOracle(model)
    logits = rp.predict_logits(images, oracle, batch_size=16)
    want = _direct_logits(rp, model, images, rp.program.theta.detach()[None], "probs")[0]
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert oracle.counts() == {"images": 40, "requests": 3}  # 16 + 16 + 8
    proba = rp.predict_proba(images, oracle)
    torch.testing.assert_close(proba.sum(-1), torch.ones(40))
    acc = rp.accuracy(images, labels, oracle)
    assert acc == pytest.approx(float((want.argmax(-1) == labels).float().mean()))
    assert rp.accuracy(images[:0], labels[:0], oracle) == 0.0
    assert rp.source_scores(images[:0], oracle).shape == (0, 10)


def _greedy_by_hand(freq: list[list[int]]) -> list[int]:
    """Repeat K_t times: argmax (s, t) (first in row-major order), assign, strike row and col."""
    k_s, k_t = len(freq), len(freq[0])
    rows, cols = set(range(k_s)), set(range(k_t))
    out = [-1] * k_t
    for _ in range(k_t):
        best = max((freq[s][t], -s, -t) for s in rows for t in cols)
        s, t = -best[1], -best[2]
        out[t] = s
        rows.discard(s)
        cols.discard(t)
    return out


@pytest.mark.parametrize("output", ["probs", "label"])
def test_frequency_labelmap_matches_a_hand_computation(
    model: SourceModel, digits: tuple[torch.Tensor, torch.Tensor], output: str
) -> None:
    images, labels = digits
    rp = _reprogrammer("frequency", seed=4)
    oracle = LocalOracle(model, output=output)
    rp.fit_labelmap(images, labels, oracle, batch_size=50)
    assert oracle.images_used == len(images)
    # source top-1 of every image under the current program, by hand
    frames = rp.program.render(images)
    with torch.no_grad():
        top1 = model.module(torch.round(frames * 255) / 255).argmax(-1)
    freq = [[0] * 10 for _ in range(10)]
    for s, t in zip(top1.tolist(), labels.tolist(), strict=True):
        freq[s][t] += 1
    want = _greedy_by_hand(freq)
    assert rp.labelmap.assignment[:, 0].tolist() == want
    assert len(set(top1.tolist())) > 1  # a non-trivial frequency matrix
    # predictions now read the assigned source classes
    scores = rp.source_scores(images, LocalOracle(model, output="logits"))
    pred = rp.predict_logits(images, LocalOracle(model, output="logits")).argmax(-1)
    torch.testing.assert_close(rp.labelmap(scores), scores[:, want])
    assert pred.shape == labels.shape
