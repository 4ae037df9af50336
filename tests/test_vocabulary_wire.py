"""Names APIs' vocabularies, image wires and their local emulation (no server needed)."""

from __future__ import annotations

import logging

import pytest
import torch

from reprogram.errors import ArtifactError, ConfigError, UpstreamError
from reprogram.http_transport import RetryPolicy, excerpt
from reprogram.labelmaps import LabelMapSpec, build_labelmap
from reprogram.oracles import LocalOracle, parse_output_kind
from reprogram.vocabulary import Vocabulary, named_row
from reprogram.wire import jpeg_roundtrip, parse_wire
from reprogram.zoo.registry import SourceModel


def test_vocabulary_gives_slots_in_order_of_appearance() -> None:
    v = Vocabulary(4)
    scores = v.scores([[("cat", 0.6), ("dog", 0.3)], [("emu", 0.9), ("cat", 0.1)]])
    assert v.names == ("cat", "dog", "emu")
    assert v.slot_names() == ("cat", "dog", "emu", "unseen-3")
    assert torch.allclose(scores, torch.tensor([[0.6, 0.3, 0, 0], [0.1, 0, 0.9, 0]]))


def test_full_or_fixed_vocabulary_drops_new_names_once(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    v = Vocabulary(2, ("a", "b"), fixed=True)
    with caplog.at_level(logging.WARNING):
        out = v.scores([[("a", 0.5), ("zz", 0.5)], [("zz", 0.7)]])
    assert out.tolist() == [[0.5, 0.0], [0.0, 0.0]]
    assert sum("'zz'" in r.message for r in caplog.records) == 1


def test_adopting_a_prompts_vocabulary_keeps_slots() -> None:
    v = Vocabulary(5)
    v.adopt(["b", "a"])
    assert v.slot("a") == 1 and v.slot("c") == 2
    with pytest.raises(ArtifactError, match="slot"):
        v.adopt(["a", "b"])


@pytest.mark.parametrize("answer", [
    {"cat": 0.7, "dog": 0.2},                                  # TorchServe
    [{"label": "cat", "score": 0.7}, {"label": "dog", "score": 0.2}],  # hosted classifiers
    {"predictions": [{"filename": "x", "top": [{"label": "cat", "score": 0.7},
                                               {"label": "dog", "score": 0.2}]}]},  # ours
    [{"cat": 0.7, "dog": 0.2}],                                # a one-image batch
])
def test_named_answer_shapes(answer: object) -> None:
    assert named_row(answer, "test") == [("cat", 0.7), ("dog", 0.2)]


@pytest.mark.parametrize("answer", [[], {"label": "x"}, "cat", {"cat": "high"},
                                    {"cat": float("nan")}])
def test_unreadable_named_answers_are_one_line_errors(answer: object) -> None:
    with pytest.raises(UpstreamError) as caught:
        named_row(answer, "test")
    assert "\n" not in str(caught.value)


def test_wires_parse_and_jpeg_loses_a_little() -> None:
    assert str(parse_wire("jpeg:90")) == "jpeg:90" and parse_wire("png").is_image
    for bad in ("jpeg", "jpeg:0", "jpeg:100", "webp"):
        with pytest.raises(ConfigError):
            parse_wire(bad)
    ramp = torch.linspace(0, 1, 32)
    x = torch.stack([ramp[None, :].expand(32, 32), ramp[:, None].expand(32, 32),
                     torch.full((32, 32), 0.5)])[None]  # a smooth picture, as photos are
    y = jpeg_roundtrip(x, 90)
    assert y.shape == x.shape and 0 < (y - x).abs().mean() < 0.02


def test_output_kind_topk_names() -> None:
    assert parse_output_kind("topk-names:5") == ("topk", 5)
    with pytest.raises(ConfigError):
        parse_output_kind("topk-names:0")


def test_local_topk_names_equals_topk_up_to_slot_order(model: SourceModel) -> None:
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    topk = LocalOracle(model, output="topk:5").query(x)
    named = LocalOracle(model, output="topk-names:5", max_classes=1000)
    got = named.query(x)
    info = named.info
    assert got.shape == (16, 1000) and info.active_classes == len(named.vocabulary.names)
    order = [model.meta.class_names.index(n) for n in named.vocabulary.names]
    assert torch.equal(got[:, : len(order)], topk[:, order])
    assert not named.differentiable and info.fingerprint["vocabulary"] == list(
        named.vocabulary.names)


def test_local_jpeg_wire_changes_scores_a_little(model: SourceModel) -> None:
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    plain = LocalOracle(model).query(x)
    jpeg = LocalOracle(model, wire="jpeg:90")
    assert jpeg.info.wire_dtype == "jpeg:90"
    diff = (jpeg.query(x) - plain).abs().max()
    assert 0 < diff < 0.5


def test_linear_map_reads_only_the_classes_that_exist() -> None:
    lm = build_labelmap(LabelMapSpec(kind="linear", num_source=1000, num_target=3))
    scores = torch.log(torch.tensor([[0.7, 0.2, 0.1] + [1e-6] * 997]))
    out = lm(scores, active=3)
    out.sum().backward()
    assert lm.weight is not None and lm.weight.grad is not None
    assert lm.weight.grad[3:].abs().sum() == 0  # slots never seen learn nothing
    other = scores.clone()
    other[:, 3:] = -3.0  # what the slots not yet seen hold does not matter
    assert torch.equal(lm(other, active=3), out.detach())


def test_excerpt_is_one_line() -> None:
    assert excerpt(b'{"error": "RuntimeError : boom\\nTraceback (most recent call last):"}'
                   ) == "RuntimeError : boom"
    assert excerpt(b"<!DOCTYPE html><html><body>502</body></html>") == "an HTML page"
    assert excerpt(b"\xff\xfe\x00") == "3 bytes"
    assert len(excerpt(b"x" * 1000)) == 160


def test_retry_policy_is_validated() -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(identical_5xx=0)
