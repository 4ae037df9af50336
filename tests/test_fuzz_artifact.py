"""Property-based fuzzing of the prompt artifact loader (``reprogram.artifact.loads_prompt``).

Inputs: random bytes; a valid prompt file truncated, with bytes flipped, or with its
safetensors header entries rewritten; and forgeries that a digest cannot catch, since the
forger recomputes it: metadata fields replaced by any JSON value (huge, negative, nested,
non-finite), tensors replaced by others of random dtype, shape and values (NaN and Inf
included). Each is loaded as the server loads an upload (checked against the served default
model before any tensor is built) or as a client loads a file (no model). Property: a
:class:`Prompt` whose tensors fit its specs, are finite and build, or an
:class:`ArtifactError`; never any other exception.
"""

from __future__ import annotations

import json
import struct
from typing import Any, get_args

import torch
from fuzz_support import fuzz, json_values
from hypothesis import strategies as st
from prompt_support import random_prompt, resign, split_artifact

from reprogram.artifact import check_compatible, loads_prompt
from reprogram.artifact_check import PromptHeader
from reprogram.errors import ArtifactError
from reprogram.labelmaps import LabelMapKind
from reprogram.programs import ProgramKind

GOOD = random_prompt(seed=5)
META, TENSORS = split_artifact(GOOD)
HEADER_LEN = struct.unpack("<Q", GOOD[:8])[0]
FINGERPRINT = dict(META["source"])

_numbers = st.one_of(st.integers(min_value=-3, max_value=64), st.sampled_from(
    [0, 1, 16, 32, 2**31, 10**6, 10**30, 2**64]), st.booleans(), st.floats())
_field_values = {
    ("program", "kind"): st.sampled_from([*get_args(ProgramKind), "pad ", ""]),
    ("program", "frame_size"): st.one_of(st.lists(_numbers, max_size=3), json_values(4)),
    ("program", "inner_size"): _numbers, ("program", "resolution"): st.one_of(_numbers,
                                                                             st.none()),
    ("program", "patch_size"): _numbers, ("program", "init_std"): _numbers,
    ("program", "mask"): st.sampled_from(["none", "border", "x"]),
    ("labelmap", "kind"): st.sampled_from([*get_args(LabelMapKind), "x"]),
    ("labelmap", "num_source"): _numbers, ("labelmap", "num_target"): _numbers,
    ("labelmap", "sources_per_target"): _numbers, ("labelmap", "seed"): _numbers,
}
_top_fields = ["target_classes", "source", "floor", "seed", "config", "metrics", "queries",
               "format", "schema_version", "wire_dtype", "output_kind", "program", "labelmap"]
_dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16,
                           torch.int64, torch.int32, torch.uint8, torch.bool])


@st.composite
def _tensor(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(min_value=0, max_value=12), max_size=3))
    value = draw(st.sampled_from([0.0, 1.0, -2.5, float("nan"), float("inf"), 300.0]))
    t = torch.full(shape, value, dtype=torch.float64)
    if not draw(st.booleans()):
        t = torch.nan_to_num(t)
    return t.to(draw(_dtypes))


@st.composite
def forged(draw: st.DrawFn) -> bytes:
    """A forger's file: some metadata fields and tensors replaced, a valid digest."""
    meta: dict[str, Any] = json.loads(json.dumps(META))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if draw(st.booleans()):
            part, key = draw(st.sampled_from(sorted(_field_values)))
            if isinstance(meta.get(part), dict):
                meta[part][key] = draw(_field_values[(part, key)])
        else:
            meta[draw(st.sampled_from(_top_fields))] = draw(json_values(10))
    labelmap, target_classes = meta.get("labelmap"), meta.get("target_classes")
    if isinstance(labelmap, dict) and isinstance(target_classes, list) and draw(st.booleans()):
        labelmap["num_target"] = len(target_classes)  # consistent, so tensor checks are reached
    tensors = dict(TENSORS)
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        name = draw(st.sampled_from([*sorted(TENSORS), "program.extra", "optimizer.x", "x"]))
        if draw(st.integers(min_value=0, max_value=4)) == 0:
            tensors.pop(name, None)
        else:
            tensors[name] = draw(_tensor())
    return resign(meta, tensors)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A valid file truncated, with bytes flipped, or with its header entries rewritten."""
    how = draw(st.sampled_from(["truncate", "flip", "header", "length"]))
    data = bytearray(GOOD)
    if how == "truncate":
        return bytes(data[: draw(st.integers(min_value=0, max_value=len(data) - 1))])
    if how == "flip":
        for _ in range(draw(st.integers(min_value=1, max_value=4))):
            data[draw(st.integers(min_value=0, max_value=len(data) - 1))] ^= draw(
                st.integers(min_value=1, max_value=255))
        return bytes(data)
    if how == "length":
        return struct.pack("<Q", draw(st.integers(min_value=0, max_value=2**64 - 1))) + GOOD[8:]
    header = json.loads(GOOD[8 : 8 + HEADER_LEN])
    name = draw(st.sampled_from(sorted(header)))
    if name == "__metadata__" or draw(st.booleans()):
        header[name] = draw(json_values(8))
    else:
        header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(
            json_values(6))
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + GOOD[8 + HEADER_LEN:]


def _compatible(header: PromptHeader) -> None:
    check_compatible(header, (32, 32), 10, FINGERPRINT)


def test_fuzz_artifact_loader(extended_run: bool, one_thread: None) -> None:
    loaded = 0

    def check(case: tuple[bytes, bool]) -> None:
        nonlocal loaded
        data, served = case
        try:
            prompt = loads_prompt(data, check=_compatible if served else None)
        except ArtifactError:
            return
        loaded += 1
        assert all(bool(torch.isfinite(t).all()) for t in prompt.tensors.values()
                   if t.is_floating_point())
        assert len(prompt.target_classes) == prompt.labelmap.num_target
        if served:
            assert tuple(prompt.program.frame_size) == (32, 32)
        prompt.build()

    inputs = st.one_of(forged(), damaged(), st.binary(max_size=200))
    fuzz(st.tuples(inputs, st.booleans()), check, extended=extended_run, examples=150)
    assert loaded > 0  # some forgeries are valid prompts: the generator reaches the end
