"""Tests for reprogram.artifact: round trip, rejection of damaged or foreign files, no pickle."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from reprogram import artifact
from reprogram.artifact import (
    Prompt,
    check_compatible,
    dump_prompt,
    load_prompt,
    loads_prompt,
    save_prompt,
)
from reprogram.data import load_digits
from reprogram.errors import ArtifactError
from reprogram.labelmaps import LabelMapSpec, build_labelmap
from reprogram.oracles import LocalOracle
from reprogram.pipeline import Reprogrammer
from reprogram.programs import ProgramSpec, build_program
from reprogram.zoo.registry import SourceModel

CLASSES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
           "juliet")


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(kind: str = "frequency", source: dict[str, Any] | None = None) -> Prompt:
    gen = torch.Generator().manual_seed(0)
    spec = ProgramSpec(kind="pad", frame_size=(32, 32), inner_size=16, resolution=8)
    program = build_program(spec)
    with torch.no_grad():
        program.theta.copy_(torch.randn(program.theta.shape, generator=gen))
    labelmap = build_labelmap(LabelMapSpec(kind=kind, num_source=10, num_target=10))  # type: ignore[arg-type]
    with torch.no_grad():
        if labelmap.weight is not None and labelmap.bias is not None:
            labelmap.weight.add_(0.1 * torch.randn(10, 10, generator=gen))
            labelmap.bias.copy_(0.1 * torch.randn(10, generator=gen))
        else:
            labelmap.assignment.copy_(torch.randperm(10, generator=gen)[:, None])
    rp = Reprogrammer(program, labelmap, floor=1e-5)
    return Prompt.from_reprogrammer(
        rp, target_classes=CLASSES,
        source=source or {"name": "default", "weights_sha256": "ab" * 32},
        config={"lr": 0.05, "estimator": "rgf"}, seed=7,
        queries={"images": 1234, "requests": 56},
        metrics={"val_accuracy": 0.5, "test_accuracy": 0.25},
    )


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _resign(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """A file with these metadata and tensors and a VALID digest (a forger's file)."""
    meta = {k: v for k, v in meta.items() if k != "digest"}
    meta["digest"] = artifact._digest(meta, tensors)
    return st_save(tensors, metadata={"reprogram": json.dumps(meta)})


def _meta_and_tensors(prompt: Prompt) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    header, _ = _split(dump_prompt(prompt))
    return json.loads(header["__metadata__"]["reprogram"]), dict(prompt.tensors)


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("kind", ["frequency", "linear"])
def test_round_trip_predicts_identically(tmp_path: Path, model: SourceModel, kind: str) -> None:
    prompt = _prompt(kind)
    path = save_prompt(prompt, tmp_path / "sub" / "p.safetensors")
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["p.safetensors"]  # no temp file left
    loaded = load_prompt(path)
    assert loaded.metadata() == prompt.metadata()
    assert loaded.target_classes == CLASSES and loaded.seed == 7 and loaded.floor == 1e-5
    assert set(loaded.tensors) == set(prompt.tensors)
    for name, t in prompt.tensors.items():
        assert torch.equal(loaded.tensors[name], t)
    images = load_digits().images[:40]
    oracle = LocalOracle(model)
    before = prompt.build().predict_logits(images, oracle)
    after = loaded.build().predict_logits(images, oracle)
    assert torch.equal(before, after)
    assert len(set(after.argmax(-1).tolist())) > 1
    assert loads_prompt(path.read_bytes()).metadata() == prompt.metadata()


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    save_prompt(_prompt("frequency"), path)
    save_prompt(_prompt("linear"), path)
    assert load_prompt(path).labelmap.kind == "linear"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_prompt(_prompt("linear"), tmp_path / "p.safetensors")

    def forbidden(*args: object, **kwargs: object) -> object:
        raise AssertionError("pickle used while loading a prompt")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert load_prompt(path).build() is not None


# ----------------------------------------------------------------------------- damaged files
@pytest.fixture
def good(tmp_path: Path) -> bytes:
    return dump_prompt(_prompt())


def _rejects(data: bytes, match: str, tmp_path: Path | None = None) -> None:
    with pytest.raises(ArtifactError, match=match):
        loads_prompt(data)
    if tmp_path is not None:
        path = tmp_path / "bad.safetensors"
        path.write_bytes(data)
        with pytest.raises(ArtifactError, match=match):
            load_prompt(path)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1, -200])
def test_truncated_file(good: bytes, tmp_path: Path, keep: int) -> None:
    _rejects(good[:keep], "truncated|expected a safetensors|corrupt", tmp_path)


def test_edited_header_same_length(good: bytes) -> None:
    assert good.count(b"bravo") == 1
    _rejects(good.replace(b"bravo", b"brave"), "digest mismatch")
    assert good.count(b'\\"seed\\": 7') == 1
    _rejects(good.replace(b'\\"seed\\": 7', b'\\"seed\\": 8'), "digest mismatch")


def test_tampered_tensor_bytes(good: bytes) -> None:
    header, body = _split(good)
    for offset in (0, len(body) // 2, len(body) - 1):
        data = bytearray(good)
        data[len(good) - len(body) + offset] ^= 0x01
        _rejects(bytes(data), "digest mismatch")
    # a tensor relabelled with another dtype of the same size
    entry = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[entry]["dtype"] = "I32"
    _rejects(_join(header, body), "digest mismatch")


def test_wrong_tensor_shapes_with_a_valid_digest(good: bytes) -> None:
    meta, tensors = _meta_and_tensors(_prompt())
    bad_theta = {**tensors, "program.theta": torch.zeros(3, 4, 4)}
    _rejects(_resign(meta, bad_theta), "do not fit")
    bad_map = {**tensors, "labelmap.assignment": torch.arange(5)[:, None]}
    _rejects(_resign(meta, bad_map), "do not fit")
    missing = {k: v for k, v in tensors.items() if k != "program.theta"}
    _rejects(_resign(meta, missing), "do not fit")
    extra = {**tensors, "program.extra": torch.zeros(2)}
    _rejects(_resign(meta, extra), "do not fit")
    foreign = {**tensors, "optimizer.state": torch.zeros(2)}
    _rejects(_resign(meta, foreign), "program.. or labelmap")
    repeated = {**tensors, "labelmap.assignment": torch.zeros(10, 1, dtype=torch.long)}
    _rejects(_resign(meta, repeated), "do not fit")
    # other dtypes are rejected cleanly (bfloat16 once crashed the digest with a TypeError)
    bf16 = {**tensors, "program.theta": tensors["program.theta"].to(torch.bfloat16)}
    _rejects(_resign(meta, bf16), "dtype torch.float32, got torch.bfloat16")
    floats = {**tensors, "labelmap.assignment": tensors["labelmap.assignment"].double()}
    _rejects(_resign(meta, floats), "dtype torch.int64, got torch.float64")


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_schema_version(version: object) -> None:
    meta, tensors = _meta_and_tensors(_prompt())
    meta["schema_version"] = version
    _rejects(_resign(meta, tensors), "schema version")


def test_bad_metadata_with_a_valid_digest() -> None:
    meta, tensors = _meta_and_tensors(_prompt())
    _rejects(_resign({**meta, "format": "something.else"}, tensors), "expected format")
    no_classes = {k: v for k, v in meta.items() if k != "target_classes"}
    _rejects(_resign(no_classes, tensors), "lacks")
    _rejects(_resign({**meta, "target_classes": ["a", "b"]}, tensors), "10 target class")
    _rejects(_resign({**meta, "program": {**meta["program"], "kind": "zoom"}}, tensors),
             "metadata is invalid")
    _rejects(_resign({**meta, "labelmap": "first"}, tensors), "metadata is invalid")


def test_non_safetensors_files(tmp_path: Path) -> None:
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(png)
    _rejects(png.read_bytes(), "safetensors", tmp_path)
    _rejects(b"", "expected a safetensors", tmp_path)
    _rejects(b"hello world, I am a text file\n" * 4, "safetensors", tmp_path)
    _rejects(pickle.dumps({"program.theta": [1.0, 2.0]}), "safetensors", tmp_path)
    torch.save({"program.theta": torch.zeros(3)}, tmp_path / "t.pt")
    _rejects((tmp_path / "t.pt").read_bytes(), "safetensors")
    # a plausible length prefix followed by bytes that are not JSON
    _rejects(struct.pack("<Q", 4) + b"\xff\xfe{]", "JSON")
    _rejects(struct.pack("<Q", 2) + b"[]", "JSON object")


def test_safetensors_without_our_metadata() -> None:
    plain = st_save({"program.theta": torch.zeros(3, 8, 8)})
    _rejects(plain, "no 'reprogram' metadata")
    other = st_save({"w": torch.zeros(2)}, metadata={"format": "pt"})
    _rejects(other, "no 'reprogram' metadata")
    not_json = st_save({"w": torch.zeros(2)}, metadata={"reprogram": "{not json"})
    _rejects(not_json, "corrupt")
    header, body = _split(plain)
    header["__metadata__"] = "reprogram"
    _rejects(_join(header, body), "metadata")


def test_missing_and_oversized_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ArtifactError, match="no such file"):
        load_prompt(tmp_path / "nope.safetensors")
    with pytest.raises(ArtifactError, match="no such file"):
        load_prompt(tmp_path)
    path = save_prompt(_prompt(), tmp_path / "p.safetensors")
    monkeypatch.setattr(artifact, "MAX_ARTIFACT_BYTES", 100)
    with pytest.raises(ArtifactError, match="at most 100 bytes"):
        load_prompt(path)
    with pytest.raises(ArtifactError, match="at most 100 bytes"):
        loads_prompt(path.read_bytes())


# ----------------------------------------------------------------------------- compatibility
def test_check_compatible(model: SourceModel) -> None:
    fp = model.meta.fingerprint()
    prompt = _prompt(source=dict(fp))
    check_compatible(prompt, (32, 32), 10, fp)
    check_compatible(prompt, (32, 32), 10, None)  # nothing to compare the weights with
    with pytest.raises(ArtifactError, match=r"made for \[32, 32\] inputs.*\[224, 224\]"):
        check_compatible(prompt, (224, 224), 10, fp)
    with pytest.raises(ArtifactError, match=r"10 source classes.*1000"):
        check_compatible(prompt, (32, 32), 1000, fp)
    with pytest.raises(ArtifactError, match="model weights"):
        check_compatible(prompt, (32, 32), 10, {**fp, "weights_sha256": "0" * 64})


# ----------------------------------------------------------------------------- program kinds
def test_an_artifact_written_with_the_old_pad_kind_loads_as_expand(model: SourceModel) -> None:
    prompt = _prompt("linear")
    meta, tensors = _meta_and_tensors(prompt)
    assert meta["program"]["kind"] == "expand"
    meta["program"]["kind"] = "pad"  # what the previous release wrote
    loaded = loads_prompt(_resign(meta, tensors))
    assert loaded.program.kind == "expand" and loaded.program == prompt.program
    images = load_digits().images[:20]
    oracle = LocalOracle(model)
    torch.testing.assert_close(loaded.build().predict_logits(images, oracle),
                               prompt.build().predict_logits(images, oracle))


@pytest.mark.parametrize(("kind", "patch"), [("add-pad", 4), ("add-patch", 8), ("mask", 8)])
def test_new_program_kinds_and_their_geometry_round_trip(kind: str, patch: int) -> None:
    inner = 16 if kind == "mask" else 32
    spec = ProgramSpec(kind=kind, frame_size=(32, 32), inner_size=inner,  # type: ignore[arg-type]
                       patch_size=patch)
    base = _prompt("linear")
    program = build_program(spec, seed=1)
    with torch.no_grad():
        program.theta.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    labelmap = build_labelmap(LabelMapSpec(kind="linear", num_source=10, num_target=10))
    prompt = Prompt.from_reprogrammer(
        Reprogrammer(program, labelmap), target_classes=CLASSES, source=base.source,
        config={"program": kind}, seed=1, queries={"images": 1, "requests": 1}, metrics={})
    loaded = loads_prompt(dump_prompt(prompt))
    assert loaded.program == spec and loaded.program.patch_size == patch
    assert torch.equal(loaded.tensors["program.theta"], program.theta.detach())
    images = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loaded.build().program.render(images), program.render(images))
