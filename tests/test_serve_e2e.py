"""``reprogram serve`` end to end: a prompt served in front of the model server's API.

Real processes: ``reprogram-server`` hosts the prompt; ``reprogram serve --endpoint`` applies
it client-side and queries the server (proxy mode); ``reprogram serve --model default`` runs it
on a local copy of the model; ``reprogram apply`` classifies PNG files. All give the same
predictions on the held-out digits, as they share one code path (``Reprogrammer``).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prompt_support import (
    ServerProcess,
    cli_command,
    fitted_prompt,
    held_out_split,
    png,
    predict_probs,
    prompt_id,
    random_prompt,
    serve_process,
    upload,
)

from reprogram import protocol
from reprogram.protocol import RequestedOutput

pytestmark = pytest.mark.slow

TOL = 1e-6  # the same code path: rows agree to float rounding...
STEP_TOL = 5e-3  # ...except where one 8-bit step fell the other way (see assert_same_predictions)
MAX_STEP_ROWS = 0.05


def assert_same_predictions(probs: np.ndarray, expected: np.ndarray) -> None:
    """The hosted path and this one predict alike. Programmed images are quantized to 8 bits
    (what the wire carries); a pixel that lands within one float rounding of a half step can
    round either way when the program runs on another batch size or CPU, which moves that
    image's probabilities by ~1e-4. So: the same classes everywhere, nearly every row equal to
    float rounding, and the others within a few 8-bit steps' worth."""
    diff = np.abs(probs - expected).max(axis=1)
    assert (probs.argmax(1) == expected.argmax(1)).all()
    assert (diff > TOL).mean() <= MAX_STEP_ROWS, np.sort(diff)[-10:]
    assert diff.max() < STEP_TOL


@pytest.fixture(scope="module")
def server_url(live_server: Callable[..., str], tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("served-prompts")
    return live_server("--prompts-dir", str(folder), "--log-level", "warning")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory, server_url: str) -> Path:
    return fitted_prompt(tmp_path_factory.getbasetemp(), server_url)


@pytest.fixture(scope="module")
def pngs(prompt_file: Path) -> list[bytes]:
    return [png(image) for image in held_out_split(prompt_file).images]


@pytest.fixture(scope="module")
def hosted_probs(server_url: str, prompt_file: Path, pngs: list[bytes]) -> np.ndarray:
    """Probabilities of the prompt hosted by the model server."""
    with httpx.Client(base_url=server_url, timeout=60.0) as http:
        r = upload(http, prompt_file.read_bytes())
        assert r.status_code in (200, 201), r.text
        probs, _ = predict_probs(http, r.json()["id"], pngs)
    return probs


@pytest.fixture(scope="module")
def proxy(server_url: str, prompt_file: Path) -> Iterator[ServerProcess]:
    proc = serve_process("--prompt", str(prompt_file), "--endpoint", server_url)
    proc.start()
    yield proc
    proc.stop()


def test_serve_endpoint_matches_hosted(
    proxy: ServerProcess, prompt_file: Path, pngs: list[bytes], hosted_probs: np.ndarray
) -> None:
    pid = prompt_id(prompt_file.read_bytes())
    with httpx.Client(base_url=proxy.url, timeout=60.0) as http:
        assert [p["id"] for p in http.get("/v1/prompts").json()["prompts"]] == [pid]
        probs, _ = predict_probs(http, pid, pngs)
        source = http.get("/v2/models/default").json()
    assert_same_predictions(probs, hosted_probs)
    assert source["platform"] == "reprogram-oracle"  # the API, proxied through the oracle


def test_serve_v2_infer_matches_hosted(
    proxy: ServerProcess, prompt_file: Path, hosted_probs: np.ndarray
) -> None:
    pid = prompt_id(prompt_file.read_bytes())
    images = held_out_split(prompt_file).images[:20]
    x = images.expand(-1, 3, -1, -1).contiguous().numpy()
    body, headers = protocol.encode_request(
        {"image": x}, [RequestedOutput.make("probs", binary_data=True)], binary=True,
        request_id="serve-e2e")
    r = httpx.post(f"{proxy.url}/v2/models/{pid}/infer", content=body, headers=headers,
                   timeout=60.0)
    assert r.status_code == 200, r.text
    out, resp = protocol.decode_response(r.content, r.headers)
    assert resp.id == "serve-e2e"
    assert_same_predictions(out["probs"], hosted_probs[:20])


def test_serve_local_model_and_apply_match_hosted(
    server_url: str, prompt_file: Path, pngs: list[bytes], hosted_probs: np.ndarray,
    tmp_path: Path,
) -> None:
    pid = prompt_id(prompt_file.read_bytes())
    local = serve_process("--prompt", str(prompt_file), "--model", "default")
    local.start()
    try:
        with httpx.Client(base_url=local.url, timeout=60.0) as http:
            probs, _ = predict_probs(http, pid, pngs)
    finally:
        local.stop()
    assert_same_predictions(probs, hosted_probs)
    paths = []
    for i, data in enumerate(pngs[:12]):
        path = tmp_path / f"digit{i}.png"
        path.write_bytes(data)
        paths.append(str(path))
    proc = subprocess.run([*cli_command(), "apply", "--endpoint", server_url, "--prompt",
                           str(prompt_file), *paths], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    labels = [json.loads(line)["label"] for line in proc.stdout.splitlines()]
    assert labels == [str(int(i)) for i in hosted_probs[:12].argmax(1)]


def test_serve_rejects_an_incompatible_prompt(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(random_prompt(num_source=5))
    proc = subprocess.run([*cli_command(), "serve", "--prompt", str(bad), "--model", "default",
                           "--port", "0"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 1
    assert "error" in proc.stderr and "source classes" in proc.stderr
    assert "Traceback" not in proc.stderr
