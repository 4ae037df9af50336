"""Tensor codecs of the Open Inference Protocol: JSON, binary extension, classification."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reprogram import codecs, protocol
from reprogram.errors import ProtocolError
from reprogram.protocol import OutputTensor, RequestedOutput

RNG = np.random.default_rng(0)

ARRAYS = {
    "BOOL": RNG.integers(0, 2, (2, 3)).astype(bool),
    "UINT8": RNG.integers(0, 256, (2, 3, 4, 4), dtype=np.uint8),
    "INT8": RNG.integers(-128, 128, (5,), dtype=np.int8),
    "UINT16": RNG.integers(0, 2**16, (3,), dtype=np.uint16),
    "INT32": RNG.integers(-(2**31), 2**31, (2, 2), dtype=np.int32),
    "INT64": np.array([-(2**63), 2**63 - 1, 0], dtype=np.int64),
    "UINT64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "FP16": RNG.random((3, 2)).astype(np.float16),
    "FP32": RNG.random((2, 5)).astype(np.float32),
    "FP64": RNG.random((4,)),
}


@pytest.mark.parametrize("datatype", sorted(ARRAYS))
@pytest.mark.parametrize("binary", [False, True])
def test_request_roundtrip(datatype: str, binary: bool) -> None:
    x = ARRAYS[datatype]
    body, headers = protocol.encode_request({"x": x}, binary=binary, request_id="r1")
    assert (protocol.HEADER_LENGTH in headers) == binary
    req, tensors = protocol.decode_request(body, headers)
    assert req.id == "r1"
    assert req.inputs[0].datatype == datatype
    np.testing.assert_array_equal(tensors["x"], x)
    assert tensors["x"].dtype == x.dtype.newbyteorder("<")
    assert tensors["x"].flags.writeable


@pytest.mark.parametrize("binary", [False, True])
def test_response_roundtrip_with_bytes_and_empty(binary: bool) -> None:
    words = np.array([[b"a:1", "é".encode()], [b"", b"xyz"]], dtype=object)
    probs = RNG.random((2, 3)).astype(np.float32)
    empty = np.zeros((0, 3), dtype=np.float32)
    body, headers = protocol.encode_response(
        model_name="m",
        model_version="1",
        request_id="q",
        outputs=[
            OutputTensor("probs", probs, binary=binary),
            OutputTensor("words", words, binary=binary),
            OutputTensor("empty", empty, binary=binary),
        ],
    )
    tensors, resp = protocol.decode_response(body, headers)
    assert resp.model_name == "m" and resp.id == "q"
    np.testing.assert_array_equal(tensors["probs"], probs)
    assert tensors["words"].tolist() == words.tolist()
    assert tensors["empty"].shape == (0, 3)


def test_torch_inputs_and_nested_json_data() -> None:
    x = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 2, 2)
    body, headers = protocol.encode_request({"image": x}, binary=False)
    obj = json.loads(body)
    obj["inputs"][0]["data"] = x.numpy().tolist()  # nested, as some clients send
    _, tensors = protocol.decode_request(json.dumps(obj).encode(), headers)
    np.testing.assert_array_equal(tensors["image"], x.numpy())


def test_requested_outputs_and_binary_output_flag() -> None:
    body, headers = protocol.encode_request(
        {"x": np.zeros((1,), np.float32)},
        [RequestedOutput.make("probs", binary_data=True, class_count=3)],
        binary_output=False,
    )
    req, _ = protocol.decode_request(body, headers)
    assert req.parameters == {"binary_data_output": False}
    assert req.outputs is not None
    assert req.outputs[0].parameters == {"binary_data": True, "classification": 3}


def _json(inputs: list[dict[str, object]]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, 2, 3]}, "expected 2 elem"),
        ({"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, 256]}, "[0, 255]"),
        ({"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, -1]}, "[0, 255]"),
        ({"name": "x", "shape": [2], "datatype": "UINT8", "data": [1.5, 2]}, "integers"),
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}, "numbers"),
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}, "ragged"),
        ({"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}, "booleans"),
        ({"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}, "strings"),
        ({"name": "x", "shape": [2], "datatype": "FP8", "data": [1, 2]}, "datatype"),
        ({"name": "x", "shape": [-1], "datatype": "FP32", "data": []}, "shape"),
        ({"name": "x", "shape": [1], "datatype": "FP32"}, "neither"),
        ({"name": "x", "shape": [1], "datatype": "FP32", "data": 3}, "expected a list"),
        ({"name": "x", "shape": "1", "datatype": "FP32", "data": [1]}, "shape"),
    ],
)
def test_bad_json_tensors(tensor: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolError, match=r"expected|invalid") as info:
        protocol.decode_request(_json([tensor]))
    assert message in str(info.value)


def test_malformed_bodies() -> None:
    with pytest.raises(ProtocolError, match="malformed JSON"):
        protocol.decode_request(b'{"inputs": [')
    with pytest.raises(ProtocolError, match="JSON object"):
        protocol.decode_request(b"[1, 2]")
    with pytest.raises(ProtocolError, match="inputs: Field required"):
        protocol.decode_request(b"{}")
    dup: dict[str, object] = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}
    with pytest.raises(ProtocolError, match="unique"):
        protocol.decode_request(_json([dup, dup]))


def _binary_request(extra: bytes = b"", cut: int = 0) -> tuple[bytes, dict[str, str]]:
    x = np.arange(12, dtype=np.float32)
    body, headers = protocol.encode_request({"x": x}, binary=True)
    return body[: len(body) - cut] + extra, headers


def test_binary_body_shorter_longer_and_bad_header() -> None:
    good, headers = _binary_request()
    protocol.decode_request(good, headers)
    with pytest.raises(ProtocolError, match="shorter than announced"):
        protocol.decode_request(*_binary_request(cut=4))
    with pytest.raises(ProtocolError, match="longer than announced"):
        protocol.decode_request(*_binary_request(extra=b"\0"))
    for bad in ("abc", "-1", "0", str(len(good) + 1), ""):
        with pytest.raises(ProtocolError, match=protocol.HEADER_LENGTH):
            protocol.decode_request(good, {protocol.HEADER_LENGTH.lower(): bad})
    # header length pointing inside the JSON
    with pytest.raises(ProtocolError, match="malformed JSON"):
        protocol.decode_request(good, {protocol.HEADER_LENGTH: "5"})
    # a binary body without the header is not JSON
    with pytest.raises(ProtocolError, match="malformed JSON"):
        protocol.decode_request(good, {})


def test_binary_size_must_match_shape_and_be_exclusive_with_data() -> None:
    head = {
        "inputs": [
            {"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 8}}
        ]
    }
    raw = json.dumps(head).encode()
    with pytest.raises(ProtocolError, match="expected binary_data_size 12"):
        protocol.decode_request(raw + b"\0" * 8, {protocol.HEADER_LENGTH: str(len(raw))})
    head["inputs"][0]["parameters"] = {"binary_data_size": "8"}
    raw = json.dumps(head).encode()
    with pytest.raises(ProtocolError, match="non-negative integer"):
        protocol.decode_request(raw + b"\0" * 8, {protocol.HEADER_LENGTH: str(len(raw))})
    head["inputs"][0].update(parameters={"binary_data_size": 12}, data=[1, 2, 3])
    raw = json.dumps(head).encode()
    with pytest.raises(ProtocolError, match="got both"):
        protocol.decode_request(raw + b"\0" * 12, {protocol.HEADER_LENGTH: str(len(raw))})


def test_bytes_tensor_framing_errors() -> None:
    with pytest.raises(ProtocolError, match="length prefix"):
        codecs.deserialize_bytes_tensor(b"\x01\x00")
    with pytest.raises(ProtocolError, match="expected 5 bytes"):
        codecs.deserialize_bytes_tensor(b"\x05\x00\x00\x00abc")


def test_classification_strings() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0]], dtype=np.float32)
    strings = codecs.encode_classification(scores, 2, ["a", "b:c", "d"])
    assert strings.shape == (2, 2)
    assert strings[0].tolist() == [b"0.7:1:b:c", b"0.2:2:d"]
    assert strings[1].tolist() == [b"0.5:0:a", b"0.5:1:b:c"]  # ties: lower index first
    parsed = codecs.decode_classification(strings)
    assert parsed[0][0] == (pytest.approx(0.7), 1, "b:c")
    assert codecs.encode_classification(scores, 10).shape == (2, 3)
    with pytest.raises(ProtocolError, match="score:index"):
        codecs.decode_classification(np.array([[b"nonsense"]], dtype=object))


def test_interop_with_tritonclient_codecs() -> None:
    """Bodies built by tritonclient decode here, and ours decode in tritonclient."""
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.http._utils import _get_inference_request

    x = RNG.integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    for binary in (True, False):
        inp = httpclient.InferInput("image", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("probs", binary_data=True, class_count=2)
        body, json_size = _get_inference_request(
            inputs=[inp], request_id="7", outputs=[out], sequence_id=0, sequence_start=False,
            sequence_end=False, priority=0, timeout=None, custom_parameters=None,
        )
        headers = {} if json_size is None else {protocol.HEADER_LENGTH: str(json_size)}
        req, tensors = protocol.decode_request(body, headers)
        np.testing.assert_array_equal(tensors["image"], x)
        assert req.id == "7"

        probs = RNG.random((2, 3)).astype(np.float32)
        strings = codecs.encode_classification(probs, 2, ["a", "b", "c"])
        body, headers = protocol.encode_response(
            model_name="m",
            outputs=[OutputTensor("probs", probs, binary), OutputTensor("cls", strings, binary)],
        )
        result = httpclient.InferResult.from_response_body(
            body, header_length=headers.get(protocol.HEADER_LENGTH) and int(
                headers[protocol.HEADER_LENGTH])
        )
        np.testing.assert_array_equal(result.as_numpy("probs"), probs)
        got = [s.decode() if isinstance(s, bytes) else s for s in result.as_numpy("cls").ravel()]
        assert got == [s.decode() for s in strings.ravel()]


def test_error_message() -> None:
    assert protocol.error_message(b'{"error": "boom"}') == "boom"
    assert protocol.error_message(b"<html>") == "<html>"
