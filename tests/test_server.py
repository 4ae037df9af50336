"""The server app in-process (httpx over ASGI): V2 and /v1 routes, output kinds, bad input.

Every bad input gets its stated 4xx with ``{"error": ...}``, then a good request succeeds on
the same app.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from ops_support import AsgiClient
from PIL import Image

from reprogram import codecs, protocol
from reprogram.protocol import RequestedOutput
from reprogram.zoo.registry import SourceModel
from reprogram.zoo.shapes import generate_shapes
from server import Settings, create_app
from server import app as app_module
from server.main import main, parse_settings

H = W = 32


class Client(AsgiClient):
    """:class:`AsgiClient` (no network) with a V2 ``infer`` helper; the peer address is
    ``ASGITransport``'s own default."""

    def __init__(self, app: FastAPI) -> None:
        super().__init__(app, client=("127.0.0.1", 123))

    def infer(
        self,
        x: np.ndarray,
        *,
        model: str = "default",
        binary: bool = True,
        outputs: list[RequestedOutput] | None = None,
        request_id: str | None = None,
    ) -> tuple[dict[str, np.ndarray], protocol.InferenceResponse]:
        body, headers = protocol.encode_request(
            {"image": x}, outputs, binary=binary, binary_output=binary, request_id=request_id
        )
        r = self.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        return protocol.decode_response(r.content, r.headers)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return generate_shapes(10, seed=1)[0].numpy()


def expected_logits(model: SourceModel, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out: np.ndarray = model.module(torch.from_numpy(x).float() / 255.0).numpy()
        return out


def make_client(model: SourceModel, **settings: Any) -> Client:
    opts: dict[str, Any] = {"max_batch": 4, "max_images_per_request": 16}
    opts.update(settings)
    return Client(create_app(Settings(**opts), model=model))


@pytest.fixture(scope="module")
def client(model: SourceModel) -> Client:
    return make_client(model, max_body_bytes=200_000, max_image_pixels=64 * 64)


def test_max_batch_size_fits_the_pixel_limit(model: SourceModel, images: np.ndarray) -> None:
    """A client that sends max_batch_size images is never refused for size: the advertised
    batch also fits --max-request-pixels; one more image is a 413."""
    client = make_client(model, max_request_pixels=7 * H * W)
    assert client.get("/v2/models/default").json()["parameters"]["max_batch_size"] == 7
    out, _ = client.infer(images[:7])
    assert out["probs"].shape == (7, 10)
    body, headers = protocol.encode_request({"image": images[:8]}, None, binary=True)
    r = client.post("/v2/models/default/infer", content=body, headers=headers)
    assert r.status_code == 413 and "pixels" in r.json()["error"]


def good(client: Client, x: np.ndarray) -> None:
    """A good request still succeeds."""
    out, _ = client.infer(x[:2])
    assert out["probs"].shape == (2, 10)


# ------------------------------------------------------------------------------------------
# metadata and health


def test_health_and_metadata(client: Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    server = client.get("/v2").json()
    assert server["name"] == "reprogram"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    meta = client.get("/v2/models/default").json()
    assert meta["inputs"] == [
        {"name": "image", "datatype": "UINT8", "shape": [-1, 3, H, W],
         "parameters": {"also_accepts": ["FP32"]}}
    ]
    assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]
    params = meta["parameters"]
    assert params["output_kind"] == "probs" and len(params["class_names"]) == 10
    assert params["input_size"] == [H, W] and params["max_batch_size"] == 16
    assert len(params["weights_sha256"]) == 64 and len(params["mean"]) == 3
    assert client.get("/v2/models/default/versions/1").json() == meta
    assert client.get("/v2/models/default/ready").json() == {"name": "default", "ready": True}
    assert client.get("/v2/models/default/versions/1/ready").status_code == 200
    info = client.get("/v1/models/default").json()
    assert info["class_names"] == params["class_names"] and info["output_kind"] == "probs"
    assert client.get("/v1/models").json() == {"models": ["default"]}
    assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_in_process_model(
    client: Client, model: SourceModel, images: np.ndarray, binary: bool
) -> None:
    out, resp = client.infer(images, binary=binary, request_id="req-7")
    assert resp.id == "req-7" and resp.model_name == "default" and resp.model_version == "1"
    want = torch.softmax(torch.from_numpy(expected_logits(model, images)), 1).numpy()
    assert np.abs(out["probs"] - want).max() < 1e-5  # 10 images over max_batch=4 passes


def test_infer_fp32_nested_json_and_versions(
    client: Client, model: SourceModel, images: np.ndarray
) -> None:
    x = images[:3]
    out_u8, _ = client.infer(x)
    body = {
        "inputs": [{"name": "image", "shape": [3, 3, H, W], "datatype": "FP32",
                    "data": (x.astype(np.float32) / 255.0).tolist()}],
    }
    r = client.post("/v2/models/default/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    out, resp = protocol.decode_response(r.content, r.headers)
    assert resp.id is None
    assert np.abs(out["probs"] - out_u8["probs"]).max() < 1e-6


def test_classification_output(client: Client, images: np.ndarray) -> None:
    x = images[:4]
    probs, _ = client.infer(x)
    names = client.get("/v2/models/default").json()["parameters"]["class_names"]
    for binary in (True, False):
        out, _ = client.infer(x, outputs=[RequestedOutput.make("probs", binary_data=binary,
                                                                 class_count=3)])
        assert out["probs"].shape == (4, 3)
        rows = codecs.decode_classification(out["probs"])
        for row, p in zip(rows, probs["probs"], strict=True):
            order = np.argsort(-p)[:3]
            assert [i for _, i, _ in row] == order.tolist()
            assert [label for _, _, label in row] == [names[i] for i in order]
            np.testing.assert_allclose([s for s, _, _ in row], p[order], rtol=1e-6)


def test_gzip_request_body(client: Client, images: np.ndarray) -> None:
    body, headers = protocol.encode_request({"image": images[:2]}, binary=True)
    headers["Content-Encoding"] = "gzip"
    r = client.post("/v2/models/default/infer", content=gzip.compress(body), headers=headers)
    assert r.status_code == 200, r.text
    headers["Content-Encoding"] = "br"
    r = client.post("/v2/models/default/infer", content=body, headers=headers)
    assert r.status_code == 400 and "Content-Encoding" in r.json()["error"]
    headers["Content-Encoding"] = "gzip"
    r = client.post("/v2/models/default/infer", content=body, headers=headers)
    assert r.status_code == 400 and "gzip" in r.json()["error"]


# ------------------------------------------------------------------------------------------
# output kinds


@pytest.mark.parametrize("kind", ["logits", "topk:3", "label"])
def test_output_kinds(model: SourceModel, images: np.ndarray, kind: str) -> None:
    c = make_client(model, output=kind)
    meta = c.get("/v2/models/default").json()
    assert meta["parameters"]["output_kind"] == kind
    logits = expected_logits(model, images)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    name = meta["outputs"][0]["name"]
    out, _ = c.infer(images)
    got = out[name]
    if kind == "logits":
        assert meta["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
        assert np.abs(got - logits).max() < 1e-4
    elif kind == "topk:3":
        assert meta["outputs"][0] == {"name": "probs", "datatype": "FP32", "shape": [-1, 10]}
        assert ((got > 0).sum(1) == 3).all()
        top = np.argsort(-probs, 1)[:, :3]
        np.testing.assert_allclose(np.take_along_axis(got, top, 1),
                                   np.take_along_axis(probs, top, 1), atol=1e-5)
        cls, _ = c.infer(images, outputs=[RequestedOutput.make("probs", class_count=5)])
        assert cls["probs"].shape == (10, 3)  # never more than the operator's K
    else:
        assert meta["outputs"][0] == {"name": "label", "datatype": "INT64", "shape": [-1]}
        assert got.dtype == np.int64 and got.tolist() == probs.argmax(1).tolist()
        cls, _ = c.infer(images, outputs=[RequestedOutput.make("label", class_count=3)])
        rows = codecs.decode_classification(cls["label"])
        assert [[(s, i) for s, i, _ in row] for row in rows] == [[(1.0, int(i))] for i in got]
    files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images[:2])]
    pred = c.post("/v1/models/default/predict?top_k=4", files=files).json()
    tops = [p["top"] for p in pred["predictions"]]
    assert pred["output_kind"] == kind
    if kind == "label":
        assert [[t["score"] for t in top] for top in tops] == [[None], [None]]
    else:
        assert [len(top) for top in tops] == ([3, 3] if kind == "topk:3" else [4, 4])
    assert [top[0]["index"] for top in tops] == probs[:2].argmax(1).tolist()


def test_output_kind_validation() -> None:
    for bad in ("topk:0", "topk:x", "topk", "probs:3", "softmax"):
        with pytest.raises(ValueError, match="expected"):
            Settings(output=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        Settings(max_batch=0)


# ------------------------------------------------------------------------------------------
# bad input: every case gets its 4xx, then a good request succeeds


def _tensor(x: np.ndarray, name: str = "image") -> bytes:
    body, _ = protocol.encode_request({name: x}, binary=False)
    return body


def _post_error(c: Client, url: str, status: int, match: str, **kwargs: Any) -> None:
    r = c.post(url, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert match in error, error


BAD_JSON_CASES = [
    ("malformed", b'{"inputs": [', "malformed JSON"),
    ("not-object", b"[]", "JSON object"),
    ("no-inputs", b'{"id": "x"}', "inputs"),
    ("name", _tensor(np.zeros((1, 3, H, W), np.uint8), "pixels"), "named 'image'"),
    ("datatype", _tensor(np.zeros((1, 3, H, W), np.int64)), "UINT8"),
    ("rank", _tensor(np.zeros((3, H, W), np.uint8)), "rank 4"),
    ("channels", _tensor(np.zeros((1, 1, H, W), np.uint8)), "3 channels"),
    ("spatial", _tensor(np.zeros((1, 3, 16, 16), np.uint8)), "spatial size 32x32"),
    ("empty", _tensor(np.zeros((0, 3, H, W), np.uint8)), "empty batch"),
    ("length", json.dumps({"inputs": [{"name": "image", "shape": [1, 3, H, W],
                                       "datatype": "UINT8", "data": [0] * 10}]}).encode(),
     "expected 3072 elements"),
    ("range-u8", json.dumps({"inputs": [{"name": "image", "shape": [1, 3, H, W],
                                         "datatype": "UINT8", "data": [300] * 3072}]}).encode(),
     "[0, 255]"),
    ("nan-json", json.dumps({"inputs": [{"name": "image", "shape": [1, 3, H, W],
                                         "datatype": "FP32", "data": [float("nan")] * 3072}]}
                            ).encode(), "NaN or Inf"),
    ("inf-json", json.dumps({"inputs": [{"name": "image", "shape": [1, 3, H, W],
                                         "datatype": "FP32", "data": [float("inf")] * 3072}]}
                            ).encode(), "NaN or Inf"),
    ("fp32-range-high", _tensor(np.full((1, 3, H, W), 1.5, np.float32)), "[0, 1]"),
    ("fp32-range-low", _tensor(np.full((1, 3, H, W), -0.01, np.float32)), "[0, 1]"),
    ("output-name", json.dumps({"inputs": [{"name": "image", "shape": [1, 3, H, W],
                                            "datatype": "UINT8", "data": [0] * 3072}],
                                "outputs": [{"name": "scores"}]}).encode(), "output name"),
    ("classification", json.dumps({"inputs": [{"name": "image", "shape": [1, 3, H, W],
                                               "datatype": "UINT8", "data": [0] * 3072}],
                                   "outputs": [{"name": "probs", "parameters":
                                                {"classification": "3"}}]}).encode(),
     "classification"),
    ("binary-flag", json.dumps({"inputs": [{"name": "image", "shape": [1, 3, H, W],
                                            "datatype": "UINT8", "data": [0] * 3072}],
                                "parameters": {"binary_data_output": "yes"}}).encode(),
     "boolean"),
]


@pytest.mark.parametrize(("case", "body", "match"), BAD_JSON_CASES, ids=[c[0] for c in
                                                                          BAD_JSON_CASES])
def test_bad_json_requests(
    client: Client, images: np.ndarray, case: str, body: bytes, match: str
) -> None:
    _post_error(client, "/v2/models/default/infer", 400, match, content=body,
                headers={"Content-Type": "application/json"})
    good(client, images)


def test_unknown_model_version_and_route(client: Client, images: np.ndarray) -> None:
    body = _tensor(images[:1])
    _post_error(client, "/v2/models/nope/infer", 404, "unknown model 'nope'", content=body)
    _post_error(client, "/v2/models/default/versions/9/infer", 404, "unknown version",
                content=body)
    for url in ("/v2/models/nope", "/v2/models/nope/ready", "/v1/models/nope", "/v2/nothing"):
        r = client.get(url)
        assert r.status_code == 404 and "error" in r.json(), url
    r = client.get("/v2/models/default/infer")
    assert r.status_code == 405 and "error" in r.json()
    _post_error(client, "/v1/models/nope/predict", 404, "unknown model", files=[
        ("files", ("a.png", png(images[0]), "image/png"))])
    good(client, images)


def test_bad_binary_framing(client: Client, images: np.ndarray) -> None:
    body, headers = protocol.encode_request({"image": images[:2]}, binary=True)
    url = "/v2/models/default/infer"
    _post_error(client, url, 400, "shorter than announced", content=body[:-7], headers=headers)
    _post_error(client, url, 400, "longer than announced", content=body + b"\0", headers=headers)
    for bad in ("abc", "-3", "0", str(len(body) + 1), "1e3"):
        _post_error(client, url, 400, protocol.HEADER_LENGTH, content=body,
                    headers={protocol.HEADER_LENGTH: bad})
    _post_error(client, url, 400, "malformed JSON", content=body)  # header missing
    nan = np.full((1, 3, H, W), np.nan, np.float32)
    body, headers = protocol.encode_request({"image": nan}, binary=True)
    _post_error(client, url, 400, "NaN or Inf", content=body, headers=headers)
    good(client, images)


def test_caps(client: Client, images: np.ndarray) -> None:
    url = "/v2/models/default/infer"
    many = np.zeros((17, 3, H, W), np.uint8)
    body, headers = protocol.encode_request({"image": many}, binary=True)
    _post_error(client, url, 413, "at most 16 images", content=body, headers=headers)
    big = np.zeros((70, 3, H, W), np.uint8)  # 215 kB > 200 kB body cap
    body, headers = protocol.encode_request({"image": big}, binary=True)
    _post_error(client, url, 413, "at most 200000 bytes", content=body, headers=headers)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
        for i in range(0, len(body), 16384):
            yield body[i : i + 16384]

    _post_error(client, url, 413, "at most 200000 bytes", content=chunks(), headers=headers)
    _post_error(client, url, 400, "Content-Length", content=b"{}",
                headers={"Content-Length": "x"})
    files = [("files", ("big.png", png(np.zeros((3, 80, 80), np.uint8)), "image/png"))]
    _post_error(client, "/v1/models/default/predict", 413, "pixels", files=files)
    good(client, images)


def png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x.transpose(1, 2, 0)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_v1_predict(client: Client, model: SourceModel, images: np.ndarray) -> None:
    files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images[:3])]
    # a larger JPEG is resized to 32x32
    big = np.asarray(Image.fromarray(images[3].transpose(1, 2, 0)).resize((64, 48)))
    files.append(("files", ("big.jpg", jpeg(big.transpose(2, 0, 1)), "image/jpeg")))
    r = client.post("/v1/models/default/predict", files=files, params={"top_k": 3})
    assert r.status_code == 200, r.text
    pred = r.json()
    assert pred["model"] == "default"
    assert [p["filename"] for p in pred["predictions"]] == ["0.png", "1.png", "2.png", "big.jpg"]
    probs = torch.softmax(torch.from_numpy(expected_logits(model, images[:3])), 1).numpy()
    names = client.get("/v1/models/default").json()["class_names"]
    for p, want in zip(pred["predictions"], probs, strict=False):
        order = np.argsort(-want)[:3]
        assert [t["index"] for t in p["top"]] == order.tolist()
        assert [t["label"] for t in p["top"]] == [names[i] for i in order]
        assert np.abs(np.array([t["score"] for t in p["top"]]) - want[order]).max() < 1e-5
    assert len(pred["predictions"][3]["top"]) == 3


def test_v1_bad_uploads(client: Client, images: np.ndarray) -> None:
    url = "/v1/models/default/predict"
    data = png(images[0])
    cases = [
        (415, "unrecognised", [("files", ("a.txt", b"hello, not an image", "text/plain"))]),
        (415, "unrecognised", [("files", ("a.gif", _gif(), "image/gif"))]),
        (400, "truncated", [("files", ("t.png", data[: len(data) // 2], "image/png"))]),
        (400, "truncated", [("files", ("t.jpg", jpeg(images[0])[:300], "image/jpeg"))]),
        (400, "broken", [("files", ("b.png", data[:16] + b"\xff" * 64, "image/png"))]),
        (400, "empty file", [("files", ("e.png", b"", "image/png"))]),
        (400, "field 'files'", [("other", ("a.png", data, "image/png"))]),
    ]
    for status, match, files in cases:
        _post_error(client, url, status, match, files=files)
    _post_error(client, url, 400, "text value", data={"files": "abc"}, files=[
        ("x", ("a.png", data, "image/png"))])
    _post_error(client, url, 400, "multipart/form-data", content=b"{}",
                headers={"Content-Type": "application/json"})
    _post_error(client, url, 422, "top_k", params={"top_k": 0}, files=[
        ("files", ("a.png", data, "image/png"))])
    r = client.post(url, files=[("files", ("ok.png", data, "image/png"))])
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top"]) == 5
    good(client, images)


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="GIF")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# concurrency, readiness, CLI


def test_concurrent_requests_are_deterministic(client: Client, images: np.ndarray) -> None:
    want, _ = client.infer(images)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(3):
                out, _ = client.infer(images)
                results.append(out["probs"])
        except BaseException as exc:  # report in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    for got in results:
        np.testing.assert_array_equal(got, want["probs"])


@pytest.fixture
def gated_loader(
    monkeypatch: pytest.MonkeyPatch, model: SourceModel
) -> Iterator[tuple[threading.Event, list[Exception]]]:
    gate = threading.Event()
    failure: list[Exception] = []

    def slow_load(settings: Settings) -> SourceModel:
        gate.wait(10)
        if failure:
            raise failure[0]
        return model

    monkeypatch.setattr(app_module, "load_source", slow_load)
    yield gate, failure
    gate.set()


def _lifespan_run(app: FastAPI, gate: threading.Event) -> list[tuple[str, int, Any]]:
    seen: list[tuple[str, int, Any]] = []

    async def go() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                for url in ("/v2/health/live", "/v2/health/ready", "/v2/models/default",
                            "/v2/models/default/ready"):
                    r = await c.get(url)
                    seen.append((url, r.status_code, r.json()))
                gate.set()
                for _ in range(200):
                    await asyncio.sleep(0.02)
                    r = await c.get("/v2/models/default")
                    if "still loading" not in r.text:
                        break
                r = await c.get("/v2/health/ready")
                seen.append(("after", r.status_code, r.json()))
                r = await c.get("/v2/models/default")
                seen.append(("model", r.status_code, r.json()))

    asyncio.run(go())
    return seen


def test_ready_only_after_lifespan_load(
    gated_loader: tuple[threading.Event, list[Exception]],
) -> None:
    gate, _ = gated_loader
    seen = _lifespan_run(create_app(Settings()), gate)
    assert seen[0][1] == 200
    assert seen[1][1] == 503 and seen[1][2]["ready"] is False
    assert "loading" in seen[1][2]["reason"]
    assert seen[2][1] == 503 and "still loading" in seen[2][2]["error"]
    assert seen[3][1:] == (503, {"name": "default", "ready": False})
    assert seen[4][1:] == (200, {"ready": True})
    assert seen[5][1] == 200 and seen[5][2]["name"] == "default"


def test_failed_load_stays_unready(
    gated_loader: tuple[threading.Event, list[Exception]],
) -> None:
    gate, failure = gated_loader
    from reprogram.errors import ModelError

    failure.append(ModelError("expected weights, got garbage"))
    seen = _lifespan_run(create_app(Settings()), gate)
    assert seen[4][1] == 503
    assert seen[5][1] == 503 and "failed to load: expected weights" in seen[5][2]["error"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--output", "topk:0"],
        ["--max-batch", "0"],
        ["--model", "nope"],
        ["--weights", "/nonexistent/w.safetensors"],
        ["--class-names", "/nonexistent/names.txt", "--model", "torchvision:resnet18"],
        ["--name", "a/b"],
    ],
)
def test_cli_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("reprogram-server: error: expected") or "cannot read" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--port", "abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value" in err


# ------------------------------------------------------------------------------------------
# Server-Timing


@pytest.mark.parametrize("enabled", [True, False])
def test_server_timing_header_can_be_turned_off(model: SourceModel, images: np.ndarray,
                                                enabled: bool) -> None:
    c = make_client(model, server_timing=enabled)
    body, headers = protocol.encode_request({"image": images[:3]}, binary=True)
    r = c.post("/v2/models/default/infer", content=body, headers=headers)
    assert r.status_code == 200
    if enabled:
        metrics = [m.strip().split(";") for m in r.headers["server-timing"].split(",")]
        assert [m[0] for m in metrics] == ["decode", "forward", "encode"]
        assert all(m[1].startswith("dur=") and float(m[1][4:]) >= 0 for m in metrics)
    else:
        assert "server-timing" not in r.headers
    bad = c.post("/v2/models/default/infer", content=b"{",
                 headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "server-timing" not in bad.headers


def test_no_server_timing_flag() -> None:
    assert parse_settings([]).server_timing is True
    assert parse_settings(["--no-server-timing"]).server_timing is False
