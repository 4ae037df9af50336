"""Integration: ``reprogram-server`` as a real process on a loopback port.

Queried with httpx (V2 JSON, V2 binary, /v1 multipart PNG) and with ``tritonclient.http``;
the probabilities must equal the in-process model's on the same uint8 images.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from reprogram import protocol
from reprogram.protocol import RequestedOutput
from reprogram.zoo.registry import load_model
from reprogram.zoo.shapes import generate_shapes

pytestmark = pytest.mark.slow

TOL = 1e-5


@pytest.fixture(scope="module")
def base_url(live_server: Callable[..., str]) -> str:
    return live_server("--max-batch", "8", "--max-body-bytes", "1000000", "--log-level",
                       "warning")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return generate_shapes(20, seed=3)[0].numpy()


@pytest.fixture(scope="module")
def expected(images: np.ndarray) -> np.ndarray:
    model = load_model()
    with torch.inference_mode():
        x = torch.from_numpy(images).to(torch.float32) / 255.0
        probs: np.ndarray = torch.softmax(model.module(x), dim=1).numpy()
    return probs


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        yield client


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_v2_matches_in_process(
    http: httpx.Client, images: np.ndarray, expected: np.ndarray, binary: bool
) -> None:
    body, headers = protocol.encode_request(
        {"image": images}, [RequestedOutput.make("probs", binary_data=binary)], binary=binary,
        request_id=f"live-{binary}",
    )
    r = http.post("/v2/models/default/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    out, resp = protocol.decode_response(r.content, r.headers)
    assert resp.id == f"live-{binary}"
    assert out["probs"].shape == (20, 10)
    assert np.abs(out["probs"] - expected).max() < TOL


def test_v1_png_matches_in_process(
    http: httpx.Client, images: np.ndarray, expected: np.ndarray
) -> None:
    files = []
    for i, im in enumerate(images[:5]):
        buf = io.BytesIO()
        Image.fromarray(im.transpose(1, 2, 0)).save(buf, format="PNG")
        files.append(("files", (f"img{i}.png", buf.getvalue(), "image/png")))
    r = http.post("/v1/models/default/predict", files=files, params={"top_k": 10})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [f"img{i}.png" for i in range(5)]
    for pred, want in zip(preds, expected[:5], strict=True):
        got = np.zeros(10)
        for entry in pred["top"]:
            got[entry["index"]] = entry["score"]
        assert np.abs(got - want).max() < TOL
        assert pred["top"][0]["index"] == int(want.argmax())


def test_bad_input_then_good_over_the_wire(http: httpx.Client, images: np.ndarray) -> None:
    r = http.post("/v2/models/default/infer", content=b"{not json")
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = http.post("/v1/models/default/predict",
                  files=[("files", ("x.txt", b"plain text", "text/plain"))])
    assert r.status_code == 415 and "error" in r.json()
    body, headers = protocol.encode_request({"image": images[:2]}, binary=True)
    r = http.post("/v2/models/default/infer", content=body[:-1], headers=headers)
    assert r.status_code == 400 and "shorter" in r.json()["error"]
    r = http.post("/v2/models/default/infer", content=body, headers=headers)
    assert r.status_code == 200


def test_body_over_cap_from_content_length(base_url: str, images: np.ndarray) -> None:
    big = np.zeros((400, 3, 32, 32), np.uint8)  # 1.2 MB > 1 MB cap
    body, headers = protocol.encode_request({"image": big}, binary=True)
    try:
        r = httpx.post(f"{base_url}/v2/models/default/infer", content=body, headers=headers,
                       timeout=30.0)
    except httpx.TransportError:  # the server may close before the upload ends
        pass
    else:
        assert r.status_code == 413 and "at most 1000000 bytes" in r.json()["error"]
    assert httpx.get(f"{base_url}/v2/health/ready", timeout=10.0).status_code == 200


def test_tritonclient(base_url: str, images: np.ndarray, expected: np.ndarray) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(url=base_url.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("default")
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        meta = client.get_model_metadata("default")
        assert meta["inputs"][0]["name"] == "image" and meta["inputs"][0]["datatype"] == "UINT8"
        assert meta["outputs"][0]["name"] == "probs"
        names = meta["parameters"]["class_names"]
        x = images[:6]
        for binary in (True, False):
            inp = httpclient.InferInput("image", list(x.shape), "UINT8")
            inp.set_data_from_numpy(x, binary_data=binary)
            result = client.infer(
                "default", [inp], request_id="t1",
                outputs=[httpclient.InferRequestedOutput("probs", binary_data=binary)],
            )
            assert result.get_response()["id"] == "t1"
            assert np.abs(result.as_numpy("probs") - expected[:6]).max() < TOL
            result = client.infer(
                "default", [inp], model_version="1",
                outputs=[httpclient.InferRequestedOutput("probs", binary_data=binary,
                                                         class_count=3)],
            )
            top = result.as_numpy("probs")
            assert top.shape == (6, 3)
            for row, want in zip(top, expected[:6], strict=True):
                fields = [(s.decode() if isinstance(s, bytes) else s).split(":") for s in row]
                order = np.argsort(-want)[:3]
                assert [int(f[1]) for f in fields] == order.tolist()
                assert [f[2] for f in fields] == [names[i] for i in order]
                assert np.abs(np.array([float(f[0]) for f in fields]) - want[order]).max() < TOL
        # no outputs listed: tritonclient asks for binary_data_output
        inp = httpclient.InferInput("image", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        result = client.infer("default", [inp])
        assert np.abs(result.as_numpy("probs") - expected[:6]).max() < TOL
        with pytest.raises(Exception, match="unknown model"):
            client.get_model_metadata("nope")
    finally:
        client.close()
