"""The zero-shot API's optional ``context`` input (``reprogram-server --context-input``) and
black-box context vectors learned through it (BPT-VLM's text half, CMA-ES).

A real ``reprogram-server --model shapes-clip`` on a loopback port: its answers for CoOp
context vectors equal the local model's, bad context tensors are a 400 in words, the input is
off unless asked for, and ``reprogram fit --endpoint ... --program coop`` learns through it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prompt_support import ServerProcess, cli_command, model_server, run_cli

from reprogram import protocol
from reprogram.artifact import load_prompt
from reprogram.data import load_dataset
from reprogram.errors import ConfigError
from reprogram.http_oracle import HttpOracle
from reprogram.oracles import LocalOracle
from reprogram.zoo.registry import load_model

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
INFER = "/v2/models/shapes-clip/infer"
WIDTH = 64  # shapes-clip's token width


@pytest.fixture(scope="module")
def context_server() -> Iterator[str]:
    server: ServerProcess = model_server("--model", "shapes-clip", "--context-input")
    yield server.start()
    server.stop()


def _images(n: int = 4) -> np.ndarray:
    return load_dataset("colours").images[:n].numpy()


def _post(url: str, context: Any, *, binary: bool = True, labels: Any = COLOURS,
          parameters: dict[str, Any] | None = None) -> httpx.Response:
    inputs: dict[str, Any] = {"image": _images(), "context": context}
    if labels is not None:
        inputs["labels"] = np.array(labels, dtype=object)
    body, headers = protocol.encode_request(inputs, binary=binary, parameters=parameters)
    return httpx.post(url + INFER, content=body, headers=headers, timeout=60)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("shape", [(4, WIDTH), (len(COLOURS), 3, WIDTH)])
def test_context_answers_equal_the_local_models(context_server: str, binary: bool,
                                                shape: tuple[int, ...]) -> None:
    context = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.5
    response = _post(context_server, context.numpy(), binary=binary)
    assert response.status_code == 200, response.text
    probs = protocol.decode_response(response.content, response.headers)[0]["probs"]
    local = LocalOracle(load_model("shapes-clip"))
    local.use_labels(COLOURS)
    want = local.query_context(torch.from_numpy(_images()).float() / 255.0, context[None])
    assert probs.shape == (4, len(COLOURS))
    assert float(np.abs(probs - want.numpy()).max()) < 1e-5
    # and the client's query_context sends it: one request per context
    with HttpOracle(context_server) as oracle:
        oracle.use_labels(COLOURS)
        assert oracle.context_width() == WIDTH
        two = torch.stack([context, -context])
        got = oracle.query_context(torch.from_numpy(_images()).float() / 255.0, two)
        assert oracle.requests_used == 2 and oracle.images_used == 8
    assert float((got[:4] - want).abs().max()) < 1e-5
    assert float((got[4:] - got[:4]).abs().max()) > 1e-3  # the context changes the answer


def test_the_metadata_lists_the_context_input(context_server: str) -> None:
    meta = httpx.get(context_server + "/v2/models/shapes-clip", timeout=30).json()
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("image", "UINT8", [-1, 3, 32, 32]), ("labels", "BYTES", [-1]),
        ("context", "FP32", [-1, WIDTH])]
    said = meta["parameters"]["zero_shot"]["context"]
    assert said == {"input": "context", "width": WIDTH, "max_vectors": 32}


@pytest.mark.parametrize(("context", "says"), [
    (np.zeros((4, WIDTH + 1), np.float32), "shape [M, 64]"),
    (np.zeros((5, 4, WIDTH), np.float32), "one set per label"),
    (np.zeros((33, WIDTH), np.float32), "1 to 32 context vectors"),
    (np.full((4, WIDTH), np.nan, np.float32), "finite"),
    (np.full((4, WIDTH), 1e6, np.float32), "magnitude"),
    (np.zeros((4, WIDTH), np.float64), "FP32"),
    (np.zeros((WIDTH,), np.float32), "shape [M, 64]"),
])
def test_bad_context_tensors_are_a_400_in_words(context_server: str, context: np.ndarray,
                                                says: str) -> None:
    response = _post(context_server, context)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]


def test_context_with_a_template_is_refused_and_the_longest_prompt_fits(
        context_server: str) -> None:
    ctx = np.zeros((4, WIDTH), np.float32)
    response = _post(context_server, ctx, parameters={"template": "a {} shape"})
    assert response.status_code == 400 and "template" in response.json()["error"]
    # the most context vectors with the longest label still fit the text encoder
    response = _post(context_server, np.zeros((32, WIDTH), np.float32), labels=["x" * 48])
    assert response.status_code == 200, response.text
    # without labels the model's own class names are read under the context
    response = _post(context_server, ctx, labels=None)
    assert response.status_code == 200, response.text
    probs = protocol.decode_response(response.content, response.headers)[0]["probs"]
    assert probs.shape == (4, len(load_model("shapes-clip").meta.class_names))


def test_the_context_input_is_off_by_default(tmp_path: Path) -> None:
    server = model_server("--model", "shapes-clip", "--prompts-dir", str(tmp_path))
    url = server.start()
    try:
        response = _post(url, np.zeros((4, WIDTH), np.float32))
        assert response.status_code == 400
        assert "--context-input" in response.json()["error"]
        meta = httpx.get(url + "/v2/models/shapes-clip", timeout=30).json()
        assert [t["name"] for t in meta["inputs"]] == ["image", "labels"]
        assert "context" not in meta["parameters"]["zero_shot"]
        with HttpOracle(url) as oracle, pytest.raises(ConfigError, match="--context-input"):
            oracle.context_width()
        refused = subprocess.run([*cli_command(), "fit", "--endpoint", url, "--data", "colours",
                                  "--program", "coop", "--budget", "2000", "--out",
                                  str(tmp_path / "p.safetensors")], capture_output=True,
                                 text=True, timeout=120, check=False)
        assert refused.returncode != 0 and "--context-input" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "p.safetensors").exists()
    finally:
        server.stop()


@pytest.mark.slow
def test_black_box_context_vectors_learn_through_the_api(context_server: str,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "bpt.safetensors"
    summary = run_cli("fit", "--endpoint", context_server, "--data", "colours", "--program",
                      "coop", "--budget", "12000", "--seed", "0", "--out", str(out),
                      "--no-progress", timeout=600)
    assert summary["test_accuracy"] > 1 / 6 + 0.2  # well above chance, no label map
    prompt = load_prompt(out)
    assert prompt.config["estimator"] == "cma" and prompt.config["cma_popsize"] == 30
    assert prompt.program.context is not None and prompt.program.context.context == 8
    # the artifact evaluates the same over the API and on the local model
    remote = run_cli("eval", "--endpoint", context_server, "--prompt", str(out), "--data",
                     "colours", "--split", "test")
    local = run_cli("eval", "--model", "shapes-clip", "--prompt", str(out), "--data",
                    "colours", "--split", "test", "--allow-unverified-model")
    assert remote["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
    assert local["accuracy"] == pytest.approx(remote["accuracy"], abs=1e-4)
