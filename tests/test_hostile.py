"""Hostile input, in-process: shapes, artifacts, repeated outputs, pixels, answer size, deadline.

Each class of hostile request found against a real server gets a 4xx (or a 503 at the
deadline) with ``{"error": ...}`` naming the limit, and charges nothing:

- shapes: a zero dimension beside huge ones (JSON and binary), an empty batch;
- artifacts: deeply nested safetensors headers and metadata, forgeries with a recomputed
  digest declaring absurd frames or class counts (refused before anything is built, on the
  server and on the client), NaN weights;
- work per request: the same output asked for many times, more decoded pixels than
  ``max_request_pixels`` (V2 and uploads), answers over ``max_response_bytes`` (refused
  before inference when certain, after encoding otherwise), a model busy past the request
  deadline.

What depends on the HTTP stack (header bytes, slow and broken bodies, methods, logs) is
tested against a real server process in ``test_hostile_live.py``.
"""

from __future__ import annotations

import json
import struct
import threading
import time

import numpy as np
import pytest
from ops_support import AsgiClient, infer_body
from prompt_support import png, random_prompt, resign, split_artifact

from reprogram import protocol
from reprogram.artifact import loads_prompt
from reprogram.artifact_check import MAX_BUILD_BYTES
from reprogram.errors import ArtifactError
from reprogram.zoo.registry import SourceModel
from server import Settings, create_app

INFER = "/v2/models/default/infer"

pytestmark = pytest.mark.usefixtures("one_thread")


def make(model: SourceModel, **opts: object) -> AsgiClient:
    return AsgiClient(create_app(Settings(**opts), model=model))  # type: ignore[arg-type]


def _error(r: object, status: int, *needles: str) -> str:
    assert r.status_code == status, r.text  # type: ignore[attr-defined]
    body = r.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    for needle in needles:
        assert needle in body["error"], body["error"]
    return str(body["error"])


def _binary(header: dict[str, object], tail: bytes = b"") -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + tail, {protocol.HEADER_LENGTH: str(len(head))}


def test_zero_size_shapes_with_huge_dimensions(model: SourceModel) -> None:
    c = make(model)
    for shape in ([2**63, 0, 32, 32], [0, 2**40, 2**40, 3], [2**31, 0, 32, 32]):
        entry = {"name": "image", "shape": shape, "datatype": "UINT8"}
        r = c.post(INFER, content=json.dumps({"inputs": [{**entry, "data": []}]}))
        _error(r, 400, "shape")
        body, headers = _binary({"inputs": [{**entry, "parameters": {"binary_data_size": 0}}]})
        _error(c.post(INFER, content=body, headers=headers), 400, "shape")
    empty = {"name": "image", "shape": [0, 3, 32, 32], "datatype": "UINT8", "data": []}
    _error(c.post(INFER, content=json.dumps({"inputs": [empty]})), 400, "at least one image")
    assert c.get("/v1/usage").json()["images"] == 0


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_deeply_nested_artifacts_are_refused(model: SourceModel) -> None:
    c = make(model)
    good = random_prompt(seed=3)
    meta, tensors = split_artifact(good)
    n = struct.unpack("<Q", good[:8])[0]
    head = good[8 : 8 + n].decode().rstrip()
    raw = (head[:-1] + ', "x": ' + _deep(100_000) + "}").encode()
    nested_header = struct.pack("<Q", len(raw)) + raw + good[8 + n :]
    text = json.dumps({**meta, "config": "CONFIG"}).replace('"CONFIG"', _deep(100_000))
    for data in (nested_header, _with_raw_meta(text, tensors)):
        r = c.post("/v1/prompts", files={"file": ("p.safetensors", data)})
        _error(r, 400, "nested at most 64 levels deep")
    assert c.post("/v1/prompts", files={"file": ("p", good)}).status_code == 201


def _with_raw_meta(text: str, tensors: dict[str, object]) -> bytes:
    from safetensors.torch import save as st_save

    return st_save(tensors, metadata={"reprogram": text})  # type: ignore[arg-type]


def _forge(program: dict[str, object] | None = None, labelmap: dict[str, object] | None = None,
           classes: int | None = None) -> bytes:
    meta, tensors = split_artifact(random_prompt(seed=4))
    meta["program"].update(program or {})
    meta["labelmap"].update(labelmap or {})
    if classes is not None:
        meta["target_classes"] = [f"c{i}" for i in range(classes)]
        meta["labelmap"]["num_target"] = classes
    return resign(meta, tensors)


FORGERIES = {
    "frame of 10^6 x 10^6": _forge({"frame_size": [10**6, 10**6], "kind": "full"}),
    "frame of 4096 x 4096": _forge({"frame_size": [4096, 4096], "kind": "full"}),
    "10^5 source classes": _forge(labelmap={"num_source": 10**5}),
    "200,000 target classes": _forge(classes=200_000),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_geometry_is_refused_before_anything_is_built(model: SourceModel,
                                                            name: str) -> None:
    r = make(model).post("/v1/prompts", files={"file": ("p", FORGERIES[name])})
    assert r.status_code in (400, 422), r.text
    if "source" in name or "4096" in name:
        _error(r, 422, "does not fit the served model")


def test_forged_geometry_on_the_client_is_bounded() -> None:
    with pytest.raises(ArtifactError, match=f"at most {MAX_BUILD_BYTES} bytes once built"):
        loads_prompt(_forge({"frame_size": [60_000, 60_000], "kind": "full"}))
    with pytest.raises(ArtifactError, match="at most 65536 pixels a side"):
        loads_prompt(FORGERIES["frame of 10^6 x 10^6"])
    with pytest.raises(ArtifactError, match="at most 100000 source and target classes"):
        loads_prompt(FORGERIES["200,000 target classes"])


def test_nan_weights_are_refused(model: SourceModel) -> None:
    meta, tensors = split_artifact(random_prompt(seed=6))
    theta = tensors["program.theta"].clone()
    theta[0, 0, 0] = float("nan")
    r = make(model).post("/v1/prompts", files={"file": ("p", resign(
        meta, {**tensors, "program.theta": theta}))})
    _error(r, 400, "finite values in tensor program.theta")


def test_each_output_once(model: SourceModel) -> None:
    c = make(model)
    body, headers = infer_body(1)
    n = int(headers[protocol.HEADER_LENGTH])
    request = json.loads(body[:n])
    request["outputs"] = [{"name": "probs", "parameters": {"classification": 10}}] * 3000
    head = json.dumps(request).encode()
    r = c.post(INFER, content=head + body[n:], headers={protocol.HEADER_LENGTH: str(len(head))})
    _error(r, 400, "'probs' 3000 times")
    assert c.get("/v1/usage").json()["images"] == 0


def test_pixels_per_request(model: SourceModel) -> None:
    c = make(model, max_request_pixels=10_000, max_image_pixels=5_000)
    pid = c.post("/v1/prompts", files={"file": ("p", random_prompt(seed=7))}).json()["id"]
    big = np.zeros((3, 3, 64, 64), np.uint8)  # 12,288 pixels
    body, headers = protocol.encode_request({"image": big}, binary=True)
    _error(c.post(f"/v2/models/{pid}/infer", content=body, headers=headers), 413,
           "at most 10000 decoded pixels per request (--max-request-pixels)")
    body, headers = protocol.encode_request({"image": big[:2]}, binary=True)
    assert c.post(f"/v2/models/{pid}/infer", content=body, headers=headers).status_code == 200
    files = [("files", (f"{i}.png", png(big[0]), "image/png")) for i in range(3)]
    for path in ("/v1/models/default/predict", f"/v1/prompts/{pid}/predict"):
        _error(c.post(path, files=files), 413, "--max-request-pixels", "'2.png' (64x64)")
        assert c.post(path, files=files[:2]).status_code == 200
    _error(c.post(f"/v1/prompts/{pid}/predict", files=[("files", ("a.png", png(
        np.zeros((3, 80, 80), np.uint8)), "image/png"))]), 413, "--max-image-pixels")
    assert c.get("/v1/usage").json()["images"] == 2 + 2 + 2


def test_answer_size(model: SourceModel) -> None:
    c = make(model, max_response_bytes=1000)
    many = protocol.encode_request({"image": np.zeros((100, 3, 32, 32), np.uint8)},
                                   binary=True, binary_output=False)
    _error(c.post(INFER, content=many[0], headers=many[1]), 413,
           "at most 1000 bytes (--max-response-bytes)", "at least 2000")
    assert c.get("/v1/usage").json()["images"] == 0  # refused before inference
    some = protocol.encode_request({"image": np.zeros((30, 3, 32, 32), np.uint8)},
                                   binary=True, binary_output=False)
    text = _error(c.post(INFER, content=some[0], headers=some[1]), 413, "--max-response-bytes")
    assert "at least" not in text  # refused after encoding, and refunded
    assert c.get("/v1/usage").json()["images"] == 0
    few = protocol.encode_request({"image": np.zeros((4, 3, 32, 32), np.uint8)}, binary=True)
    assert c.post(INFER, content=few[0], headers=few[1]).status_code == 200


def test_deadline_while_the_model_is_busy(model: SourceModel) -> None:
    app = create_app(Settings(request_timeout=1.5), model=model)
    c = AsgiClient(app)
    runner = app.state.registry.get("default")
    busy, done = threading.Event(), threading.Event()

    def occupy() -> None:  # fault injection: another request holds the model (up to 8 s)
        with runner._lock:
            busy.set()
            done.wait(8.0)

    worker = threading.Thread(target=occupy)
    worker.start()
    busy.wait()
    body, headers = infer_body(2)
    start = time.perf_counter()
    r = c.post(INFER, content=body, headers=headers)
    waited = time.perf_counter() - start
    done.set()
    worker.join()
    # (on a very busy machine the deadline may pass before the request reaches the lock)
    _error(r, 503, "within 1.5 s (--request-timeout)")
    assert r.headers["retry-after"] == "1" and waited < 6.0  # did not wait for the model
    assert c.get("/v1/usage").json()["images"] == 0
    assert c.post(INFER, content=body, headers=headers).status_code == 200
