"""Tests for reprogram.labelmaps: score conversion, discrete maps, greedy frequency fit, linear."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from reprogram.errors import ConfigError, DataError
from reprogram.labelmaps import (
    LabelMapSpec,
    build_labelmap,
    greedy_assignment,
    to_log_scores,
)


def _data_from_counts(counts: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(source_top1, target_labels) realising the frequency matrix counts[s][t], shuffled."""
    pairs = [(s, t) for s, row in enumerate(counts) for t, c in enumerate(row) for _ in range(c)]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    src = torch.tensor([pairs[i][0] for i in order])
    tgt = torch.tensor([pairs[i][1] for i in order])
    return src, tgt


def _fit(kind: str, counts: list[list[int]], m: int = 1) -> torch.Tensor:
    spec = LabelMapSpec(
        kind=kind,  # type: ignore[arg-type]
        num_source=len(counts),
        num_target=len(counts[0]),
        sources_per_target=m,
    )
    lm = build_labelmap(spec)
    lm.fit(*_data_from_counts(counts))
    return lm.assignment.clone()


# ---------------------------------------------------------------- to_log_scores


def test_to_log_scores_kinds() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert torch.equal(to_log_scores(logits, "logits"), logits)
    probs = torch.softmax(logits, dim=-1)
    assert torch.allclose(to_log_scores(probs, "probs"), torch.log_softmax(logits, -1))
    topk = torch.tensor([[0.7, 0.0, 0.3]])
    out = to_log_scores(topk, "topk", floor=1e-4)
    assert torch.allclose(out, torch.tensor([[math.log(0.7), math.log(1e-4), math.log(0.3)]]))
    label = torch.tensor([[0.0, 1.0, 0.0]])
    out = to_log_scores(label, "label")
    assert torch.allclose(out, torch.tensor([[math.log(1e-6), 0.0, math.log(1e-6)]]))
    assert torch.isfinite(to_log_scores(torch.zeros(2, 3), "probs")).all()


def test_a_top_k_answer_shares_what_it_leaves_among_the_missing_classes() -> None:
    # top 2 of 5 shown: 0.5 + 0.2 leave 0.3 for the 3 others, 0.1 each (below the 0.2 shown)
    topk = torch.tensor([[0.5, 0.0, 0.2, 0.0, 0.0],
                         [0.9, 0.0, 0.0, 0.0, 0.09]])  # 0.01 left: 0.0033 each
    out = to_log_scores(topk, "topk", floor=1e-6, remainder="share").exp()
    assert torch.allclose(out[0], torch.tensor([0.5, 0.1, 0.2, 0.1, 0.1]))
    assert torch.allclose(out[1, 1:4], torch.full((3,), 0.01 / 3))
    # never above the smallest probability shown, never below the floor
    capped = to_log_scores(torch.tensor([[0.4, 0.0, 0.0]]), "topk", remainder="share").exp()
    assert torch.allclose(capped, torch.tensor([[0.4, 0.3, 0.3]]))
    capped = to_log_scores(torch.tensor([[0.3, 0.0, 0.0]]), "topk", remainder="share").exp()
    assert torch.allclose(capped, torch.tensor([[0.3, 0.3, 0.3]]))
    full = to_log_scores(torch.tensor([[1.0, 0.0, 0.0]]), "topk", floor=1e-5, remainder="share")
    assert torch.allclose(full.exp(), torch.tensor([[1.0, 1e-5, 1e-5]]))
    # a label vocabulary: only the slots filled so far are the API's classes
    wide = torch.zeros(1, 1000)
    wide[0, :2] = torch.tensor([0.6, 0.2])
    out = to_log_scores(wide, "topk", remainder="share", classes=4).exp()
    assert torch.allclose(out[0, 2:4], torch.full((2,), 0.1))
    # the floor variant and other kinds are unchanged
    assert torch.equal(to_log_scores(topk, "topk", remainder="floor"), to_log_scores(topk, "topk"))
    probs = torch.softmax(torch.randn(2, 5), -1)
    assert torch.equal(to_log_scores(probs, "probs", remainder="share"),
                       to_log_scores(probs, "probs"))


def test_to_log_scores_rejects_bad_options() -> None:
    with pytest.raises(ConfigError):
        to_log_scores(torch.zeros(1, 2), "softmax")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        to_log_scores(torch.zeros(1, 2), "probs", floor=0.0)
    with pytest.raises(ConfigError, match="remainder"):
        to_log_scores(torch.zeros(1, 2), "topk", remainder="uniform")  # type: ignore[arg-type]


# ---------------------------------------------------------------- frequency greedy


def test_frequency_greedy_hand_example() -> None:
    counts = [
        [0, 1, 0],
        [5, 0, 2],
        [4, 3, 0],
        [0, 6, 1],
        [1, 0, 3],
    ]
    # 6 at (s3, t1); then 5 at (s1, t0); then column t2 among rows s0, s2, s4 -> s4.
    assert _fit("frequency", counts).tolist() == [[1], [3], [4]]


def test_frequency_greedy_strikes_rows_and_breaks_ties_low() -> None:
    # Ties at 3: (s1,t0), (s1,t1), (s2,t0) -> lowest (s1, t0). Then column t1 among rows
    # s0, s2 is all zeros -> lowest s0. A per-column argmax would give s1 twice.
    assert _fit("frequency", [[1, 0], [3, 3], [3, 0]]).tolist() == [[1], [0]]
    assert _fit("frequency", [[2, 2], [2, 2], [0, 0], [0, 0]]).tolist() == [[0], [1]]
    # No data at all: deterministic lowest-index assignment.
    assert greedy_assignment(torch.zeros(4, 3)).tolist() == [[0], [1], [2]]


def test_frequency_greedy_many_to_one() -> None:
    counts = [
        [4, 0],
        [3, 1],
        [0, 5],
        [2, 2],
        [0, 0],
        [1, 3],
    ]
    # 5 -> (s2,t1); 4 -> (s0,t0); tie 3 at (s1,t0) and (s5,t1) -> (s1,t0), t0 full;
    # column t1 among rows s3, s4, s5 = 2, 0, 3 -> s5.
    assert _fit("iterative", counts, m=2).tolist() == [[0, 1], [2, 5]]


def test_many_to_one_forward_is_mean_of_probabilities() -> None:
    spec = LabelMapSpec(kind="frequency", num_source=6, num_target=2, sources_per_target=2)
    lm = build_labelmap(spec)
    lm.fit(*_data_from_counts([[4, 0], [3, 1], [0, 5], [2, 2], [0, 0], [1, 3]]))
    probs = torch.softmax(torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0)), -1)
    out = lm(to_log_scores(probs, "probs"))
    assert out.shape == (3, 4, 2)
    expected = torch.stack(
        [(probs[..., 0] + probs[..., 1]) / 2, (probs[..., 2] + probs[..., 5]) / 2], -1
    )
    assert torch.allclose(out.exp(), expected, atol=1e-6)
    matrix = lm.as_matrix()
    assert matrix.sum(0).tolist() == [2.0, 2.0] and float(matrix.sum(1).max()) == 1.0


def test_fit_flags_and_errors() -> None:
    kinds = ["first", "random", "frequency", "iterative", "linear"]
    maps = {k: build_labelmap(LabelMapSpec(kind=k, num_source=10, num_target=3)) for k in kinds}  # type: ignore[arg-type]
    assert [maps[k].needs_fit for k in kinds] == [False, False, True, True, False]
    assert [maps[k].refit_every_epoch for k in kinds] == [False, False, False, True, False]
    with pytest.raises(ConfigError):
        maps["first"].fit(torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(DataError):
        maps["frequency"].fit(torch.tensor([10]), torch.tensor([0]))
    with pytest.raises(DataError):
        maps["frequency"].fit(torch.tensor([0, 1]), torch.tensor([0]))


def test_iterative_refit_changes_mapping() -> None:
    lm = build_labelmap(LabelMapSpec(kind="iterative", num_source=4, num_target=2))
    lm.fit(*_data_from_counts([[5, 0], [0, 5], [0, 0], [0, 0]]))
    assert lm.assignment.tolist() == [[0], [1]]
    lm.fit(*_data_from_counts([[0, 0], [0, 0], [0, 5], [5, 0]]))
    assert lm.assignment.tolist() == [[3], [2]]


# ---------------------------------------------------------------- first / random


def test_first_and_random() -> None:
    first = build_labelmap(LabelMapSpec(kind="first", num_source=10, num_target=4))
    assert first.assignment.view(-1).tolist() == [0, 1, 2, 3]
    x = torch.randn(2, 5, 10)
    assert torch.equal(first(x), x[..., :4])
    r1 = build_labelmap(LabelMapSpec(kind="random", num_source=100, num_target=10, seed=1))
    r1b = build_labelmap(LabelMapSpec(kind="random", num_source=100, num_target=10, seed=1))
    r2 = build_labelmap(LabelMapSpec(kind="random", num_source=100, num_target=10, seed=2))
    assert torch.equal(r1.assignment, r1b.assignment)
    assert not torch.equal(r1.assignment, r2.assignment)
    assert r1.assignment.unique().numel() == 10 and int(r1.assignment.max()) < 100
    assert torch.equal(r1(x.new_zeros(3, 100)), torch.zeros(3, 10))
    assert torch.equal(r1.as_matrix().argmax(0), r1.assignment.view(-1))


# ---------------------------------------------------------------- linear


def test_linear_starts_as_first_and_has_gradients() -> None:
    spec = LabelMapSpec(kind="linear", num_source=10, num_target=4)
    lin = build_labelmap(spec)
    first = build_labelmap(LabelMapSpec(kind="first", num_source=10, num_target=4))
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(
        torch.softmax(lin(logits), -1), torch.softmax(first(logits), -1), atol=1e-6
    )
    # Invariant to a per-row shift (logits vs log-probabilities).
    assert torch.allclose(lin(logits), lin(torch.log_softmax(logits, -1)), atol=1e-5)
    loss = F.cross_entropy(lin(logits), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    loss.backward()
    assert lin.weight is not None and lin.weight.grad is not None
    assert lin.bias is not None and lin.bias.grad is not None
    assert float(lin.weight.grad.abs().sum()) > 0 and float(lin.bias.grad.abs().sum()) > 0
    assert lin.as_matrix().shape == (10, 4)
    assert {n for n, _ in lin.named_parameters()} == {"weight", "bias"}


def test_linear_allows_more_targets_than_sources() -> None:
    lin = build_labelmap(LabelMapSpec(kind="linear", num_source=3, num_target=5))
    assert lin(torch.randn(2, 3)).shape == (2, 5)


# ---------------------------------------------------------------- state dict / specs


def test_state_dict_round_trip() -> None:
    spec = LabelMapSpec(kind="frequency", num_source=5, num_target=3)
    lm = build_labelmap(spec)
    lm.fit(*_data_from_counts([[0, 1, 0], [5, 0, 2], [4, 3, 0], [0, 6, 1], [1, 0, 3]]))
    fresh = build_labelmap(LabelMapSpec.from_dict(json.loads(json.dumps(spec.to_dict()))))
    assert not torch.equal(fresh.assignment, lm.assignment)
    fresh.load_state_dict(lm.state_dict())
    assert torch.equal(fresh.assignment, lm.assignment)
    x = torch.randn(4, 5)
    assert torch.equal(fresh(x), lm(x))

    lin = build_labelmap(LabelMapSpec(kind="linear", num_source=5, num_target=3))
    with torch.no_grad():
        assert lin.weight is not None
        lin.weight.add_(torch.randn(5, 3))
    lin2 = build_labelmap(lin.spec)
    lin2.load_state_dict(lin.state_dict())
    assert torch.equal(lin2(x), lin(x))


def test_tampered_state_dict_is_rejected() -> None:
    lm = build_labelmap(LabelMapSpec(kind="first", num_source=5, num_target=3))
    with pytest.raises(DataError):
        lm.load_state_dict({"assignment": torch.tensor([[0], [0], [1]])})
    with pytest.raises(DataError):
        lm.load_state_dict({"assignment": torch.tensor([[0], [7], [1]])})


def test_forward_rejects_wrong_width() -> None:
    lm = build_labelmap(LabelMapSpec(kind="first", num_source=5, num_target=3))
    with pytest.raises(DataError):
        lm(torch.zeros(2, 4))


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "hungarian"},
        {"num_target": 0},
        {"num_target": 4},  # 4 > 3 sources
        {"sources_per_target": 2, "num_target": 2},  # 4 > 3
        {"kind": "linear", "sources_per_target": 2},
        {"seed": -1},
        {"num_source": 3.0},
        {"extra": 1},
    ],
)
def test_bad_specs_raise_config_error(bad: dict[str, object]) -> None:
    d = {"kind": "frequency", "num_source": 3, "num_target": 2} | bad
    with pytest.raises(ConfigError):
        LabelMapSpec.from_dict(d)


def test_spec_round_trip() -> None:
    spec = LabelMapSpec(kind="iterative", num_source=10, num_target=3, sources_per_target=3, seed=4)
    assert LabelMapSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
