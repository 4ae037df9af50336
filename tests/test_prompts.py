"""Hosted prompts end to end: real ``reprogram-server`` processes, real HTTP, real PNGs.

A prompt is fitted with ``reprogram fit --endpoint`` against the running server, uploaded,
and applied to the held-out digits through ``/v1/prompts/{id}/predict``: its accuracy equals
what ``reprogram eval`` reports (local model and endpoint), its probabilities equal the
in-process :class:`Reprogrammer`'s, and the V2 route works with ``tritonclient.http``. Bad
uploads change nothing on disk; a restart keeps the prompt and skips broken files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prompt_support import (
    ServerProcess,
    fitted_prompt,
    held_out_split,
    listing,
    model_server,
    png,
    predict_probs,
    prompt_id,
    random_prompt,
    run_cli,
    upload,
    with_schema_version,
)

from reprogram.artifact import load_prompt
from reprogram.data import TargetDataset
from reprogram.oracles import LocalOracle
from reprogram.zoo.registry import load_model

pytestmark = pytest.mark.slow

CAP = 64 * 1024  # --max-prompt-bytes: the fitted prompt (~13 KB) fits


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prompts")


@pytest.fixture(scope="module")
def server(prompts_dir: Path) -> Iterator[ServerProcess]:
    proc = model_server("--prompts-dir", str(prompts_dir), "--max-prompt-bytes", str(CAP))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        yield client


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory, server: ServerProcess) -> Path:
    return fitted_prompt(tmp_path_factory.getbasetemp(), server.url)


@pytest.fixture(scope="module")
def test_set(prompt_file: Path) -> TargetDataset:
    return held_out_split(prompt_file)


@pytest.fixture(scope="module")
def pngs(test_set: TargetDataset) -> list[bytes]:
    return [png(image) for image in test_set.images]


@pytest.fixture(scope="module")
def hosted(server: ServerProcess, prompt_file: Path) -> str:
    """Upload the fitted prompt (201), then again (200, same id); returns the id."""
    data = prompt_file.read_bytes()
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        first = upload(http, data)
        assert first.status_code == 201, first.text
        again = upload(http, data)
    assert again.status_code == 200, again.text
    pid: str = first.json()["id"]
    assert again.json()["id"] == pid == prompt_id(data)
    return pid


@pytest.fixture(scope="module")
def hosted_probs(server: ServerProcess, hosted: str, pngs: list[bytes]) -> np.ndarray:
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        probs, preds = predict_probs(http, hosted, pngs)
    assert [p["label"] for p in preds] == [str(int(i)) for i in probs.argmax(1)]
    return probs


def test_upload_stores_the_exact_file(hosted: str, prompt_file: Path, prompts_dir: Path) -> None:
    assert listing(prompts_dir) == {f"{hosted}.safetensors": prompt_file.read_bytes()}


def test_metadata_and_list(http: httpx.Client, hosted: str, prompt_file: Path) -> None:
    prompt = load_prompt(prompt_file)
    r = http.get(f"/v1/prompts/{hosted}")
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["id"] == hosted
    assert meta["target_classes"] == list(prompt.target_classes)
    assert meta["program_kind"] == prompt.program.kind and meta["labelmap_kind"] == "linear"
    assert meta["val_accuracy"] == pytest.approx(prompt.metrics["val_accuracy"])
    assert meta["test_accuracy"] == pytest.approx(prompt.metrics["test_accuracy"])
    assert meta["source"]["weights_sha256"] == load_model().meta.weights_sha256
    assert meta["created"] and meta["bytes"] == prompt_file.stat().st_size
    assert [p["id"] for p in http.get("/v1/prompts").json()["prompts"]] == [hosted]


def test_hosted_accuracy_equals_reprogram_eval(
    server: ServerProcess, prompt_file: Path, test_set: TargetDataset, hosted_probs: np.ndarray
) -> None:
    labels = test_set.labels.numpy()
    correct = int((hosted_probs.argmax(1) == labels).sum())
    hosted_acc = round(correct / len(labels), 6)
    local = run_cli("eval", "--model", "default", "--prompt", str(prompt_file), "--data",
                    "digits")
    remote = run_cli("eval", "--endpoint", server.url, "--prompt", str(prompt_file), "--data",
                     "digits")
    assert local["images"] == remote["images"] == len(labels)
    assert hosted_acc == local["accuracy"] == remote["accuracy"]
    # the same numbers as the in-process Reprogrammer on the same uint8 images
    model = load_prompt(prompt_file).build()
    expected = model.predict_proba(test_set.images, LocalOracle(load_model())).numpy()
    assert (expected.argmax(1) == hosted_probs.argmax(1)).all()
    assert np.abs(expected - hosted_probs).max() < 1e-6


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_v2_with_tritonclient(
    server: ServerProcess, hosted: str, test_set: TargetDataset, hosted_probs: np.ndarray,
    binary: bool,
) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_model_ready(hosted)
    meta = client.get_model_metadata(hosted)
    assert meta["inputs"][0]["shape"] == [-1, 3, -1, -1]
    assert meta["outputs"][0] == {"name": "probs", "datatype": "FP32", "shape": [-1, 10]}
    assert meta["parameters"]["class_names"] == [str(i) for i in range(10)]
    x = test_set.images[:16].expand(-1, 3, -1, -1).contiguous().numpy()
    inp = triton.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("probs", binary_data=binary)
    result = client.infer(hosted, [inp], outputs=[out], model_version="1")
    probs = result.as_numpy("probs")
    assert probs.shape == (16, 10)
    assert np.abs(probs - hosted_probs[:16]).max() < 1e-6


def _expect_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    assert isinstance(r.json().get("error"), str) and r.json()["error"]


@pytest.fixture(scope="module")
def valid_bytes(prompt_file: Path) -> bytes:
    return prompt_file.read_bytes()


BAD_UPLOADS: dict[str, tuple[Callable[[bytes], bytes], int]] = {
    "not-safetensors": (lambda _: b"this is not a safetensors file\n" * 10, 400),
    "empty": (lambda _: b"", 400),
    "truncated": (lambda d: d[: len(d) // 2], 400),
    "truncated-tail": (lambda d: d[:-7], 400),
    "schema-version": (lambda d: with_schema_version(d, 99), 400),
    "input-size": (lambda _: random_prompt(frame=(64, 64)), 422),
    "class-count": (lambda _: random_prompt(num_source=5), 422),
    "weights-sha": (lambda _: random_prompt(weights_sha256="0" * 64), 422),
    "over-cap": (lambda d: d + b"\0" * CAP, 413),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_stores_nothing(
    http: httpx.Client, hosted: str, valid_bytes: bytes, prompts_dir: Path, case: str
) -> None:
    make, status = BAD_UPLOADS[case]
    before = listing(prompts_dir)
    _expect_error(upload(http, make(valid_bytes), name=f"{case}.safetensors"), status)
    assert listing(prompts_dir) == before
    assert [p["id"] for p in http.get("/v1/prompts").json()["prompts"]] == [hosted]


def test_upload_without_file_field(http: httpx.Client, prompts_dir: Path) -> None:
    before = listing(prompts_dir)
    _expect_error(http.post("/v1/prompts", files={"other": ("x", b"abc")}), 400)
    _expect_error(http.post("/v1/prompts", content=b"abc"), 400)
    assert listing(prompts_dir) == before


def test_predict_errors(http: httpx.Client, hosted: str, pngs: list[bytes]) -> None:
    one = [("files", ("a.png", pngs[0], "image/png"))]
    _expect_error(http.post("/v1/prompts/0123456789abcdef/predict", files=one), 404)
    broken = [("files", ("b.png", pngs[0][:30], "image/png"))]
    _expect_error(http.post(f"/v1/prompts/{hosted}/predict", files=broken), 400)
    text = [("files", ("c.png", b"not an image at all", "image/png"))]
    _expect_error(http.post(f"/v1/prompts/{hosted}/predict", files=text), 415)
    _expect_error(http.post(f"/v1/prompts/{hosted}/predict", files={"x": ("a", b"1")}), 400)


def test_images_of_any_size(http: httpx.Client, hosted: str, pngs: list[bytes]) -> None:
    big = png(torch.full((3, 40, 24), 200, dtype=torch.uint8))
    probs, preds = predict_probs(http, hosted, [pngs[0], big, pngs[1]])
    alone, _ = predict_probs(http, hosted, [pngs[0], pngs[1]])
    assert np.abs(probs[[0, 2]] - alone).max() < 1e-6
    assert [p["filename"] for p in preds] == ["img0.png", "img1.png", "img2.png"]


def test_delete(http: httpx.Client, hosted: str, prompts_dir: Path) -> None:
    data = random_prompt()
    r = upload(http, data)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    assert (prompts_dir / f"{pid}.safetensors").read_bytes() == data
    assert http.get(f"/v2/models/{pid}").status_code == 200
    assert http.delete(f"/v1/prompts/{pid}").json() == {"deleted": pid}
    _expect_error(http.get(f"/v1/prompts/{pid}"), 404)
    _expect_error(http.get(f"/v2/models/{pid}"), 404)
    _expect_error(http.delete(f"/v1/prompts/{pid}"), 404)
    assert not (prompts_dir / f"{pid}.safetensors").exists()
    assert [p["id"] for p in http.get("/v1/prompts").json()["prompts"]] == [hosted]


def test_non_finite_metrics_are_null(http: httpx.Client, hosted: str) -> None:
    data = random_prompt(seed=2, metrics={"val_accuracy": float("nan"), "x": [float("inf")]})
    r = upload(http, data)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    assert http.get(f"/v1/prompts/{pid}").json()["val_accuracy"] is None
    assert http.get(f"/v2/models/{pid}").status_code == 200
    assert http.delete(f"/v1/prompts/{pid}").status_code == 200


def test_restart_keeps_prompt_and_skips_broken_files(
    server: ServerProcess, hosted: str, valid_bytes: bytes, prompts_dir: Path,
    pngs: list[bytes], hosted_probs: np.ndarray,
) -> None:
    """Runs last: restarts the module's server on the same folder, with debris added."""
    (prompts_dir / "garbage.safetensors").write_bytes(b"\x00" * 100)
    (prompts_dir / "half.safetensors").write_bytes(valid_bytes[: len(valid_bytes) // 2])
    (prompts_dir / "other-model.safetensors").write_bytes(random_prompt(num_source=5))
    (prompts_dir / ".upload-crashed.tmp").write_bytes(valid_bytes[:100])  # kill -9 mid-upload
    server.restart()
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        assert [p["id"] for p in http.get("/v1/prompts").json()["prompts"]] == [hosted]
        probs, _ = predict_probs(http, hosted, pngs)
    assert np.abs(probs - hosted_probs).max() < 1e-6
    assert (probs.argmax(1) == hosted_probs.argmax(1)).all()
    assert not (prompts_dir / ".upload-crashed.tmp").exists()
    log = server.output()
    assert "skipping prompt file garbage.safetensors" in log
    assert "skipping prompt file other-model.safetensors" in log
