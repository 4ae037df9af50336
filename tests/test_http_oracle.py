"""Tests for reprogram.http_oracle: discovery, chunking, wire datatypes, outputs, retries, faults.

Against a real ``reprogram-server`` process (discovery, chunking by the server's cap, fp32 and
JSON wires, equality with the in-process model) and against :class:`fake_v2.FakeV2`, a real
loopback HTTP server whose answers a test scripts (429 with ``Retry-After``, 5xx, 4xx, 401,
wrong shapes), recording each request's arrival time.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fake_v2 import FakeV2, Reply, Seen, error, json_reply

from reprogram import protocol
from reprogram.errors import BudgetExhausted, ConfigError, OracleError
from reprogram.http_oracle import HttpOracle, RetryPolicy, server_timing
from reprogram.oracles import LocalOracle, WireDtype
from reprogram.zoo.registry import SourceModel

pytestmark = pytest.mark.slow

TOL = 1e-5
FAST = RetryPolicy(max_retries=3, base=0.01, cap=0.05)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_url(live_server: Callable[..., str]) -> str:
    """A real server whose request cap (7 images) forces chunking, serving its model under a
    name the client has to discover."""
    return live_server("--max-images", "7", "--name", "shapes", "--log-level", "warning")


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _local(model: SourceModel, x: torch.Tensor, output: str = "probs",
           quantize: bool = True) -> torch.Tensor:
    with torch.no_grad():
        return LocalOracle(model, output=output, quantize=quantize).query(x)


# ----------------------------------------------------------------------- discovery, chunking
def test_discovery_from_real_server(base_url: str, model: SourceModel) -> None:
    with HttpOracle(base_url) as oracle:
        info = oracle.info
        assert info.input_size == (32, 32)
        assert info.class_names == model.meta.class_names
        assert oracle.model_name == info.name == "shapes"  # found in the server's listing
        assert info.output_kind == "probs" and info.wire_dtype == "uint8"
        assert oracle.max_batch == 7  # the server's max_batch_size
        assert info.fingerprint["weights_sha256"] == model.meta.weights_sha256
        assert info.fingerprint["endpoint"] == base_url
        assert not oracle.differentiable


def test_chunks_by_server_cap_and_matches_local(base_url: str, model: SourceModel) -> None:
    x = _images(20)
    with HttpOracle(base_url, max_in_flight=3) as oracle:
        got = oracle.query(x)
        assert oracle.counts() == {"images": 20, "requests": 3}  # ceil(20 / 7)
        assert got.shape == (20, 10)
        assert (got - _local(model, x)).abs().max() < TOL
        oracle.query(x[:7])
        assert oracle.counts() == {"images": 27, "requests": 4}
    with HttpOracle(base_url, max_batch=4, max_in_flight=1) as oracle:
        oracle.query(x[:9])
        assert oracle.requests_used == 3


def test_server_timing_splits_the_round_trip(base_url: str) -> None:
    x = _images(20)
    with HttpOracle(base_url) as oracle:
        oracle.query(x)
        t = oracle.timings
    # the server's own decode / forward / encode, from its Server-Timing header
    assert t["server_forward"] > 0 and t["server_decode"] > 0 and t["server_encode"] >= 0
    assert t["server_decode"] + t["server_forward"] + t["server_encode"] <= t["http"]
    body, headers = protocol.encode_request(
        {"image": (x[:2].numpy() * 255).round().astype(np.uint8)}, [], binary=True)
    r = httpx.post(f"{base_url}/v2/models/shapes/infer", content=body, headers=headers)
    assert r.status_code == 200
    names = [m.split(";")[0].strip() for m in r.headers["server-timing"].split(",")]
    assert names == ["decode", "forward", "encode"]


@pytest.mark.parametrize(("header", "expected"), [
    ("decode;dur=1.5, forward;dur=20, encode;dur=0.25",
     {"decode": 0.0015, "forward": 0.02, "encode": 0.00025}),
    ('db;desc="x";dur="3"', {"db": 0.003}),
    ('db;desc="a, b; c";dur=2, app;dur=1', {"db": 0.002, "app": 0.001}),
    ("a;dur=1;dur=5, a;dur=2", {"a": 0.003}),  # first dur per metric; repeated names add
    ("cache;desc=hit, forward;dur=abc, total;dur=-1, x;dur=inf", {}),
    ("", {}),
])
def test_server_timing_header_parser(header: str, expected: dict[str, float]) -> None:
    got = server_timing(header)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_wire_matches_unquantized_local(base_url: str, model: SourceModel,
                                             binary: bool) -> None:
    x = _images(5, seed=1)
    with HttpOracle(base_url, wire="fp32", binary=binary) as oracle:
        assert oracle.info.wire_dtype == "fp32"
        got = oracle.query(x)
    assert (got - _local(model, x, quantize=False)).abs().max() < TOL
    # and the uint8 wire really quantizes (the two differ on random images)
    assert (got - _local(model, x, quantize=True)).abs().max() > TOL


def test_wire_datatypes_seen_by_the_server() -> None:
    x = _images(3)
    with FakeV2() as fake:
        wires: tuple[tuple[WireDtype, str], ...] = (("uint8", "UINT8"), ("fp32", "FP32"))
        for wire, dtype in wires:
            with HttpOracle(fake.url, wire=wire) as oracle:
                oracle.query(x)
            body = fake.requests()[-1]
            n = int(body.headers[protocol.HEADER_LENGTH.lower()])
            header = json.loads(body.body[:n])
            assert header["inputs"][0]["datatype"] == dtype
            assert header["inputs"][0]["shape"] == [3, 3, 32, 32]
            if wire == "uint8":
                sent = np.frombuffer(body.body[n:], np.uint8).reshape(3, 3, 32, 32)
                assert np.array_equal(sent, torch.round(x * 255).to(torch.uint8).numpy())


@pytest.mark.parametrize("output", ["label", "logits", "topk:3"])
def test_output_kinds_from_metadata(model: SourceModel, output: str) -> None:
    x = _images(6, seed=2)
    with FakeV2(output=output) as fake, HttpOracle(fake.url) as oracle:
        assert oracle.info.output_kind == output
        assert oracle.info.class_names == model.meta.class_names
        got = oracle.query(x)
    want = _local(model, x, output=output)
    assert got.shape == (6, 10) and got.dtype == torch.float32
    if output == "label":
        assert torch.equal(got.sum(1), torch.ones(6))  # one-hot rows
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() < 1e-4


def test_minimal_metadata_and_overrides() -> None:
    """A server that only gives V2 shapes (no parameters), like a bare Triton model."""
    meta = {"name": "default", "platform": "onnx",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}],
            "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]}
    with FakeV2(metadata=meta) as fake:
        with HttpOracle(fake.url) as oracle:
            assert oracle.info.input_size == (32, 32)
            assert oracle.info.class_names == tuple(f"class_{i}" for i in range(10))
            assert oracle.info.output_kind == "probs"
            assert oracle.max_batch == 256
            assert oracle.info.fingerprint["weights_sha256"] is None
        with HttpOracle(fake.url, output_kind="topk:2") as oracle:
            assert oracle.info.output_kind == "topk:2"
    # a server that says even less: the caller fills in size and class names
    bare: dict[str, Any] = {"name": "default", "inputs": [{"name": "image"}],
                            "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}]}
    with FakeV2(metadata=bare, output="label") as fake:
        with pytest.raises(OracleError, match="no input size"):
            HttpOracle(fake.url)
        with pytest.raises(OracleError, match="no class count"):
            HttpOracle(fake.url, input_size=(32, 32))
        names = tuple("abcdefghij")
        with HttpOracle(fake.url, input_size=(32, 32), class_names=names) as oracle:
            assert oracle.info.class_names == names and oracle.info.output_kind == "label"
            assert oracle.query(_images(3)).sum(1).tolist() == [1.0, 1.0, 1.0]
    bare["inputs"] = [{"name": "image", "shape": -1}]  # malformed: not a list
    with FakeV2(metadata=bare) as fake, pytest.raises(OracleError, match="unreadable metadata"):
        HttpOracle(fake.url)


@pytest.mark.parametrize("listing", ["v1", "v2", "none"])
def test_model_name_discovered_when_not_given(listing: str) -> None:
    name = "default" if listing == "none" else "shapes"
    with FakeV2(name=name, listing=listing) as fake, HttpOracle(fake.url) as oracle:
        assert oracle.model_name == name and oracle.info.name == name
        oracle.query(_images(2))
        assert fake.requests()[-1].path == f"/v2/models/{name}/infer"


def test_wire_the_server_does_not_take_is_a_clear_error() -> None:
    meta = {"name": "default",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}],
            "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]}
    with FakeV2(metadata=meta) as fake:
        with pytest.raises(ConfigError, match=r"accept FP32.*\['UINT8'\].*--wire uint8"):
            HttpOracle(fake.url, wire="fp32")
        assert fake.requests() == []


def test_bad_max_batch_is_config_error() -> None:
    with pytest.raises(ConfigError, match="max_batch"):
        HttpOracle("http://127.0.0.1:9", max_batch=0)


def test_non_finite_scores_are_oracle_error() -> None:
    def nan(seen: Seen) -> Reply | None:
        if seen.kind != "infer":
            return None
        body, headers = protocol.encode_response(model_name="default", outputs=[
            protocol.OutputTensor(name="probs", array=np.full((2, 10), np.nan, np.float32),
                                  binary=True)])
        return 200, headers, body

    with FakeV2(script=nan) as fake, HttpOracle(fake.url) as oracle, \
            pytest.raises(OracleError, match="finite"):
        oracle.query(_images(2))


def test_unknown_model_is_a_clear_error(base_url: str) -> None:
    with pytest.raises(OracleError, match=r"HTTP 404.*nope"):
        HttpOracle(base_url, model="nope")


@pytest.mark.parametrize("shape", [(5, 11), (4, 10), (5,)], ids=["classes", "rows", "rank"])
def test_wrong_output_shape_is_oracle_error(shape: tuple[int, ...]) -> None:
    def wrong(seen: Seen) -> Reply | None:
        if seen.kind != "infer":
            return None
        body, headers = protocol.encode_response(model_name="default", outputs=[
            protocol.OutputTensor(name="probs", array=np.full(shape, 0.1, np.float32),
                                  binary=True)])
        return 200, headers, body

    with FakeV2(script=wrong) as fake, HttpOracle(fake.url, retry=FAST) as oracle:
        with pytest.raises(OracleError, match="expected scores of shape"):
            oracle.query(_images(5))
        assert len(fake.requests()) == 1  # not retried


def test_label_out_of_range_is_oracle_error() -> None:
    def bad(seen: Seen) -> Reply | None:
        if seen.kind != "infer":
            return None
        body, headers = protocol.encode_response(model_name="default", outputs=[
            protocol.OutputTensor(name="label", array=np.array([0, 10], np.int64))])
        return 200, headers, body

    with FakeV2(output="label", script=bad) as fake, HttpOracle(fake.url) as oracle, \
            pytest.raises(OracleError, match="labels"):
        oracle.query(_images(2))


def test_garbage_body_is_oracle_error() -> None:
    def garbage(seen: Seen) -> Reply | None:
        return (200, {"Content-Type": "application/json"}, b"<html>") if (
            seen.kind == "infer") else None

    with FakeV2(script=garbage) as fake, HttpOracle(fake.url) as oracle, \
            pytest.raises(OracleError, match="unreadable inference response"):
        oracle.query(_images(1))


# ----------------------------------------------------------------------- retries
def _fail_first(n: int, reply: Callable[[], Reply],
                ) -> Callable[[Seen], Reply | None]:
    return lambda seen: reply() if seen.kind == "infer" and seen.index < n else None


def test_429_retry_after_is_waited_for(model: SourceModel) -> None:
    x = _images(4)
    script = _fail_first(2, lambda: error(429, "slow down", **{"Retry-After": "1"}))
    with FakeV2(script=script) as fake, HttpOracle(fake.url) as oracle:
        got = oracle.query(x)
        times = [s.t for s in fake.requests()]
        assert oracle.retries == 2
    assert len(times) == 3  # two refusals, one success: not hammered
    assert all(b - a >= 0.95 for a, b in itertools.pairwise(times)), np.diff(times)
    assert (got - _local(model, x)).abs().max() < TOL
    assert oracle.counts() == {"images": 4, "requests": 1}  # retries are not billed twice


def test_429_http_date_retry_after_is_waited_for() -> None:
    def later() -> Reply:
        when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds
        return error(429, "slow down", **{"Retry-After": when})

    with FakeV2(script=_fail_first(1, later)) as fake, HttpOracle(fake.url) as oracle:
        oracle.query(_images(1))
        times = [s.t for s in fake.requests()]
    assert len(times) == 2 and times[1] - times[0] >= 0.95


def test_429_forever_gives_up_after_bounded_attempts() -> None:
    script = _fail_first(10**6, lambda: error(429, "quota exceeded", **{"Retry-After": "1"}))
    policy = RetryPolicy(max_retries=2, base=0.01, cap=0.05)
    with FakeV2(script=script) as fake, HttpOracle(fake.url, retry=policy) as oracle:
        with pytest.raises(OracleError, match=r"after 3 attempts.*429.*quota exceeded"):
            oracle.query(_images(2))
        times = [s.t for s in fake.requests()]
        assert oracle.counts() == {"images": 0, "requests": 0}
    assert len(times) == 3
    assert all(b - a >= 0.95 for a, b in itertools.pairwise(times))


@pytest.mark.parametrize("status", [500, 502, 503, 504, 520])
def test_5xx_then_success_is_retried(model: SourceModel, status: int) -> None:
    x = _images(3)
    with FakeV2(script=_fail_first(2, lambda: error(status, "boom"))) as fake, \
            HttpOracle(fake.url, retry=FAST) as oracle:
        got = oracle.query(x)
        assert len(fake.requests()) == 3 and oracle.retries == 2
    assert (got - _local(model, x)).abs().max() < TOL


def test_5xx_during_discovery_is_retried() -> None:
    def script(s: Seen) -> Reply | None:
        return error(503, "loading") if s.kind == "meta" and s.index == 0 else None

    with FakeV2(script=script) as fake, HttpOracle(fake.url, retry=FAST) as oracle:
        assert oracle.info.input_size == (32, 32)
        assert len(fake.requests("meta")) == 2


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_other_4xx_is_not_retried(status: int) -> None:
    script = _fail_first(10**6, lambda: error(status, f"bad tensor #{status}"))
    with FakeV2(script=script) as fake, HttpOracle(fake.url, retry=FAST) as oracle:
        with pytest.raises(OracleError, match=f"HTTP {status}: bad tensor #{status}"):
            oracle.query(_images(2))
        assert len(fake.requests()) == 1 and oracle.retries == 0


def test_connection_refused_is_retried_then_clear_error() -> None:
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(OracleError, match=r"failed after 3 attempts: Connect"):
        HttpOracle(url, retry=RetryPolicy(max_retries=2, base=0.01, cap=0.05))
    assert time.monotonic() - t0 < 10


# ----------------------------------------------------------------------- budgets, auth
def test_budget_exhausted_before_spending() -> None:
    with FakeV2() as fake, HttpOracle(fake.url, budget=10) as oracle:
        oracle.query(_images(6))
        with pytest.raises(BudgetExhausted, match="budget 10"):
            oracle.query(_images(5))
        assert len(fake.requests()) == 1 and oracle.counts() == {"images": 6, "requests": 1}
        oracle.query(_images(4))
        assert oracle.remaining() == 0


def test_max_requests_enforced_before_spending() -> None:
    with FakeV2() as fake, HttpOracle(fake.url, max_batch=4, max_requests=2) as oracle:
        oracle.query(_images(4))  # one request
        with pytest.raises(BudgetExhausted, match="request cap 2"):
            oracle.query(_images(8))  # would need two more
        assert len(fake.requests()) == 1 and oracle.counts() == {"images": 4, "requests": 1}
        oracle.query(_images(3))
        with pytest.raises(BudgetExhausted, match="request cap 2"):
            oracle.query(_images(1))
        assert len(fake.requests()) == 2


def test_api_key_is_sent_as_bearer_header() -> None:
    with FakeV2() as fake, HttpOracle(fake.url, api_key="secret-XYZ") as oracle:
        oracle.query(_images(1))
    assert {s.headers.get("authorization") for s in fake.seen} == {"Bearer secret-XYZ"}


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reprogram.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_cli_401_is_one_line_error_without_the_key(tmp_path: Path) -> None:
    def deny(seen: Seen) -> Reply | None:
        return error(401, "invalid API key")

    with FakeV2(script=deny) as fake:
        r = _run_cli("fit", "--endpoint", fake.url, "--api-key", "secret-XYZ", "--data",
                     "digits", "--budget", "2000", "--out", str(tmp_path / "p.safetensors"))
        assert fake.seen[0].headers.get("authorization") == "Bearer secret-XYZ"
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "401" in lines[0] and "invalid API key" in lines[0]
    assert "Traceback" not in r.stderr
    assert "secret-XYZ" not in r.stdout + r.stderr
    assert not (tmp_path / "p.safetensors").exists()


def test_cli_401_mid_fit_verbose_never_logs_the_key(tmp_path: Path) -> None:
    """The key is revoked after a few queries; logging at INFO must not show it."""
    def deny_late(s: Seen) -> Reply | None:
        return error(401, "invalid API key") if s.kind == "infer" and s.index >= 3 else None

    with FakeV2(script=deny_late) as fake:
        r = _run_cli("-v", "fit", "--endpoint", fake.url, "--data", "digits", "--budget",
                     "20000", "--batch-size", "8", "--q", "2", "--no-progress", "--out",
                     str(tmp_path / "p.safetensors"), env={"REPROGRAM_API_KEY": "secret-XYZ"})
        assert len(fake.requests()) == 4  # 3 answered, the 401 not retried
        assert all(s.headers.get("authorization") == "Bearer secret-XYZ" for s in fake.seen)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("reprogram fit: error:")
    assert "invalid API key" in r.stderr
    assert "secret-XYZ" not in r.stdout + r.stderr


def test_json_metadata_error_body_is_reported() -> None:
    def script(s: Seen) -> Reply | None:
        return json_reply(["not", "an", "object"]) if s.kind == "meta" else None

    with FakeV2(script=script) as fake, pytest.raises(OracleError, match="JSON object"):
        HttpOracle(fake.url)
