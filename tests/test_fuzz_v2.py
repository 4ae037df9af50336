"""Property-based fuzzing of the V2 codecs, JSON and binary, alone and through the server.

Requests are generated from two families: anything shaped roughly like a V2 message (random
names, datatypes, shapes with zeros and huge or negative dimensions, data of any JSON kind,
parameters of any value, repeated outputs), and valid image requests with one part mutated,
so that the model and the encoder are reached too. Binary bodies pair a header with tensor
bytes of the right or a wrong length and an ``Inference-Header-Content-Length`` that is right,
wrong or not a number at all. Properties: ``protocol.decode_request`` returns tensors of the
declared shapes or raises :class:`ProtocolError`; ``run_infer`` on the default model and on a
hosted prompt (any image size) answers a decodable response or raises a
:class:`ReprogramError` (a 4xx/503), never anything else.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from fuzz_support import fuzz, json_values
from hypothesis import strategies as st
from prompt_support import random_prompt

from reprogram import protocol
from reprogram.codecs import DATATYPES, numpy_dtype
from reprogram.errors import ProtocolError, ReprogramError
from reprogram.zoo.registry import SourceModel
from server import Settings, create_app
from server.inference import Servable
from server.routes_v2 import run_infer

HL = protocol.HEADER_LENGTH
SETTINGS = Settings(max_json_elements=100_000, max_request_pixels=200_000)

_names = st.one_of(st.sampled_from(["image", "probs", "label", "x", ""]), st.text(max_size=6))
_dims = st.one_of(st.integers(min_value=0, max_value=4), st.sampled_from(
    [3, 32, 2**31 - 1, 2**31, 2**62, 2**63, 2**64, -1]), st.booleans(), st.floats())
_shapes = st.one_of(st.lists(_dims, max_size=6), json_values(8))
_datatypes = st.one_of(st.sampled_from(sorted(DATATYPES)), st.sampled_from(["uint8", ""]),
                       st.text(max_size=5))
_scalars = st.one_of(st.integers(min_value=-300, max_value=300), st.floats(), st.booleans(),
                     st.text(max_size=3), st.none())
_data = st.one_of(st.lists(_scalars, max_size=12), st.lists(st.lists(_scalars, max_size=4),
                                                            max_size=4), json_values(8))
_param_keys = st.sampled_from(["binary_data_size", "binary_data", "classification",
                               "binary_data_output", "x"])
_params = st.dictionaries(_param_keys, st.one_of(
    st.integers(min_value=-5, max_value=2**64), st.booleans(), json_values(4)), max_size=3)
_tensor = st.fixed_dictionaries(
    {"name": _names, "shape": _shapes, "datatype": _datatypes},
    optional={"data": _data, "parameters": _params})
_outputs = st.lists(st.fixed_dictionaries({"name": _names}, optional={"parameters": _params}),
                    max_size=4)
_loose = st.fixed_dictionaries({"inputs": st.one_of(st.lists(_tensor, max_size=3),
                                                    json_values(4))},
                               optional={"id": json_values(3), "outputs": _outputs,
                                         "parameters": _params})


@st.composite
def _images(draw: st.DrawFn) -> tuple[np.ndarray, str]:
    """A small image batch: the default model's 32x32 or, for prompts, any size."""
    n = draw(st.integers(min_value=0, max_value=3))
    h, w = draw(st.sampled_from([(32, 32), (8, 12), (1, 1), (0, 5), (200, 400)]))
    datatype = draw(st.sampled_from(["UINT8", "FP32", "INT64", "BYTES"]))
    if datatype == "BYTES":
        return np.array([b"x"] * (n * 3 * h * w), dtype=object).reshape(n, 3, h, w), datatype
    seed = draw(st.integers(min_value=0, max_value=9))
    values = np.random.default_rng(seed).uniform(-0.5, 300, (n, 3, h, w))
    dtype = numpy_dtype(datatype)
    return (values.astype(dtype) if datatype != "FP32" else (values / 255).astype(dtype),
            datatype)


@st.composite
def _near_valid(draw: st.DrawFn) -> tuple[dict[str, Any], np.ndarray]:
    images, datatype = draw(_images())
    entry: dict[str, Any] = {"name": "image", "shape": list(images.shape), "datatype": datatype}
    header: dict[str, Any] = {"inputs": [entry]}
    if draw(st.booleans()):
        header["outputs"] = draw(_outputs)
    if draw(st.booleans()):
        header["parameters"] = draw(_params)
    if draw(st.booleans()):
        entry["shape"] = draw(_shapes)
    return header, images


def _json_body(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    if draw(st.booleans()):
        header = draw(_loose)
    else:
        header, images = draw(_near_valid())
        if images.dtype != object:
            header["inputs"][0]["data"] = images.reshape(-1).tolist()
    return json.dumps(header).encode(), {"Content-Type": "application/json"}


def _binary_body(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    if draw(st.booleans()):
        header, tail = draw(_loose), draw(st.binary(max_size=64))
    else:
        header, images = draw(_near_valid())
        tail = images.tobytes() if images.dtype != object else b"\x01\x00\x00\x00x" * images.size
        header["inputs"][0]["parameters"] = {"binary_data_size": len(tail)}
        tail = draw(st.sampled_from([tail, tail[:-1], tail + b"\x00", b""]))
    head = json.dumps(header).encode()
    length = draw(st.one_of(st.just(str(len(head))), st.integers(min_value=-2, max_value=2**70)
                            .map(str), st.sampled_from(["\u00b2", " 1", "", "0x10"])))
    return head + tail, {HL: length, "Content-Type": protocol.BINARY_CONTENT_TYPE}


@st.composite
def v2_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A V2 request body and its headers, JSON or binary."""
    return _binary_body(draw) if draw(st.booleans()) else _json_body(draw)


def test_fuzz_decode_request(extended_run: bool) -> None:
    def check(case: tuple[bytes, dict[str, str]]) -> None:
        body, headers = case
        try:
            request, tensors = protocol.decode_request(body, headers)
        except ProtocolError:
            return
        for entry in request.inputs:
            assert tensors[entry.name].shape == tuple(entry.shape)

    fuzz(v2_bodies(), check, extended=extended_run)


@pytest.fixture(scope="module")
def servables(model: SourceModel) -> list[Servable]:
    app = create_app(SETTINGS, model=model)
    prompt, _ = app.state.prompts.add(random_prompt(seed=2), persist=False)
    return [app.state.registry.get("default"), prompt]


def test_fuzz_run_infer(extended_run: bool, servables: list[Servable],
                        one_thread: None) -> None:
    answered = 0

    def check(case: tuple[int, tuple[bytes, dict[str, str]]]) -> None:
        nonlocal answered
        which, (body, headers) = case
        try:
            content, out_headers = run_infer(servables[which], body, headers, None, SETTINGS)
        except ReprogramError as exc:
            status = getattr(exc, "status_code", 400)
            assert 400 <= status < 500 or status == 503, (status, exc)
            return
        outputs, _ = protocol.decode_response(content, out_headers)
        assert outputs and all(len(a) >= 1 for a in outputs.values())
        answered += 1

    fuzz(st.tuples(st.integers(min_value=0, max_value=1), v2_bodies()), check,
         extended=extended_run)
    assert answered > 0  # the generator reaches the model, not only the parsers
